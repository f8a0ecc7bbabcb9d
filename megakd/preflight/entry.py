"""How a tool ends on bad input: one line naming the flag or file, exit status 2, on every rank.

:func:`run_tool` runs a tool's body. A :class:`~megakd.configs.ConfigError` (bad flags, a
missing or damaged file, a checkpoint or cache that does not fit the run) raised before or after
the process groups start is printed as ``<tool>: error: <message>`` and the tool returns 2,
never a traceback. Errors that only some ranks can see (a damaged cache shard read by the last
pipeline stage) reach the other ranks through :mod:`megakd.runtime.watchdog`, which ends them
with the same line and status instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import sys
from typing import Callable, Mapping, Type

from megakd.configs import BAD_INPUT_STATUS, ConfigError
from megakd.runtime import watchdog


def run_tool(prog: str, body: Callable[[], object],
             failures: Mapping[Type[Exception], int] = {}) -> int:
    """Run ``body``; 0 when it returns, 2 with a one-line message on bad input. ``failures``
    maps other expected exceptions to their exit status (e.g. a failed ``--verify``: 1), also
    reported as one line."""
    watchdog.set_program(prog)
    try:
        body()
    except ConfigError as error:
        return _fail(prog, error, BAD_INPUT_STATUS)
    except tuple(failures) as error:
        return _fail(prog, error, failures[type(error)])
    return 0


def _fail(prog: str, error: Exception, status: int) -> int:
    print(watchdog.error_line(str(error)), file=sys.stderr, flush=True)
    watchdog.abort_peers(str(error), status)  # if the process groups still run
    return status

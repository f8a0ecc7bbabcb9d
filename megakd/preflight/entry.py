"""How a tool ends on bad input: one line naming the flag or file, exit status 2, on every rank.

:func:`run_tool` runs a tool's body. A :class:`~megakd.configs.ConfigError` (bad flags, a
missing or damaged file, a checkpoint or cache that does not fit the run) raised before or after
the process groups start is printed as ``<tool>: error: <message>`` and the tool returns 2,
never a traceback; so is every other expected failure (an exception with an
``exit_status``). Errors that only some ranks can see (a damaged cache shard read by the last
pipeline stage) reach the other ranks through :mod:`megakd.runtime.watchdog`, which ends them
with the same line and status instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import sys
from typing import Callable

from megakd.configs import BAD_INPUT_STATUS, ConfigError
from megakd.runtime import watchdog


def run_tool(prog: str, body: Callable[[], object]) -> int:
    """Run ``body``; 0 when it returns, 2 with a one-line message on bad input. Other
    expected failures carry their exit status as ``exit_status`` (a diverged run: 3, a lost
    peer or launcher: 1, a failed ``--verify``: 1) and are reported as one line too."""
    watchdog.set_program(prog)
    try:
        body()
    except ConfigError as error:
        return _fail(prog, error, BAD_INPUT_STATUS)
    except Exception as error:
        status = getattr(error, "exit_status", None)
        if status is None:
            raise
        return _fail(prog, error, status)
    return 0


def _fail(prog: str, error: Exception, status: int) -> int:
    print(watchdog.error_line(str(error)), file=sys.stderr, flush=True)
    watchdog.abort_peers(str(error), status)  # if the process groups still run
    return status

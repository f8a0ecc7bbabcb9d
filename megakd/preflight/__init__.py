"""Preflight: every tool's command line, and every check that reads files, run before any
process group starts (flags -> validated configs); and the one-line, exit-status-2 ending of a
tool on bad input (:func:`run_tool`)."""

from megakd.preflight.commandline import (
    GENERATE,
    PRECOMPUTE,
    PRETRAIN,
    Tool,
    check_pretrain_config,
    flags_table,
    parse_generate_args,
    parse_precompute_args,
    parse_pretrain_args,
)
from megakd.preflight.entry import run_tool
from megakd.preflight.prune import PRUNE, parse_prune_args

__all__ = [
    "GENERATE",
    "PRECOMPUTE",
    "PRETRAIN",
    "PRUNE",
    "Tool",
    "check_pretrain_config",
    "flags_table",
    "parse_generate_args",
    "parse_precompute_args",
    "parse_pretrain_args",
    "parse_prune_args",
    "run_tool",
]

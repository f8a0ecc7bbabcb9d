"""How a config field declares its command-line flag: once, next to the field.

Every user-facing field of a config dataclass is created with :func:`flag`, which records the
Megatron-LM flag name, the help text, the allowed values or bounds, and whether a tool that asks
for the field requires it. The argparse parsers, the docs' flag tables, :func:`check_bounds`
and the ``as_dict`` views are all derived from these declarations (:mod:`megakd.configs.cli`),
so a flag, its default and its bounds live in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple


class ConfigError(ValueError):
    """A flag, a combination of flags, or an input file that cannot work. The message names
    the flag (or the file) and what was expected; tools print it as one line and exit with
    :data:`BAD_INPUT_STATUS`."""


BAD_INPUT_STATUS = 2  # exit status of every tool, on every rank, for a ConfigError


@dataclass(frozen=True)
class Flag:
    """The command-line side of one config field."""

    name: str  # Megatron-LM's flag, e.g. "--micro-batch-size"
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    low: Optional[float] = None  # bounds of the value (None: unbounded on that side)
    high: Optional[float] = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    required: bool = False  # a tool that asks for this field refuses to start without it
    inverted: bool = False  # a bare switch that sets the field to False (--disable-bias-linear)
    nargs: Optional[str] = None  # "*" for list-valued flags (--data-path)
    metavar: Optional[str] = None
    teacher: bool = False  # ModelArchConfig only: also a --teacher-<name> flag for the teacher
    default_text: Optional[str] = None  # the default as docs show it, when derived ("4 x hidden")

    @property
    def dest(self) -> str:
        """argparse's destination for this flag (``--kd-loss`` -> ``kd_loss``)."""
        return self.name.lstrip("-").replace("-", "_")

    def teacher_variant(self) -> "Flag":
        """The same flag for the teacher: ``--num-layers`` -> ``--teacher-num-layers``."""
        return dataclasses.replace(self, name="--teacher-" + self.name.lstrip("-"),
                                   help="teacher " + self.help, teacher=False, required=False,
                                   default_text="the student's")

    def interval(self) -> str:
        """The bounds as an interval, e.g. ``[0, 1)`` or ``> 0``."""
        if self.low is not None and self.high is not None:
            return (f"{'[' if self.low_inclusive else '('}{_number(self.low)}, "
                    f"{_number(self.high)}{']' if self.high_inclusive else ')'}")
        if self.low is not None:
            return f"{'>=' if self.low_inclusive else '>'} {_number(self.low)}"
        if self.high is not None:
            return f"{'<=' if self.high_inclusive else '<'} {_number(self.high)}"
        return ""

    def check(self, value: Any) -> Optional[str]:
        """None when ``value`` is allowed (or unset), else a message naming the flag."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return (f"{self.name} must be one of {', '.join(str(c) for c in self.choices)}, "
                    f"got {value!r}")
        if self.low is None and self.high is None:
            return None
        low_ok = self.low is None or (value >= self.low if self.low_inclusive
                                      else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.high_inclusive
                                        else value < self.high)
        if low_ok and high_ok and not (isinstance(value, float) and math.isnan(value)):
            return None
        return f"{self.name} must be {self._requirement(value)}, got {value}"

    def _requirement(self, value: Any) -> str:
        """The bounds in words: "positive", "non-negative", or "in [0, 1)"."""
        if self.high is None:
            if (self.low == 0 and not self.low_inclusive) or \
                    (self.low == 1 and self.low_inclusive and isinstance(value, int)):
                return "positive"
            if self.low == 0 and self.low_inclusive:
                return "non-negative"
        word = "in " if self.low is not None and self.high is not None else ""
        return word + self.interval()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def flag(default: Any = None, *, name: str, help: str,
         default_factory: Optional[Callable[[], Any]] = None, **options: Any) -> Any:
    """A dataclass field carrying its :class:`Flag` (``options`` are Flag's fields)."""
    metadata = {"flag": Flag(name=name, help=help, **options)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> Optional[Flag]:
    return field.metadata.get("flag")


def flagged_fields(cls: type) -> Iterator[Tuple[dataclasses.Field, Flag]]:
    """``(field, flag)`` of every field of dataclass ``cls`` that has a command-line flag."""
    for field in dataclasses.fields(cls):
        declared = flag_of(field)
        if declared is not None:
            yield field, declared


def field_flag(cls: type, name: str) -> Flag:
    """The flag declared for field ``name`` of ``cls`` (KeyError when it has none)."""
    for field, declared in flagged_fields(cls):
        if field.name == name:
            return declared
    raise KeyError(f"{cls.__name__}.{name} declares no flag")


def check_bounds(section: Any, teacher: bool = False) -> List[str]:
    """Bound violations of every flagged field of the dataclass instance ``section``, each a
    message naming the flag (the ``--teacher-*`` variant for a teacher architecture)."""
    errors = []
    for field, declared in flagged_fields(type(section)):
        if teacher:
            if not declared.teacher:
                continue
            declared = declared.teacher_variant()
        problem = declared.check(getattr(section, field.name))
        if problem:
            errors.append(problem)
    return errors

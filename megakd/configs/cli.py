"""Command lines generated from the config dataclasses' flag declarations.

A tool describes its command line as a list of :class:`Section` s (a config dataclass, the
fields it asks for, its help group) plus :class:`ExtraFlag` s declared outside the configs (the
divergence registry's parameters). From that one description come the argparse parser
(:func:`build_parser`), the values of each section (:func:`section_values`), the flags given
explicitly (:func:`explicit_dests`) and the markdown flag table of the docs
(:func:`flags_markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from megakd.configs.fields import Flag, flagged_fields

@dataclass(frozen=True)
class Section:
    """The fields of one config dataclass that a tool takes from its command line."""

    title: str  # help group and docs heading, e.g. "training"
    cls: type
    fields: Optional[Tuple[str, ...]] = None  # None: every flagged field
    teacher: bool = False  # ModelArchConfig: the --teacher-* variants of its teacher fields
    switches: Tuple[Flag, ...] = ()  # bare flag-only switches shown in this group
    required: Tuple[str, ...] = ()  # fields required here besides those their Flag requires
    helps: Tuple[Tuple[str, str], ...] = ()  # (field, help) where this tool means it otherwise


@dataclass(frozen=True)
class ExtraFlag:
    """A flag declared outside the config dataclasses, whose value the tool collects itself."""

    group: str  # the section title it is shown under
    flag: Flag
    type: type
    default: Any


@dataclass(frozen=True)
class Option:
    """One flag of a section: the field it sets, its flag, value type and default."""

    field: str
    flag: Flag
    type: type
    default: Any
    is_list: bool = False


def _value_type(hint: Any) -> Tuple[type, bool]:
    """(scalar type, is a list) of a field annotation such as ``Optional[List[str]]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _value_type(args[0])
    if typing.get_origin(hint) in (list, List):
        return (typing.get_args(hint) or (str,))[0], True
    return hint, False


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def section_options(section: Section) -> Iterator[Option]:
    """The options of ``section`` in declaration order (teacher variants for a teacher)."""
    hints = typing.get_type_hints(section.cls)
    for field, declared in flagged_fields(section.cls):
        if section.fields is not None and field.name not in section.fields:
            continue
        if section.teacher:
            if not declared.teacher:
                continue
            declared = declared.teacher_variant()
        if field.name in section.required:
            declared = dataclasses.replace(declared, required=True)
        if field.name in dict(section.helps):
            declared = dataclasses.replace(declared, help=dict(section.helps)[field.name])
        value_type, is_list = _value_type(hints[field.name])
        default = None if section.teacher else _default(field)
        yield Option(field.name, declared, value_type, default, is_list)


def _add(group, flag: Flag, value_type: type, default: Any, is_list: bool = False) -> None:
    text = flag.help.replace("%", "%%")
    if value_type is bool:
        group.add_argument(flag.name, dest=flag.dest, action="store_true", help=text)
        return
    group.add_argument(flag.name, dest=flag.dest, type=value_type, default=default,
                       choices=flag.choices, nargs=flag.nargs if is_list else None,
                       metavar=flag.metavar, help=text)


def build_parser(prog: str, description: str, sections: Sequence[Section],
                 extras: Sequence[ExtraFlag] = (),
                 choices: Mapping[str, Tuple[Any, ...]] = {}) -> argparse.ArgumentParser:
    """The argparse parser of a tool. ``choices`` fills in choices known only above the configs
    layer (``{"--kd-loss": registry names}``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    groups: Dict[str, Any] = {}
    for section in sections:
        group = groups.setdefault(section.title, parser.add_argument_group(section.title))
        for option in section_options(section):
            flag = option.flag
            if flag.name in choices:
                flag = dataclasses.replace(flag, choices=choices[flag.name])
            _add(group, flag, option.type, option.default, option.is_list)
        for switch in section.switches:
            _add(group, switch, bool, False)
    for extra in extras:
        group = groups.setdefault(extra.group, parser.add_argument_group(extra.group))
        _add(group, extra.flag, extra.type, extra.default)
    return parser


def section_values(section: Section, ns: argparse.Namespace) -> Dict[str, Any]:
    """``{field: value}`` of ``section`` from parsed flags (inverted switches flipped)."""
    values = {}
    for option in section_options(section):
        value = getattr(ns, option.flag.dest)
        values[option.field] = (not value) if option.flag.inverted else value
    return values


def missing_required(sections: Sequence[Section], ns: argparse.Namespace) -> List[str]:
    """``--X is required`` for every required option left unset."""
    return [f"{option.flag.name} is required" for section in sections
            for option in section_options(section)
            if option.flag.required and getattr(ns, option.flag.dest) is None]


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> frozenset:
    """Destinations of the flags given on the command line (not left at their defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            else:
                kwargs["nargs"] = action.nargs
            quiet.add_argument(*action.option_strings, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return frozenset(vars(known))


def _default_text(option: Option) -> str:
    if option.flag.default_text is not None:
        return option.flag.default_text
    if option.type is bool:
        return "off"
    if option.default is None:
        return "required" if option.flag.required else "none"
    return str(option.default)


def _meaning(flag: Flag) -> str:
    text = flag.help
    if flag.choices and not any(str(c) in text for c in flag.choices):
        text += f" ({', '.join(f'`{c}`' for c in flag.choices)})"
    bounds = flag.interval()
    if bounds and not flag.choices:
        text += f"; {bounds}"
    return text


def flags_markdown(sections: Sequence[Section], extras: Sequence[ExtraFlag] = (),
                   choices: Mapping[str, Tuple[Any, ...]] = {}) -> str:
    """The tool's flags as a markdown table ``| flag | default | meaning |``, by group."""
    rows: Dict[str, List[str]] = {}
    for section in sections:
        lines = rows.setdefault(section.title, [])
        for option in section_options(section):
            flag = dataclasses.replace(option.flag, choices=choices.get(option.flag.name,
                                                                        option.flag.choices))
            lines.append(f"| `{flag.name}` | {_default_text(option)} | {_meaning(flag)} |")
        for switch in section.switches:
            lines.append(f"| `{switch.name}` | off | {_meaning(switch)} |")
    for extra in extras:
        option = Option(extra.flag.dest, extra.flag, extra.type, extra.default)
        rows.setdefault(extra.group, []).append(
            f"| `{extra.flag.name}` | {_default_text(option)} | {_meaning(extra.flag)} |")
    out = ["| flag | default | meaning |", "|---|---|---|"]
    for title, lines in rows.items():
        out.append(f"| **{title}** | | |")
        out += lines
    return "\n".join(out) + "\n"

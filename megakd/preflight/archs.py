"""Student and teacher architectures: from a checkpoint's ``megakd_model.json`` when the run
loads one, from the model flags otherwise.

With ``--load`` / ``--pretrained-checkpoint`` (student) or ``--teacher-load`` (teacher) naming a
checkpoint that carries ``megakd_model.json``, that model's architecture comes from the file and
its flags may be left out; flags that are given must agree with it. Without one, the student's
architecture comes from its flags, and each teacher field left unset takes the student's value
(the teacher's FFN width defaults to 4 x its own hidden size when ``--teacher-hidden-size`` is
given, its head dim to hidden / heads when its hidden size or heads are given).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from megakd.configs import ConfigError, Flag, ModelArchConfig, field_flag
from megakd.configs.model import TRAINING_ONLY_FIELDS
from megakd.formats.checkpoints import resolve_checkpoint_dir
from megakd.formats.model_metadata import arch_from_metadata, read_model_metadata

GROUP_QUERY_ATTENTION = Flag(name="--group-query-attention",
                             help="grouped-query attention (with --num-query-groups)")
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")
# Fields compared through their resolved values (an unset query-group count means MHA).
_RESOLVED = {"num_query_groups": "query_groups", "kv_channels": "head_dim"}


def stored_model_metadata(path: Optional[str], flag: str) -> Optional[dict]:
    """The ``megakd_model.json`` of the checkpoint a ``--load``-style flag names, or None when
    the flag is unset, the directory does not exist (checked elsewhere), holds no checkpoint
    yet, or the checkpoint predates metadata."""
    if path is None or not os.path.isdir(path):
        return None
    try:
        metadata = read_model_metadata(resolve_checkpoint_dir(path, flag))
        if metadata is not None:
            arch_from_metadata(metadata, f"{flag} {path}")
    except ConfigError:
        return None  # not (yet) a checkpoint: the checkpoint checks report what is wrong
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{flag} {path}: unreadable megakd_model.json ({error})") from error
    return metadata


def _resolved(arch: ModelArchConfig, name: str) -> Any:
    return getattr(arch, _RESOLVED.get(name, name))


def arch_from_checkpoint(metadata: dict, flag: str, explicit: Mapping[str, Any],
                         teacher: bool, vocab_size: Optional[int]) -> ModelArchConfig:
    """The architecture stored in ``metadata``; every explicitly given model flag (``explicit``:
    field -> value) must agree with it, or a ConfigError names each disagreeing flag. Flags of
    ``TRAINING_ONLY_FIELDS`` (the MoE router loss) are the run's to choose and override."""
    stored, _, _ = arch_from_metadata(metadata, flag)
    errors = []
    for name, value in explicit.items():
        if name in TRAINING_ONLY_FIELDS:  # the run's choice (the router loss), not the model's
            continue
        given = dataclasses.replace(stored, **{name: value})
        if _resolved(given, name) != _resolved(stored, name):
            declared = field_flag(ModelArchConfig, name)
            option = declared.teacher_variant().name if teacher else declared.name
            shown = (not value) if declared.inverted else value
            errors.append(f"{option}={shown} disagrees with {flag}'s stored architecture "
                          f"({name}={getattr(stored, name)})")
    if errors:
        raise ConfigError("; ".join(errors))
    chosen = {name: value for name, value in explicit.items() if name in TRAINING_ONLY_FIELDS}
    return dataclasses.replace(stored, vocab_size=vocab_size, **chosen)


def student_from_flags(values: Dict[str, Any], group_query_attention: bool,
                       vocab_size: Optional[int], unstored: str = "") -> ModelArchConfig:
    """The student from its model flags; ``unstored`` says why the checkpoint flags given
    (if any) supplied no architecture, for the message when a flag is missing."""
    missing = [field_flag(ModelArchConfig, name).name for name in _REQUIRED
               if values.get(name) is None]
    if missing:
        raise ConfigError(f"{missing[0]} is required (or load a checkpoint that stores the "
                          f"architecture{unstored})")
    if group_query_attention and values.get("num_query_groups") is None:
        raise ConfigError("--group-query-attention needs --num-query-groups")
    return ModelArchConfig(**values, vocab_size=vocab_size)


def teacher_from_flags(given: Dict[str, Any], student: ModelArchConfig) -> ModelArchConfig:
    """The teacher from its ``--teacher-*`` flags (``given``: field -> value, unset None),
    every unset field taking the student's value, except the derived ones (see module doc)."""
    values = {name: (student_value if given.get(name) is None else given[name])
              for name, student_value in dataclasses.asdict(student).items()}
    own_width = given.get("hidden_size") is not None
    if given.get("ffn_hidden_size") is None and own_width:
        values["ffn_hidden_size"] = None  # 4 x its own hidden size
    if given.get("kv_channels") is None and (own_width or
                                             given.get("num_attention_heads") is not None):
        values["kv_channels"] = None  # hidden / heads
    return ModelArchConfig(**values)


def _first_stored(checkpoints: Sequence[Tuple[str, Optional[str]]]
                  ) -> Tuple[Optional[dict], Optional[str]]:
    """The first ``(metadata, flag)`` among ``(flag, path)`` candidates that stores one."""
    for flag, path in checkpoints:
        stored = stored_model_metadata(path, flag)
        if stored is not None:
            return stored, flag
    return None, None


def _unstored(checkpoints: Sequence[Tuple[str, Optional[str]]]) -> str:
    """``": --load X does not exist"``-style detail for the checkpoint flags that were given."""
    given = [(flag, path) for flag, path in checkpoints if path is not None]
    return "".join(f"; {flag} {path} " + ("does not exist" if not os.path.isdir(path)
                                          else "holds none")
                   for flag, path in given)


def resolve_archs(student_values: Optional[Dict[str, Any]],
                  teacher_values: Optional[Dict[str, Any]], explicit: Mapping[str, Dict[str, Any]],
                  group_query_attention: bool,
                  student_checkpoints: Sequence[Tuple[str, Optional[str]]],
                  teacher_checkpoints: Sequence[Tuple[str, Optional[str]]],
                  vocab_size: Optional[int]
                  ) -> Tuple[Optional[ModelArchConfig], Optional[ModelArchConfig]]:
    """(student, teacher) architectures. ``*_values``: field -> flag value (None: the tool has
    no such model); ``explicit["student"|"teacher"]``: the fields given on the command line;
    ``*_checkpoints``: (flag, path) candidates to read ``megakd_model.json`` from, in order."""
    student = None
    if student_values is not None:
        stored, flag = _first_stored(student_checkpoints)
        if stored is not None:
            student = arch_from_checkpoint(stored, flag, explicit["student"], False, vocab_size)
        else:
            student = student_from_flags(student_values, group_query_attention, vocab_size,
                                         _unstored(student_checkpoints))
    teacher = None
    if teacher_values is not None:
        stored, flag = _first_stored(teacher_checkpoints)
        if stored is not None:
            teacher = arch_from_checkpoint(stored, flag, explicit["teacher"], True, vocab_size)
        elif student is not None:
            teacher = teacher_from_flags(teacher_values, student)
        else:
            names = " or ".join(flag for flag, _ in teacher_checkpoints) or "--teacher-load"
            raise ConfigError(f"{names} must name a checkpoint that stores the model's "
                              "architecture (megakd_model.json)")
    return student, teacher

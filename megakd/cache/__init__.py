"""Offline teacher: the teacher's top-k precomputed once, read by many student runs.

Format: docs/teacher_cache.md. Writer: :mod:`megakd.cache.precompute`
(``tools/precompute_teacher_topk.py``); reader: :class:`TeacherCache` and the teacher source
:class:`CachedTeacher` that ``--teacher-cache`` puts in place of the live teacher.
"""

from megakd.cache.bitpack import index_bits, pack_ids, unpack_ids
from megakd.cache.manifest import CacheManifest
from megakd.cache.reader import CachedTeacher, CacheMismatchError, TeacherCache
from megakd.cache.records import RecordLayout, token_fingerprint
from megakd.cache.shards import CacheCorruptionError

__all__ = [
    "CacheCorruptionError",
    "CacheManifest",
    "CacheMismatchError",
    "CachedTeacher",
    "RecordLayout",
    "TeacherCache",
    "index_bits",
    "pack_ids",
    "token_fingerprint",
    "unpack_ids",
]

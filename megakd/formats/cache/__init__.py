"""The offline teacher cache's format and I/O: the teacher's top-k precomputed once, read by
many student runs (docs/teacher_cache.md).

Writer: :mod:`megakd.distill.precompute` (``tools/precompute_teacher_topk.py``); reader:
:class:`TeacherCache`, wrapped by the teacher source
:class:`megakd.distill.teachers.CachedTeacher` that ``--teacher-cache`` puts in place of the
live teacher.
"""

from megakd.formats.cache.bitpack import index_bits, pack_ids, unpack_ids
from megakd.formats.cache.manifest import CacheManifest
from megakd.formats.cache.reader import TeacherCache
from megakd.formats.cache.records import RecordLayout, token_fingerprint
from megakd.formats.cache.shards import CacheCorruptionError

__all__ = [
    "CacheCorruptionError",
    "CacheManifest",
    "RecordLayout",
    "TeacherCache",
    "index_bits",
    "pack_ids",
    "token_fingerprint",
    "unpack_ids",
]

"""Stand-in of modules/cache.py (v1.10.1): `cache(subsection)`, a mapping per subsection.

The real one keeps each subsection in a diskcache.Cache under `data_path/cache/`
(diskcache is not installed here); the stand-in keeps plain dicts for the life of the
process, which is all the extension can observe through `modules.hashes`.
"""
import threading

caches = {}
cache_lock = threading.Lock()


def dump_cache():
    """Does nothing, as in the real one since diskcache."""


def cache(subsection):
    with cache_lock:
        return caches.setdefault(subsection, {})

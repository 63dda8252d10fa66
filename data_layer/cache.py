"""The preprocessing cache on disk: one `<key>.pt` file per decoded dataset, capped in size.

The cap is `DPA_CACHE_MAX_GB` (default 5 GB). After an entry is written, the least recently used
entries (a hit refreshes an entry's modification time) are deleted until the cache fits. An
entry in use is never evicted: a reader holds a shared lock (flock) on the file while it loads
it, and eviction only deletes an entry whose exclusive lock it gets without waiting. Entries
appear by rename, so a reader never sees a half-written one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

MAX_GB_ENV = "DPA_CACHE_MAX_GB"
DEFAULT_MAX_GB = 5.0
SUFFIX = ".pt"

log = logging.getLogger(__name__)


def max_cache_bytes() -> int:
    """The cap from $DPA_CACHE_MAX_GB (GB = 10^9 bytes)."""
    raw = os.environ.get(MAX_GB_ENV, str(DEFAULT_MAX_GB))
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes > 0:
        raise ValueError(f"{MAX_GB_ENV}={raw!r}: give the cache size cap in GB as a positive number, e.g. 5 or 0.5")
    return int(gigabytes * 1e9)


@contextmanager
def open_entry(file: Path) -> Iterator[IO[bytes] | None]:
    """The entry opened for reading under a shared lock (None on a miss); its use refreshes its LRU time."""
    try:
        handle = open(file, "rb")
    except FileNotFoundError:
        yield None
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            os.utime(handle.fileno())
        except PermissionError:  # a shared cache written by another user: still readable
            pass
        yield handle


def load_entry(file: Path) -> Any | None:
    """The cached payload, or None on a miss."""
    with open_entry(file) as handle:
        return None if handle is None else torch.load(handle, weights_only=True)


def save_entry(payload: Any, file: Path, max_bytes: int | None = None) -> None:
    """Write atomically (temp file + rename), then evict least recently used entries beyond the cap."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    evict(file.parent, max_cache_bytes() if max_bytes is None else max_bytes, keep=file)


def evict(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete least recently used entries until the cache holds at most `max_bytes`; never `keep`
    (the entry just written, about to be used) nor an entry another process is reading. Returns
    the deleted entries."""
    entries = []
    for file in cache_dir.glob(f"*{SUFFIX}"):
        try:
            stat = file.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        entries.append((stat.st_mtime_ns, stat.st_size, file))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, file in sorted(entries):
        if total <= max_bytes:
            break
        if file != keep and _delete_unless_in_use(file):
            total -= size
            deleted.append(file)
    if deleted:
        log.info("preprocessing cache over %.2f GB: evicted %d least recently used entries", max_bytes / 1e9, len(deleted))
    if total > max_bytes:
        log.warning("preprocessing cache holds %.2f GB, over its %.2f GB cap (%s): the rest is in use", total / 1e9, max_bytes / 1e9, MAX_GB_ENV)
    return deleted


def _delete_unless_in_use(file: Path) -> bool:
    try:
        handle = open(file, "rb")
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        file.unlink(missing_ok=True)
        return True

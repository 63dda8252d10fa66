"""The bounded preprocessing cache: LRU eviction by size, never an entry another process is
reading, never the entry just written; the cap from DPA_CACHE_MAX_GB; through preprocess_dataset."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data_layer.cache import evict, load_entry, max_cache_bytes, save_entry
from data_layer.phantoms import PhantomSpec, generate_phantoms
from data_layer.preprocessing import PreprocessConfig, preprocess_dataset

REPO = Path(__file__).resolve().parents[2]


def entry(cache: Path, name: str, mtime: int, n: int = 10_000) -> Path:
    """A cache entry of ~n bytes last used at `mtime` (seconds)."""
    file = cache / f"{name}.pt"
    save_entry({"images": torch.full((n,), mtime, dtype=torch.int32)}, file, max_bytes=10**12)
    os.utime(file, (mtime, mtime))
    return file


def test_least_recently_used_entries_go_first_and_a_hit_refreshes(tmp_path: Path) -> None:
    a, b, c = (entry(tmp_path, name, mtime) for name, mtime in (("a", 100), ("b", 200), ("c", 300)))
    assert load_entry(a)["images"][0] == 100  # a is now the most recently used
    size = a.stat().st_size
    deleted = evict(tmp_path, max_bytes=2 * size)
    assert deleted == [b] and a.is_file() and c.is_file()
    assert load_entry(b) is None  # a miss, not an error


def test_an_entry_being_read_by_another_process_is_never_evicted(tmp_path: Path) -> None:
    old, newer, newest = (entry(tmp_path, name, mtime) for name, mtime in (("old", 100), ("newer", 200), ("newest", 300)))
    reader = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from data_layer.cache import open_entry
        with open_entry(Path({str(old)!r})) as handle:
            print("reading", flush=True)
            sys.stdin.readline()
    """)
    process = subprocess.Popen([sys.executable, "-c", reader], env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "reading"
        os.utime(old, (100, 100))  # the reader's use refreshed it; make it the oldest again
        deleted = evict(tmp_path, max_bytes=2 * old.stat().st_size)
        assert deleted == [newer] and old.is_file()  # the in-use oldest is skipped, the next one goes
    finally:
        process.communicate("done\n", timeout=30)
    assert process.returncode == 0
    assert evict(tmp_path, max_bytes=old.stat().st_size) == [old]  # released: now it can go
    assert newest.is_file()


def test_the_entry_just_written_stays_even_over_the_cap(tmp_path: Path) -> None:
    entry(tmp_path, "old", 100)
    new = tmp_path / "new.pt"
    save_entry({"images": torch.zeros(50_000, dtype=torch.uint8)}, new, max_bytes=1000)
    assert [p.name for p in tmp_path.glob("*.pt")] == ["new.pt"]


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_the_cap_must_be_a_positive_number(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DPA_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match="DPA_CACHE_MAX_GB"):
        max_cache_bytes()


def test_preprocess_dataset_keeps_the_cache_under_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = generate_phantoms(tmp_path / "phantoms", PhantomSpec(n_train_normal=8, n_val_normal=2, n_test_normal=2,
                                                                    n_val_abnormal=2, n_test_abnormal=2, size=32))
    cache = tmp_path / "cache"
    first = preprocess_dataset(dataset, PreprocessConfig(size=16), cache, "v1")
    entry_bytes = next(cache.glob("*.pt")).stat().st_size
    monkeypatch.setenv("DPA_CACHE_MAX_GB", str(1.5 * entry_bytes / 1e9))
    preprocess_dataset(dataset, PreprocessConfig(size=16, equalize=True), cache, "v1")
    assert len(list(cache.glob("*.pt"))) == 1  # the first entry was evicted for the second
    again = preprocess_dataset(dataset, PreprocessConfig(size=16), cache, "v1")
    assert not again.from_cache and torch.equal(again.images, first.images)
    assert len(list(cache.glob("*.pt"))) == 1

"""The sandbox's cached Postgres data directories (runbook_sandbox/pgdata_cache.py): their key, and
pruning: what older builds and other checkouts left behind goes, what is in use or being built stays."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

from runbook_sandbox import pgdata_cache


def test_the_key_names_the_installed_prefect_and_reads_the_distributions_once_per_process(tmp_path, monkeypatch):
    """`entry()` is polled while a build runs: the key must not read every distribution's metadata again
    at each call (~80 ms of CPU), and it still names what is installed."""
    reads = []
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda *a, **kw: reads.append(1) or real(*a, **kw))
    monkeypatch.setenv(pgdata_cache.CACHE_ENV, str(tmp_path))
    pgdata_cache._prefect_distributions.cache_clear()
    try:
        keys = {pgdata_cache.cache_key("postgres") for _ in range(5)}
        assert [pgdata_cache.entry("postgres") for _ in range(5)] == [None] * 5  # an empty cache
        inputs = pgdata_cache.key_inputs("postgres")
    finally:
        pgdata_cache._prefect_distributions.cache_clear()
    assert len(keys) == 1 and len(reads) == 1
    assert inputs["prefect"]["prefect"] == importlib.metadata.version("prefect")
    assert inputs["superuser"] == "postgres" and pgdata_cache.cache_key("pgserver") not in keys


def _entry(root, key: str, used_at: float) -> None:
    (root / key / "pgdata").mkdir(parents=True)
    (root / key / "pgdata" / "PG_VERSION").write_text("16\n")
    marker = root / key / pgdata_cache.MARKER
    marker.write_text(json.dumps({"key": {}}))
    os.utime(marker, (used_at, used_at))
    (root / f"{key}.lock").touch()


def test_prune_keeps_the_current_key_and_the_most_recently_used_others(tmp_path, monkeypatch):
    monkeypatch.setenv(pgdata_cache.CACHE_ENV, str(tmp_path))
    for i in range(6):
        _entry(tmp_path, f"old{i}", used_at=1_000_000 + i)
    _entry(tmp_path, "current", used_at=1)  # the oldest, but the key being built: kept

    removed = pgdata_cache.prune(keep="current")

    kept = pgdata_cache.KEEP_ENTRIES
    assert sorted(removed) == [f"old{i}" for i in range(6 - kept)]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["current", "current.lock"] + [n for i in range(6 - kept, 6) for n in (f"old{i}", f"old{i}.lock")])


def test_prune_leaves_an_entry_whose_lock_is_held(tmp_path, monkeypatch):
    """Another process holds an entry's lock (it is rebuilding it): not removed, however old."""
    monkeypatch.setenv(pgdata_cache.CACHE_ENV, str(tmp_path))
    for i in range(pgdata_cache.KEEP_ENTRIES + 1):
        _entry(tmp_path, f"k{i}", used_at=1_000_000 + i)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(tmp_path / "k0.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert pgdata_cache.prune(keep="none") == []
        assert (tmp_path / "k0" / pgdata_cache.MARKER).exists()
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert pgdata_cache.prune(keep="none") == ["k0"]


def test_prune_removes_partial_directories_of_builders_that_are_gone(tmp_path, monkeypatch):
    monkeypatch.setenv(pgdata_cache.CACHE_ENV, str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"abc.partial-{int(dead.stdout)}"
    alive = tmp_path / f"abc.partial-{os.getpid()}"
    for path in (gone, alive):
        (path / "pgdata").mkdir(parents=True)

    assert pgdata_cache.prune(keep="abc") == [gone.name]
    assert alive.exists() and not gone.exists()


def test_prune_cuts_the_build_log_to_its_tail(tmp_path, monkeypatch):
    monkeypatch.setenv(pgdata_cache.CACHE_ENV, str(tmp_path))
    lines = [f"pgdata cache k: built in {i}.0s\n" for i in range(60_000)]
    (tmp_path / "build.log").write_text("".join(lines))

    pgdata_cache.prune(keep="k")

    text = (tmp_path / "build.log").read_text()
    assert len(text.encode()) <= pgdata_cache.LOG_KEEP_BYTES
    assert text.endswith(lines[-1]) and text.startswith("pgdata cache k: built in ")  # whole lines only

"""The artifact cache with fake builds (no export): stale staging folders, and what the key covers."""

from __future__ import annotations

import threading
from pathlib import Path

import et_transformers.cache as cache_module
from et_transformers import ExportConfig
from et_transformers.cache import ArtifactCache
from et_transformers.hub import ModelSource
from et_transformers.manifest import PTE_NAME, Manifest, sha256_file

KEY_A, KEY_B, KEY_C = ("a" * 64, "b" * 64, "c" * 64)


class FakeBuild:
    """Writes a valid model folder (a dummy ``.pte`` + its manifest) and counts its calls."""

    def __init__(self, before_writing=None):
        self.calls = 0
        self.before_writing = before_writing

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        (folder / PTE_NAME).write_bytes(b"partial")
        if self.before_writing is not None:
            self.before_writing(folder)
        (folder / PTE_NAME).write_bytes(b"ET12" * 64)
        pte = folder / PTE_NAME
        Manifest({}, {}, sha256_file(pte), pte.stat().st_size).write(folder)


def killed_build(cache: ArtifactCache, key: str) -> Path:
    """What an export killed with SIGKILL leaves: a staging folder with a half-written .pte, no lock."""
    staging = cache.root / "tmp" / f"{key}-k1ll3d"
    staging.mkdir(parents=True)
    (staging / PTE_NAME).write_bytes(b"half a program")
    return staging


def test_the_next_build_removes_stale_staging_folders(tmp_path):
    cache = ArtifactCache(tmp_path)
    own, other = killed_build(cache, KEY_A), killed_build(cache, KEY_B)
    trash = cache.root / "tmp" / f"trash-{KEY_C}-123"
    trash.mkdir()
    build = FakeBuild()
    entry, built = cache.get_or_build(KEY_A, build)
    assert built and build.calls == 1 and entry.pte_path.read_bytes().startswith(b"ET12")
    assert not own.exists() and not other.exists() and not trash.exists()
    assert list((cache.root / "tmp").iterdir()) == []


def test_a_concurrent_build_of_another_key_keeps_its_staging_folder(tmp_path):
    cache = ArtifactCache(tmp_path)
    started, release = threading.Event(), threading.Event()
    live: list[Path] = []

    def wait_inside_the_build(folder: Path) -> None:
        live.append(folder)
        started.set()
        assert release.wait(60)

    slow, quick = FakeBuild(wait_inside_the_build), FakeBuild()
    results = []
    worker = threading.Thread(target=lambda: results.append(cache.get_or_build(KEY_A, slow)))
    worker.start()
    try:
        assert started.wait(60)
        stale = killed_build(cache, KEY_C)
        assert ArtifactCache(tmp_path).get_or_build(KEY_B, quick)[1]  # another object: its own lock handles
        assert live[0].exists() and (live[0] / PTE_NAME).read_bytes() == b"partial"  # still being written
        assert not stale.exists()
    finally:
        release.set()
        worker.join(60)
    assert results and results[0][1] and (slow.calls, quick.calls) == (1, 1)
    assert cache.get(KEY_A) is not None and cache.get(KEY_B) is not None


def _key(tmp_path) -> str:
    source = ModelSource(path=tmp_path, repo_id="org/model", revision="0" * 40)
    return ArtifactCache(tmp_path).key_for(source, ExportConfig())


def test_the_key_covers_the_exporter_source(tmp_path, monkeypatch):
    assert cache_module.exporter_source_hash() is not None  # this is a development checkout
    monkeypatch.setattr(cache_module, "exporter_source_hash", lambda: "exporter-1")
    first = _key(tmp_path)
    assert _key(tmp_path) == first
    monkeypatch.setattr(cache_module, "exporter_source_hash", lambda: "exporter-2")
    assert _key(tmp_path) != first


def test_the_key_covers_our_package_version(tmp_path, monkeypatch):
    real = cache_module.stack_versions()
    first = _key(tmp_path)
    monkeypatch.setattr(cache_module, "stack_versions", lambda: {**real, "et-transformers": "99.0"})
    assert _key(tmp_path) != first

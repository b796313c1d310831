"""Content-addressed, atomic, locked store of exported models.

An entry is a complete model folder (``model.pte``, ``manifest.json``, config, generation config,
tokenizer files) stored under ``<root>/models/<key>``, where the key hashes what the program was
built from: the source identity (repo id + resolved commit, or the sha256 of every local model
file), the ``ExportConfig``, the versions of the stack including et_transformers' own and, in a
development checkout, the exporter's source (:func:`exporter_source_hash`), so a fixed exporter
never serves what the old one built. Entries are built in a staging folder ``<root>/tmp/<key>-*``
and renamed into place, so a killed export leaves no entry; a per-key file lock makes concurrent
processes build once and share the result, and tells a killed build's staging folder (its key's
lock is free) from a live one's: each build, once it holds its lock, removes the stale ones. Every
read checks the ``.pte`` and rebuilds a corrupted entry rather than loading it. The check on read is size + CRC-32
(recorded when the entry was stored, right after the manifest's sha256 was verified): it catches
any flipped byte or truncation at a tenth of the cost of re-hashing with sha256 on every load.

The root is ``$ET_TRANSFORMERS_CACHE`` if set, else ``$HF_HOME/et_transformers`` (HF_HOME defaults
to ``~/.cache/huggingface``), or the ``cache_dir`` a caller passes. This module imports neither
torch nor ExecuTorch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CacheError, ProgramError
from .manifest import PTE_NAME, Manifest, sha256_file, stack_versions

logger = logging.getLogger(__name__)

ENV_VAR = "ET_TRANSFORMERS_CACHE"
_LAST_USED = ".last_used"
_INTEGRITY = ".integrity.json"
#: Stack packages whose versions are part of the key (a new version builds a new program).
_KEY_PACKAGES = ("et-transformers", "torch", "executorch", "torchao", "transformers")


#: Modules that shape the program (relative to the package): hashed into keys in a development checkout.
_EXPORTER_SOURCES = ("export/*.py", "kernels/ops.py", "data/calibration.txt", "config.py", "architectures.py", "manifest.py", "tokenization.py")


@functools.lru_cache(maxsize=1)
def exporter_source_hash() -> str | None:
    """sha256 of the exporter's source (:data:`_EXPORTER_SOURCES`) in a development checkout.

    A released package is identified by its version, which is in the key already; a git checkout
    keeps one version while its exporter changes, so its source is hashed too.

    Returns:
        The hex digest, or ``None`` when the package is not in a git work tree.
    """
    package = Path(__file__).resolve().parent
    if not (package.parent / ".git").exists():
        return None
    digest = hashlib.sha256()
    for pattern in _EXPORTER_SOURCES:
        for path in sorted(package.glob(pattern)):
            digest.update(f"{path.relative_to(package).as_posix()}\0{len(path.read_bytes())}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """The cache root: ``$ET_TRANSFORMERS_CACHE``, else ``$HF_HOME/et_transformers``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home).expanduser() / "et_transformers"


@dataclass(frozen=True)
class Entry:
    """One stored model folder.

    Attributes:
        key: the content key.
        path: the entry folder.
        manifest: its manifest.
    """

    key: str
    path: Path
    manifest: Manifest

    @property
    def pte_path(self) -> Path:
        """Path of the entry's ``model.pte``."""
        return self.path / PTE_NAME

    @property
    def size(self) -> int:
        """Bytes used by the entry's files."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    @property
    def last_used(self) -> float:
        """Unix time the entry was last returned by :meth:`ArtifactCache.get`."""
        marker = self.path / _LAST_USED
        return marker.stat().st_mtime if marker.exists() else self.path.stat().st_mtime


class ArtifactCache:
    """The store of exported models under ``root`` (see the module docstring).

    Args:
        root: cache root; :func:`default_cache_dir` when ``None``.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    @property
    def models_dir(self) -> Path:
        """Where entries live."""
        return self.root / "models"

    def _ensure_dirs(self) -> None:
        try:
            for sub in ("models", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(
                f"cannot create the cache at {self.root} ({e}); set {ENV_VAR} or pass cache_dir= to a "
                f"writable folder."
            ) from e

    # -- keys ----------------------------------------------------------------------------

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file, memoised by (path, size, mtime) in ``<root>/file_hashes.json``."""
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo_path = self.root / "file_hashes.json"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
        if memo_key in memo:
            return memo[memo_key]
        digest = sha256_file(path)
        memo[memo_key] = digest
        try:
            self._ensure_dirs()
            _atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
        except (OSError, CacheError):
            pass  # the memo only saves time
        return digest

    def source_identity(self, source) -> dict[str, Any]:
        """What identifies a source's weights: repo id + commit, or the hashes of its files."""
        if source.repo_id and source.revision:
            return {"repo_id": source.repo_id, "revision": source.revision, "subfolder": source.subfolder,
                    "gguf_file": source.gguf_file}
        files = source.model_files()
        if not files:
            raise CacheError(f"{source.path} holds no model files to identify.")
        return {"files": {str(p.relative_to(source.path)): self.file_sha256(p) for p in files}}

    def key_for(self, source, export_config) -> str:
        """The content key of the program ``export_config`` would build from ``source``: it hashes
        the source identity, the config, the stack's versions and :func:`exporter_source_hash`."""
        versions = stack_versions()
        payload = {
            "source": self.source_identity(source),
            "export_config": export_config.to_dict(),
            "versions": {k: versions.get(k) for k in _KEY_PACKAGES},
            "exporter_source": exporter_source_hash(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # -- entries -------------------------------------------------------------------------

    def _lock(self, key: str):
        from filelock import FileLock

        self._ensure_dirs()
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def _remove_stale_staging(self, held_key: str | None = None) -> list[str]:
        """Remove the staging folders no live build owns; returns their names.

        A staging folder is named after its key, and its build holds that key's lock until it ends:
        a folder of ``held_key`` (whose lock the caller holds) is stale, another key's is stale when
        its lock can be taken at once (the process that made it is gone), and it is removed under
        that lock. Leftovers of :meth:`_discard` (``trash-*``) are stale; folders of an older layout
        once they are an hour old.
        """
        from filelock import Timeout

        removed = []
        tmp = self.root / "tmp"
        for folder in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            key = folder.name.rsplit("-", 1)[0]
            if folder.name.startswith("trash-") or key == held_key:
                shutil.rmtree(folder, ignore_errors=True)
            elif len(key) == 64:
                try:
                    with self._lock(key).acquire(timeout=0):
                        shutil.rmtree(folder, ignore_errors=True)
                except Timeout:
                    continue  # a live build is writing it
            elif time.time() - folder.stat().st_mtime > 3600:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                continue
            removed.append(folder.name)
        if removed:
            logger.info("Removed %d staging folder(s) of interrupted builds: %s", len(removed), ", ".join(removed))
        return removed

    def get(self, key: str) -> Entry | None:
        """The verified entry for ``key``, or ``None``. A corrupted entry is logged and removed."""
        path = self.models_dir / key
        if not path.is_dir():
            return None
        try:
            manifest = Manifest.read(path)
            _verify_integrity(path, manifest)
        except ProgramError as e:
            logger.warning("Cache entry %s is corrupted and will be rebuilt: %s", key[:12], e)
            self._discard(path)
            return None
        try:
            (path / _LAST_USED).touch()
        except OSError:
            pass
        return Entry(key, path, manifest)

    def get_or_build(self, key: str, build: Callable[[Path], Any], *, rebuild: bool = False) -> tuple[Entry, bool]:
        """Return the entry for ``key``, building it with ``build(folder)`` when missing.

        Args:
            key: the content key.
            build: writes a complete model folder into the (empty, temporary) folder it is given.
            rebuild: build even if a valid entry exists (``force_export``).

        Returns:
            ``(entry, built)``; ``built`` is True when this call ran ``build``.

        Raises:
            CacheError: the cache is not writable, or ``build`` produced no valid folder.
        """
        if not rebuild:
            entry = self.get(key)
            if entry is not None:
                return entry, False
        with self._lock(key):
            if not rebuild:  # another process may have built it while we waited
                entry = self.get(key)
                if entry is not None:
                    return entry, False
            self._remove_stale_staging(key)
            staging = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=self.root / "tmp"))
            try:
                build(staging)
                manifest = Manifest.read(staging)
                manifest.verify_pte(staging / PTE_NAME)
                _write_integrity(staging)
                final = self.models_dir / key
                if final.exists():
                    self._discard(final)
                os.replace(staging, final)
            except ProgramError as e:
                raise CacheError(f"the export for cache entry {key[:12]} produced an invalid folder: {e}") from e
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        entry = self.get(key)
        if entry is None:
            raise CacheError(f"cache entry {key[:12]} vanished right after it was built.")
        return entry, True

    def _discard(self, path: Path) -> None:
        # Rename first so a concurrent reader never sees a half-deleted folder.
        trash = self.root / "tmp" / f"trash-{path.name}-{time.time_ns()}"
        try:
            self._ensure_dirs()
            os.replace(path, trash)
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """All valid-looking entries (manifest readable), most recently used first."""
        found = []
        if self.models_dir.is_dir():
            for path in self.models_dir.iterdir():
                try:
                    found.append(Entry(path.name, path, Manifest.read(path)))
                except ProgramError:
                    continue
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def remove(self, key_prefix: str) -> list[str]:
        """Remove entries whose key starts with ``key_prefix``; return the removed keys."""
        if len(key_prefix) < 4:
            raise CacheError(f"key prefix {key_prefix!r} is too short; give at least 4 characters.")
        removed = []
        for entry in self.entries():
            if entry.key.startswith(key_prefix):
                self._discard(entry.path)
                removed.append(entry.key)
        return removed

    def prune(self, *, max_size_bytes: int | None = None, older_than_seconds: float | None = None) -> list[str]:
        """Remove entries unused for ``older_than_seconds`` and/or least-recently-used ones until the
        total size is at most ``max_size_bytes``; also clears leftovers of interrupted builds.
        Returns the removed keys."""
        removed = []
        now = time.time()
        self._remove_stale_staging()
        entries = self.entries()
        if older_than_seconds is not None:
            for entry in list(entries):
                if now - entry.last_used > older_than_seconds:
                    self._discard(entry.path)
                    removed.append(entry.key)
                    entries.remove(entry)
        if max_size_bytes is not None:
            sizes = {e.key: e.size for e in entries}
            total = sum(sizes.values())
            for entry in reversed(entries):  # least recently used first
                if total <= max_size_bytes:
                    break
                self._discard(entry.path)
                removed.append(entry.key)
                total -= sizes[entry.key]
        return removed


def _crc32_file(path: Path) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_integrity(folder: Path) -> None:
    pte = folder / PTE_NAME
    record = {"size": pte.stat().st_size, "crc32": _crc32_file(pte)}
    (folder / _INTEGRITY).write_text(json.dumps(record))


def _verify_integrity(folder: Path, manifest: Manifest) -> None:
    """Size + CRC-32 check of the entry's ``.pte`` (full sha256 when no record exists)."""
    pte = folder / PTE_NAME
    try:
        record = json.loads((folder / _INTEGRITY).read_text())
    except (OSError, ValueError):
        manifest.verify_pte(pte)
        return
    if not pte.is_file():
        raise ProgramError(f"{pte} is missing.")
    size = pte.stat().st_size
    if size != record["size"] or size != manifest.pte_size:
        raise ProgramError(f"{pte} has {size} bytes but was stored with {record['size']}: truncated or replaced.")
    if _crc32_file(pte) != record["crc32"]:
        raise ProgramError(f"{pte} does not match the checksum it was stored with: the file is corrupted.")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)

"""The manifest that travels with every ``.pte``: what it was built from, with what, and its hash.

A model folder written by the exporter (and by ``save_pretrained``) holds ``model.pte`` and
``manifest.json``. The manifest records the export config, the source (repo id and resolved
revision, or hashes of local files), the sha256 and size of the ``.pte``, the versions of the
stack that built it and, when measured, size/speed/quality figures. This module owns its schema,
reading, writing and verification (the hash, and whether the installed runtime may run the
program), and the stack-version probe; it imports neither torch nor ExecuTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

from .errors import ProgramError

MANIFEST_NAME = "manifest.json"
PTE_NAME = "model.pte"
#: The ETRecord ``export --etrecord`` writes beside the ``.pte`` (read by profiling).
ETRECORD_NAME = "etrecord.bin"
#: Bumped when the program's calling convention or the manifest schema changes.
FORMAT_VERSION = 1

#: Distributions whose versions decide what a ``.pte`` contains and whether a runtime can run it.
STACK_PACKAGES: tuple[str, ...] = (
    "et-transformers",
    "torch",
    "executorch",
    "torchao",
    "transformers",
    "optimum",
    "huggingface-hub",
    "safetensors",
    "tokenizers",
    "gguf",
)

_HASH_CHUNK = 1 << 22


def stack_versions() -> dict[str, str | None]:
    """Return ``{distribution: version}`` for :data:`STACK_PACKAGES` (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for name in STACK_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    """Contents of ``manifest.json``.

    Attributes:
        export_config: ``ExportConfig.to_dict()`` of the build.
        source: where the weights came from: ``{"repo_id", "revision"}`` for the Hub, or
            ``{"path", "files": {name: sha256}}`` for local folders and GGUF files.
        pte_sha256: hex sha256 of ``model.pte``.
        pte_size: size of ``model.pte`` in bytes.
        versions: :func:`stack_versions` at build time.
        model_type: the Hugging Face ``model_type`` of the source.
        program: facts about the program (methods, metadata values) for humans and tools.
        metrics: measured figures (size, speed, quality) when known; optional.
        weight_bytes_per_token: bytes of weights one decode step reads (see
            :mod:`et_transformers.export.weight_bytes`); ``None`` in manifests older than it.
        format_version: :data:`FORMAT_VERSION` of the writer.
    """

    export_config: dict[str, Any]
    source: dict[str, Any]
    pte_sha256: str
    pte_size: int
    versions: dict[str, str | None] = field(default_factory=stack_versions)
    model_type: str | None = None
    program: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weight_bytes_per_token: int | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Serialise to indented JSON text."""
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``manifest.json`` into ``folder`` and return its path."""
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        """Read ``manifest.json`` from ``folder``.

        Raises:
            ProgramError: the file is missing, not JSON, or lacks required fields.
        """
        path = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            return cls(**known)
        except FileNotFoundError as e:
            raise ProgramError(f"{path} does not exist; the folder holds no exported model.") from e
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ProgramError(f"{path} is not a valid et_transformers manifest ({e}).") from e

    def check_runtime(self, installed: Mapping[str, str | None] | None = None, *, where: str = "the program") -> None:
        """Check that the installed stack can run this program, before loading it.

        ExecuTorch promises that a runtime runs programs exported by the same or an older release
        of its major version, not newer ones; the manifest format has its own version.

        Args:
            installed: ``{distribution: version}``; :func:`stack_versions` by default.
            where: how to name the program in messages (its path or repo).

        Raises:
            ProgramError: the manifest is newer than this et_transformers, executorch is missing,
                or the program was built by an ExecuTorch this runtime cannot be trusted with.
        """
        from packaging.version import InvalidVersion, Version

        if self.format_version > FORMAT_VERSION:
            raise ProgramError(
                f"{where} has manifest format {self.format_version}, newer than the {FORMAT_VERSION} this "
                f"et_transformers reads; upgrade et-transformers (the program was written by "
                f"{self.versions.get('et-transformers')})."
            )
        installed = stack_versions() if installed is None else installed
        built, have = self.versions.get("executorch"), installed.get("executorch")
        if have is None:
            raise ProgramError(
                f"{where} needs the ExecuTorch runtime, which is not installed; pip install 'executorch=={built}'."
            )
        if built is None:
            return  # no record of the builder: the runtime's own load check is all we have
        try:
            built_v, have_v = Version(built), Version(have)
        except InvalidVersion:
            return
        if built_v.major != have_v.major or (built_v.major, built_v.minor) > (have_v.major, have_v.minor):
            raise ProgramError(
                f"{where} was exported with executorch {built}, but the installed runtime is executorch "
                f"{have}, which cannot be trusted to run it (ExecuTorch runtimes run programs from the same "
                f"or an older release of their major version). Install executorch {built_v.major}.{built_v.minor} "
                f"or newer within {built_v.major}.x (pip install 'executorch=={built}'), or export the source "
                f"model again with this stack."
            )

    def verify_pte(self, pte_path: str | os.PathLike) -> None:
        """Check that ``pte_path`` has the size and sha256 this manifest records.

        Raises:
            ProgramError: the file is missing, truncated or altered.
        """
        pte_path = Path(pte_path)
        if not pte_path.is_file():
            raise ProgramError(f"{pte_path} is missing.")
        size = pte_path.stat().st_size
        if size != self.pte_size:
            raise ProgramError(
                f"{pte_path} has {size} bytes but its manifest records {self.pte_size}: the file is "
                f"truncated or was replaced. Re-export it (force_export=True) or restore the file."
            )
        digest = sha256_file(pte_path)
        if digest != self.pte_sha256:
            raise ProgramError(
                f"{pte_path} has sha256 {digest[:16]}… but its manifest records "
                f"{self.pte_sha256[:16]}…: the file is corrupted. Re-export it (force_export=True)."
            )

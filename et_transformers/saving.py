"""The shareable model folder: what ``save_pretrained`` writes, and how, so ``from_pretrained`` loads it.

A folder holds ``model.pte``; ``manifest.json`` (export config, source id and revision, stack
versions, the ``.pte``'s sha256 and size, measured figures); ``config.json`` and
``generation_config.json``; the Hugging Face tokenizer files, including the one ExecuTorch's C++
runner loads (``tokenizer.json``, or ``tokenizer.model`` for SentencePiece/tiktoken models); and a
``README.md`` model card (:mod:`.model_card`). It is assembled in a temporary sibling folder and
moved into place file by file with the manifest last, so an interrupted save never leaves a
manifest vouching for a ``.pte`` that is not there. This module reads the loaded model's folder and
objects; it never loads or runs a program and imports neither torch nor ExecuTorch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ProgramError
from .hub import METADATA_PATTERNS
from .manifest import MANIFEST_NAME, PTE_NAME, Manifest
from .model_card import CardData, render
from .tokenization import has_tokenizer_files

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
#: Tokenizer files, in the order ExecuTorch's runner prefers them (HF JSON, then SentencePiece/tiktoken).
RUNNER_TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model")
_MODEL_CONFIGS = ("config.json", "generation_config.json")
_TOKENIZER_FILES = tuple(n for n in METADATA_PATTERNS if n not in _MODEL_CONFIGS)


def write_model_folder(
    save_directory: str | os.PathLike,
    *,
    pte: Path,
    manifest: Manifest,
    config=None,
    generation_config=None,
    tokenizer=None,
    card: CardData | None = None,
    link_pte: bool = False,
) -> Path:
    """Write a complete, self-describing model folder to ``save_directory``.

    Objects given (``config``, ``generation_config``, ``tokenizer``) are saved as they are now, as
    transformers' ``save_pretrained`` does; for those not given, the files beside ``pte`` are copied.

    Args:
        save_directory: the folder to write (created; files of other names in it are left alone).
        pte: the loaded, verified ``model.pte``.
        manifest: its manifest; written with ``card.metrics`` merged into ``metrics``.
        config: the transformers config, if loaded.
        generation_config: the ``GenerationConfig`` to save.
        tokenizer: the tokenizer to save.
        card: model card data (see :class:`~et_transformers.model_card.CardData`).
        link_pte: hard-link the ``.pte`` instead of copying it when possible (for a temporary
            folder that is only read, as ``push_to_hub`` does).

    Returns:
        The folder's path.

    Raises:
        ProgramError: the ``.pte`` copy does not have the size the manifest records.
        FileExistsError: ``save_directory`` is a file.
    """
    card = card or CardData()
    dest = Path(save_directory)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"save_directory {dest} is a file; pass a folder path.")
    source = pte.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _place_pte(pte, staging / PTE_NAME, link=link_pte)
        if staging.joinpath(PTE_NAME).stat().st_size != manifest.pte_size:
            raise ProgramError(
                f"copying {pte} to {dest} gave {staging.joinpath(PTE_NAME).stat().st_size} bytes, not the "
                f"{manifest.pte_size} its manifest records; check the disk and save again."
            )
        _save_or_copy(config, "config.json", source, staging)
        _save_or_copy(generation_config, "generation_config.json", source, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in _TOKENIZER_FILES:  # files the tokenizer object does not write (e.g. tokenizer.model)
            if (source / name).is_file() and not (staging / name).exists():
                shutil.copyfile(source / name, staging / name)
        runner_tokenizer = next((n for n in RUNNER_TOKENIZER_FILES if (staging / n).is_file()), None)
        if runner_tokenizer is None:
            logger.warning(
                "%s has no tokenizer.json or tokenizer.model: ExecuTorch's C++ runner cannot load its "
                "tokenizer. Pass a fast tokenizer to the model (model.tokenizer = ...) and save again.", dest
            )
        metrics = {**manifest.metrics, **card.metrics}
        recorded = dict(manifest.source)
        if recorded.get("path"):  # a shared folder must not carry the saver's local paths
            recorded["path"] = Path(recorded["path"]).name
        program = {**manifest.program, "tokenizer": has_tokenizer_files(staging)}  # as saved, not as exported
        manifest = dataclasses.replace(manifest, metrics=metrics, source=recorded, program=program)
        manifest.write(staging)
        chat = bool(getattr(tokenizer, "chat_template", None)) or (staging / "chat_template.jinja").is_file()
        (staging / CARD_NAME).write_text(
            render(manifest, card.replace(metrics=metrics), folder_name=dest.resolve().name,
                   runner_tokenizer=runner_tokenizer, chat=chat)
        )
        _move_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Saved %s (%s) to %s", PTE_NAME, _describe_source(manifest), dest)
    return dest


def _place_pte(src: Path, dst: Path, *, link: bool) -> None:
    src = src.resolve()  # a download cache's snapshot holds symlinks to blobs: link/copy the blob
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(src, dst)


def _save_or_copy(obj: Any, name: str, source: Path, staging: Path) -> None:
    if obj is not None:
        obj.save_pretrained(staging)
    elif (source / name).is_file():
        shutil.copyfile(source / name, staging / name)


def _move_into_place(staging: Path, dest: Path) -> None:
    """Move every staged file into ``dest``, the manifest (which vouches for the ``.pte``) last."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda n: n == MANIFEST_NAME)
    for name in names:
        os.replace(staging / name, dest / name)


def _describe_source(manifest: Manifest) -> str:
    src = manifest.source
    return src.get("repo_id") or src.get("gguf_file") or src.get("path") or "unknown source"

"""The tokenizer of a model: found beside its files, given by the caller, or absent.

A checkpoint written by ``Trainer`` or ``model.save_pretrained()`` alone has no tokenizer files; it
still exports and generates from token ids. This module owns telling whether a folder holds a
tokenizer (:func:`has_tokenizer_files`), loading it cheaply (:func:`load_tokenizer`), turning a
``tokenizer=`` argument (an object or a path) into a tokenizer (:func:`resolve_tokenizer`), and the
:class:`~et_transformers.errors.TokenizerError` a text feature raises when there is none
(:func:`missing_tokenizer`). It imports transformers only when a tokenizer is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import TokenizerError

#: Files any transformers tokenizer is saved or shipped as (one is enough to load it).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)

#: Tokenizer classes that are exactly the generic ``tokenizers``-backed fast tokenizer.
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds one of :data:`TOKENIZER_FILES`."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, or ``None`` when it holds no tokenizer files.

    A generic fast tokenizer is loaded with its own class: ``AutoTokenizer`` would first import
    every model family's tokenizer mapping (about two seconds), which is most of a cached load.
    """
    folder = Path(folder)
    if not has_tokenizer_files(folder):
        return None
    try:
        tokenizer_class = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        tokenizer_class = None
    if tokenizer_class in _GENERIC_TOKENIZER_CLASSES and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def resolve_tokenizer(tokenizer):
    """A ``tokenizer=`` argument as a tokenizer: objects pass through, paths are loaded.

    Args:
        tokenizer: ``None``, a tokenizer object, or a folder (or its ``tokenizer.json``) to load.

    Returns:
        The tokenizer, or ``None`` when ``tokenizer`` is ``None``.

    Raises:
        TokenizerError: the path holds no tokenizer files.
    """
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer).expanduser()
    folder = path.parent if path.is_file() else path
    loaded = load_tokenizer(folder) if folder.is_dir() else None
    if loaded is None:
        raise TokenizerError(
            f"tokenizer={os.fspath(tokenizer)!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            f"pass the folder a tokenizer was saved to (tokenizer.save_pretrained(folder)), or a tokenizer object."
        )
    return loaded


def missing_tokenizer(where: str, feature: str) -> TokenizerError:
    """The error a text feature raises on a model without a tokenizer.

    Args:
        where: the model's folder or source, as users know it.
        feature: what needed the tokenizer (``"a chat"``, ``"stop_strings"``, ``"a text prompt"``).
    """
    return TokenizerError(
        f"{where} has no tokenizer, which {feature} needs (its checkpoint had no tokenizer files, as "
        f"Trainer or model.save_pretrained() alone writes). Pass one: from_pretrained(..., tokenizer=<a "
        f"tokenizer or its folder>) or from_pte(..., tokenizer=...) (CLI: --tokenizer PATH), or set "
        f"model.tokenizer; token ids need none."
    )

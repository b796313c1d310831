"""Load stage: a resolved :class:`~et_transformers.hub.ModelSource` → transformers model, tokenizer, configs.

The architecture check runs on the config alone, before any weight is read, so an unsupported
model (or a context its position table cannot hold) fails in milliseconds. The model class comes
from :data:`~et_transformers.architectures.SUPPORTED_MODEL_TYPES`, so a supported type always runs
transformers' own implementation, the one the golden tests compare against. Weights load in float32
(GGUF files are dequantized by transformers' ``gguf_file=`` support); the dtype stage converts later.
Pickled weights are loaded only when the source allows them (``use_safetensors=False``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..architectures import Architecture, check_config, resolve_architecture
from ..errors import ModelNotFoundError, UnsupportedModelError
from ..hub import ModelSource

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What the load stage produces.

    Attributes:
        model: the ``*ForCausalLM`` in eval mode, float32.
        tokenizer: its tokenizer.
        config: its ``PretrainedConfig``.
        generation_config: its ``GenerationConfig`` (from ``generation_config.json`` when present).
        architecture: the matching :class:`~et_transformers.architectures.Architecture`.
    """

    model: torch.nn.Module
    tokenizer: Any
    config: Any
    generation_config: Any
    architecture: Architecture


def load_config(source: ModelSource, *, trust_remote_code: bool = False, max_seq_len: int | None = None):
    """Load and check the model config only (cheap).

    Args:
        source: the resolved model files.
        trust_remote_code: allow a config that declares custom code (``auto_map``).
        max_seq_len: the context the program will hold, checked against the architecture's limits.

    Raises:
        UnsupportedModelError: the architecture is not supported, or needs remote code that
            ``trust_remote_code`` does not allow.
        InvalidConfigError: ``max_seq_len`` exceeds what the architecture can hold.
        ModelNotFoundError: the config cannot be read.
    """
    from transformers import AutoConfig

    raw = _read_config_json(source)
    if raw.get("auto_map") and not trust_remote_code:
        raise UnsupportedModelError(
            f"{source.name} declares custom code (auto_map in config.json); it runs code from the "
            f"repository. Pass trust_remote_code=True if you trust it."
        )
    try:
        config = AutoConfig.from_pretrained(
            source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        if "model_type" in str(e) or "trust_remote_code" in str(e):
            model_type = raw.get("model_type")
            resolve_architecture(model_type)  # raises the standard message for unknown types
            raise UnsupportedModelError(f"{source.name}: {e}") from e
        raise ModelNotFoundError(f"cannot read the config of {source.name}: {e}") from e
    except OSError as e:
        raise ModelNotFoundError(f"cannot read the config of {source.name}: {e}") from e
    check_config(config, max_seq_len)
    if raw.get("auto_map"):
        logger.info(
            "%s declares custom code; its %r model is exported with transformers' own implementation.",
            source.name, config.model_type,
        )
    return config


def _read_config_json(source: ModelSource) -> dict:
    import json

    path = source.path / "config.json"
    if source.gguf_file or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"{path} is not valid JSON: {e}") from e


def load_model(source: ModelSource, *, trust_remote_code: bool = False, max_seq_len: int | None = None) -> LoadedModel:
    """Load model, tokenizer and configs from ``source``.

    Args:
        source: the resolved model files.
        trust_remote_code: allow a config that declares custom code (the model itself is always
            transformers' implementation of its ``model_type``).
        max_seq_len: the context the program will hold (checked before any weight is read).

    Raises:
        UnsupportedModelError, InvalidConfigError: see :func:`load_config`.
        ModelNotFoundError: files are missing or unreadable.
    """
    import transformers
    from transformers import AutoTokenizer

    config = load_config(source, trust_remote_code=trust_remote_code, max_seq_len=max_seq_len)
    architecture = resolve_architecture(config)
    model_class = getattr(transformers, architecture.model_class)
    logger.info("Loading %s (%s) with %s", source.name, config.model_type, model_class.__name__)
    try:
        model = model_class.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            config=config,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            # None lets transformers fall back to pickles: only when the caller asked for them.
            use_safetensors=None if source.gguf_file or not source.use_safetensors else True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise ModelNotFoundError(f"cannot load {source.name}: {e}") from e
    model.eval()
    # transformers fills this from generation_config.json, or from the model config without one.
    generation_config = copy.deepcopy(model.generation_config)
    return LoadedModel(model, tokenizer, config, generation_config, architecture)

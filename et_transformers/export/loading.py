"""Load stage: a resolved :class:`~et_transformers.hub.ModelSource` → transformers model, tokenizer, configs.

The architecture check runs on the config alone, before any weight is read, so an unsupported
model (or a context its position table cannot hold) fails in milliseconds. The model class comes
from :data:`~et_transformers.architectures.SUPPORTED_MODEL_TYPES`, so a supported type always runs
transformers' own implementation, the one the golden tests compare against. Safetensors weights
load in the dtype they are stored in (memory-mapped, so a bf16 checkpoint costs its file size, not
twice that in float32); buffers the model computes at construction (RoPE frequencies, Gemma's
embedding scale) are nevertheless the float32 values a float32 load gives, so later stages see
exactly what a float32 model holds. GGUF files are dequantized to float32 by transformers'
``gguf_file=`` support. The dtype and quantize stages convert each weight later, layer by layer.
Pickled weights are loaded only when the source allows them (``use_safetensors=False``). A checkpoint
without tokenizer files (what ``Trainer`` or ``model.save_pretrained()`` alone writes) loads with no
tokenizer: generating from token ids needs none.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..architectures import Architecture, check_config, resolve_architecture
from ..errors import ModelNotFoundError, UnsupportedModelError
from ..hub import ModelSource
from ..tokenization import has_tokenizer_files

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What the load stage produces.

    Attributes:
        model: the ``*ForCausalLM`` in eval mode; weights in their stored dtype (see
            :func:`stored_dtype`), float32 buffers.
        tokenizer: its tokenizer, or ``None`` when the checkpoint has no tokenizer files.
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
    dtype = stored_dtype(source)
    logger.info("Loading %s (%s, %s) with %s", source.name, config.model_type, dtype, model_class.__name__)
    try:
        model = model_class.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            # None lets transformers fall back to pickles: only when the caller asked for them.
            use_safetensors=None if source.gguf_file or not source.use_safetensors else True,
        )
        tokenizer = None
        if source.gguf_file or has_tokenizer_files(source.path):
            tokenizer = AutoTokenizer.from_pretrained(
                source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
            )
        else:  # Trainer / model.save_pretrained() alone: generation from ids needs no tokenizer
            logger.warning(
                "%s has no tokenizer files; the program will generate from token ids only (text prompts, "
                "stop_strings and chat need tokenizer=)", source.name
            )
    except OSError as e:
        raise ModelNotFoundError(f"cannot load {source.name}: {e}") from e
    model.eval()
    if dtype != torch.float32:
        float32_buffers(model, model_class, config)
    # transformers fills this from generation_config.json, or from the model config without one.
    generation_config = copy.deepcopy(model.generation_config)
    return LoadedModel(model, tokenizer, config, generation_config, architecture)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _safetensors_float_dtypes(path) -> set[str]:
    """The dtypes of the floating tensors in one safetensors file (its JSON header only)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))}


def stored_dtype(source: ModelSource) -> torch.dtype:
    """The dtype to load ``source``'s weights in: the one every floating tensor of its safetensors
    files is stored in, when that is float32, bfloat16 or float16; float32 otherwise (GGUF, pickles,
    mixed or unreadable files), which is always exact."""
    if source.gguf_file or not source.use_safetensors:
        return torch.float32
    dtypes: set[str] = set()
    try:
        for path in sorted(source.path.glob("*.safetensors")):
            dtypes |= _safetensors_float_dtypes(path)
    except (OSError, ValueError, KeyError, struct.error):
        return torch.float32
    return _SAFETENSORS_DTYPES.get(dtypes.pop(), torch.float32) if len(dtypes) == 1 else torch.float32


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside: modules put their parameters on the meta device (no memory), buffers stay real."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def float32_buffers(model: torch.nn.Module, model_class, config) -> int:
    """Give ``model`` (loaded in half precision) the float32 buffers a float32 load computes.

    Buffers such as Gemma's embedding scale are created at construction in the load dtype, so a
    bf16 load rounds them; a float32 construction with parameters on the meta device (nothing
    allocated but the buffers) recovers their exact values. Returns the number of buffers replaced.
    """
    with _parameters_on_meta():
        skeleton = model_class._from_config(config, dtype=torch.float32)
    exact = dict(skeleton.named_buffers())
    replaced = 0
    for name, buf in list(model.named_buffers()):
        ref = exact.get(name)
        if buf.is_floating_point() and ref is not None and ref.device.type != "meta" and buf.dtype != ref.dtype:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = ref
            replaced += 1
    if replaced:
        logger.debug("Restored %d float32 buffer(s) computed at construction", replaced)
    return replaced

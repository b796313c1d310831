"""Export configuration: the frozen :class:`ExportConfig` dataclass and its validation.

An ``ExportConfig`` says *what* program to build (context length, dtype, backend, quantization);
it is part of the artifact cache key and of every manifest, so it is immutable, validated once in
``__post_init__`` and serialised with :meth:`ExportConfig.to_dict`. Overrides go through
:meth:`ExportConfig.replace`, which rejects unknown field names instead of ignoring them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidConfigError

#: Canonical dtype names, and the spellings accepted for each.
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

#: Backends a program can be lowered to. ``portable`` delegates nothing (ExecuTorch's portable kernels).
BACKENDS: tuple[str, ...] = ("xnnpack", "portable")

#: Linear-layer quantization schemes: 8-bit dynamic activations with 4- or 8-bit weights, or weight-only.
QLINEAR_SCHEMES: tuple[str, ...] = ("8da4w", "8da8w", "4w", "8w")

#: How the output head (``lm_head``, often tied to the embedding) is quantized: like the other linear
#: layers (``"same"``), left in float (``None``), or with its own scheme (8-bit schemes per channel,
#: 4-bit ones with ``qlinear_group_size``). The head is the layer most sensitive to 4-bit weights.
QHEAD_CHOICES: tuple[str | None, ...] = ("same", None, *QLINEAR_SCHEMES)

#: Embedding quantization schemes (weight-only).
QEMBEDDING_SCHEMES: tuple[str, ...] = ("4w", "8w")

#: KV cache storage: ``None`` keeps the model dtype; ``"int8"`` quantizes per token and head.
KV_CACHE_DTYPES: tuple[str | None, ...] = (None, "int8")

#: What ``forward`` returns: the last position's logits, or every position's (evaluation programs).
LOGITS_MODES: tuple[str, ...] = ("last", "all")

#: Largest context we let a program be built for; beyond it the static KV cache alone is gigabytes.
MAX_SEQ_LEN_LIMIT = 131072


def _check_group_size(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise InvalidConfigError(
            f"{name}={value!r} is not valid: use a positive power of two (e.g. 32, 64, 128, 256) "
            f"for groupwise quantization, or None for one group per output channel."
        )


def _check_backend_support(cfg: "ExportConfig") -> None:
    """Refuse combinations the backend cannot run as asked (rather than quietly running float).

    Each rule was found by exporting and running the combination (``tests/test_quantization.py``
    keeps them honest): XNNPACK has no float-activation x integer-weight linear, runs 8-bit weights
    per output channel only and fails at run time on bf16 activations with 8-bit weights; the
    portable kernels dequantize weights per output channel only (group-wise weights would be
    folded back to float at export).
    """
    scheme, gs = cfg.qlinear, cfg.qlinear_group_size
    if cfg.backend == "xnnpack":
        if cfg.qhead in ("4w", "8w"):
            raise InvalidConfigError(
                f"qhead={cfg.qhead!r} cannot run on backend='xnnpack' (no float-activation x integer-weight "
                f"linear); use qhead='8da{cfg.qhead[0]}w', None (float) or 'same'."
            )
        if scheme in ("4w", "8w"):
            raise InvalidConfigError(
                f"qlinear={scheme!r} cannot run on backend='xnnpack': XNNPACK has no linear with float "
                f"activations and integer weights, so the weights would run as float. Use "
                f"qlinear='8da{scheme[0]}w' (same weights, int8 dynamic activations), or backend='portable'."
            )
        if scheme == "8da8w" and gs is not None:
            raise InvalidConfigError(
                f"qlinear='8da8w' with qlinear_group_size={gs} cannot run on backend='xnnpack': XNNPACK "
                f"supports 8-bit weights with one scale per output channel only. Use qlinear_group_size=None."
            )
        head = scheme if cfg.qhead == "same" else cfg.qhead
        eight = "8da8w" if cfg.qlinear_8bit and scheme == "8da4w" else None
        for field, value in (("qlinear", scheme), ("qhead", head), ("qlinear_8bit", eight)):
            if value == "8da8w" and cfg.dtype == "bfloat16":
                raise InvalidConfigError(
                    f"{field}='8da8w' with dtype='bfloat16' cannot run on backend='xnnpack' (no bf16 kernel "
                    f"for 8-bit weights); use dtype='float32' or 'float16', or {field}='8da4w'."
                )
    if cfg.backend == "portable" and scheme is not None and gs is not None:
        raise InvalidConfigError(
            f"qlinear={scheme!r} with qlinear_group_size={gs} cannot run on backend='portable': its "
            f"kernels dequantize weights per output channel only. Use qlinear_group_size=None."
        )


@dataclass(frozen=True)
class ExportConfig:
    """What program to build from a Hugging Face causal LM.

    Args:
        max_seq_len: Length of the static KV cache, i.e. the whole context (prompt + generated
            tokens) the program can hold. One forward call may take up to this many tokens.
        dtype: Weights and activations dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``
            (``"fp32"``, ``"bf16"``, ``"fp16"`` are accepted and normalised).
        backend: ``"xnnpack"`` (default; delegates to XNNPACK) or ``"portable"`` (no delegate).
        qlinear: Quantization of linear layers: ``None``, ``"8da4w"``, ``"8da8w"``, ``"4w"``, ``"8w"``.
        qlinear_group_size: Group size of ``qlinear`` weights, a power of two, or ``None`` for one
            scale per output channel. A layer whose input size the group size does not divide is
            quantized per output channel instead (logged), never skipped silently.
        qhead: Quantization of the output head: ``"same"`` (default) as ``qlinear``; ``None`` keeps
            it in float; or a ``qlinear`` scheme of its own (``"8da8w"`` per channel, ``"8da4w"``
            with ``qlinear_group_size``). See :data:`QHEAD_CHOICES`.
        qlinear_8bit: Module-name patterns (``fnmatch``, e.g. ``"*.mlp.down_proj"``) of linear layers
            that get 8-bit weights per output channel instead of ``qlinear``'s 4 bits (``8da8w`` for
            the dynamic-activation schemes, ``8w`` for weight-only): the mixed-precision knob for the
            layers most sensitive to 4-bit weights.
        qembedding: Quantization of the token embedding: ``None``, ``"4w"``, ``"8w"``.
        qembedding_group_size: Group size for ``qembedding``, a power of two, or ``None`` for one
            scale per embedding row.
        kv_cache_dtype: ``None`` caches keys and values in ``dtype``; ``"int8"`` quantizes them per
            token and head and runs ExecuTorch's ``llama.custom_quantized_sdpa``.
        logits: ``"last"`` (default): ``forward`` returns the last position's logits, which is all
            generation needs; ``"all"``: every position's, for evaluation (perplexity) programs.

    Raises:
        InvalidConfigError: a field has a value outside the accepted set; the message lists it.
    """

    max_seq_len: int = 1024
    dtype: str = "float32"
    backend: str = "xnnpack"
    qlinear: str | None = None
    qlinear_group_size: int | None = 32
    qhead: str | None = "same"
    qlinear_8bit: tuple[str, ...] = ()
    qembedding: str | None = None
    qembedding_group_size: int | None = None
    kv_cache_dtype: str | None = None
    logits: str = "last"

    def __post_init__(self) -> None:
        msl = self.max_seq_len
        if isinstance(msl, bool) or not isinstance(msl, int) or not 2 <= msl <= MAX_SEQ_LEN_LIMIT:
            raise InvalidConfigError(
                f"max_seq_len={msl!r} is not valid: it must be an integer from 2 to "
                f"{MAX_SEQ_LEN_LIMIT} (the number of tokens the KV cache holds)."
            )
        dtype = self.dtype
        dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
        if dtype_name not in DTYPES:
            raise InvalidConfigError(
                f"dtype={dtype!r} is not supported; use one of {sorted(set(DTYPES.values()))}."
            )
        object.__setattr__(self, "dtype", DTYPES[dtype_name])
        if self.backend not in BACKENDS:
            raise InvalidConfigError(f"backend={self.backend!r} is not supported; use one of {list(BACKENDS)}.")
        if self.qlinear not in (None, *QLINEAR_SCHEMES):
            raise InvalidConfigError(
                f"qlinear={self.qlinear!r} is not a known scheme; use None or one of {list(QLINEAR_SCHEMES)}."
            )
        patterns = self.qlinear_8bit
        if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
            raise InvalidConfigError(
                f"qlinear_8bit={patterns!r} is not valid: give a tuple of module-name patterns, e.g. "
                f"('*.mlp.down_proj',)."
            )
        object.__setattr__(self, "qlinear_8bit", tuple(patterns))
        if patterns and self.qlinear not in ("8da4w", "4w"):
            raise InvalidConfigError(
                f"qlinear_8bit={tuple(patterns)!r} needs a 4-bit qlinear ('8da4w' or '4w') to differ from; "
                f"qlinear is {self.qlinear!r}."
            )
        if self.qhead not in QHEAD_CHOICES:
            raise InvalidConfigError(f"qhead={self.qhead!r} is not valid; use one of {list(QHEAD_CHOICES)}.")
        if self.qembedding not in (None, *QEMBEDDING_SCHEMES):
            raise InvalidConfigError(
                f"qembedding={self.qembedding!r} is not a known scheme; use None or one of "
                f"{list(QEMBEDDING_SCHEMES)}."
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidConfigError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of {list(KV_CACHE_DTYPES)}."
            )
        if self.logits not in LOGITS_MODES:
            raise InvalidConfigError(f"logits={self.logits!r} is not valid; use one of {list(LOGITS_MODES)}.")
        _check_group_size("qlinear_group_size", self.qlinear_group_size)
        _check_group_size("qembedding_group_size", self.qembedding_group_size)
        _check_backend_support(self)

    @property
    def torch_dtype(self):
        """The ``torch.dtype`` named by :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict (used in manifests and cache keys)."""
        data = dataclasses.asdict(self)
        data["qlinear_8bit"] = list(self.qlinear_8bit)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExportConfig":
        """Build a config from :meth:`to_dict` output; unknown keys raise :class:`InvalidConfigError`."""
        return cls().replace(**dict(data))

    def replace(self, **overrides: Any) -> "ExportConfig":
        """Return a copy with ``overrides`` applied.

        Raises:
            InvalidConfigError: an override names no field of ``ExportConfig``, or has a bad value.
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InvalidConfigError(
                f"unknown ExportConfig field(s) {unknown}; the fields are "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **overrides)


#: Named export recipes: ``ExportConfig`` fields per name. ``DEFAULT_RECIPE`` is what
#: ``from_pretrained`` builds when given neither a recipe nor an ``ExportConfig``; the README's
#: quality/speed table (produced by ``benchmarks/quality.py``) says why it is the default.
RECIPES: dict[str, dict[str, Any]] = {
    "xnnpack-fp32": {},
    "xnnpack-8da8w": {"qlinear": "8da8w", "qlinear_group_size": None, "qembedding": "8w"},
    "xnnpack-8da4w": {
        "qlinear": "8da4w", "qlinear_group_size": 32, "qhead": "8da8w", "qlinear_8bit": ("*.mlp.down_proj",),
        "qembedding": "8w",
    },
    "xnnpack-8da4w-kv8": {
        "qlinear": "8da4w", "qlinear_group_size": 32, "qhead": "8da8w", "qlinear_8bit": ("*.mlp.down_proj",),
        "qembedding": "8w", "kv_cache_dtype": "int8",
    },
    "xnnpack-8da4w-pure": {"qlinear": "8da4w", "qlinear_group_size": 32, "qembedding": "8w"},
    "portable-fp32": {"backend": "portable"},
}
DEFAULT_RECIPE = "xnnpack-8da4w"


def recipe(name: str, **overrides: Any) -> ExportConfig:
    """The :class:`ExportConfig` of a named recipe, with ``overrides`` applied.

    Raises:
        InvalidConfigError: ``name`` is not in :data:`RECIPES` (the message lists them), or an
            override is invalid.
    """
    if name not in RECIPES:
        raise InvalidConfigError(f"recipe={name!r} is not known; use one of {sorted(RECIPES)}.")
    return ExportConfig().replace(**{**RECIPES[name], **overrides})


def recipe_name(export_config: ExportConfig) -> str | None:
    """The named recipe ``export_config`` is (at its own context length), or ``None``."""
    for name in RECIPES:
        if recipe(name, max_seq_len=export_config.max_seq_len) == export_config:
            return name
    return None

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

#: Embedding quantization schemes (weight-only).
QEMBEDDING_SCHEMES: tuple[str, ...] = ("4w", "8w")

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
        qembedding: Quantization of the token embedding: ``None``, ``"4w"``, ``"8w"``.
        qembedding_group_size: Group size for ``qembedding``, a power of two, or ``None`` for one
            scale per embedding row.

    Raises:
        InvalidConfigError: a field has a value outside the accepted set; the message lists it.
    """

    max_seq_len: int = 1024
    dtype: str = "float32"
    backend: str = "xnnpack"
    qlinear: str | None = None
    qlinear_group_size: int | None = 32
    qembedding: str | None = None
    qembedding_group_size: int | None = None

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
        if self.qembedding not in (None, *QEMBEDDING_SCHEMES):
            raise InvalidConfigError(
                f"qembedding={self.qembedding!r} is not a known scheme; use None or one of "
                f"{list(QEMBEDDING_SCHEMES)}."
            )
        _check_group_size("qlinear_group_size", self.qlinear_group_size)
        _check_group_size("qembedding_group_size", self.qembedding_group_size)

    @property
    def torch_dtype(self):
        """The ``torch.dtype`` named by :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict (used in manifests and cache keys)."""
        return dataclasses.asdict(self)

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

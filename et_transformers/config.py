"""Export configuration: the frozen :class:`ExportConfig` dataclass and its validation.

An ``ExportConfig`` says *what* program to build (context length, dtype, backend, quantization);
it is part of the artifact cache key and of every manifest, so it is immutable, validated once in
``__post_init__`` and serialised with :meth:`ExportConfig.to_dict`. Overrides go through
:meth:`ExportConfig.replace`, which rejects unknown field names instead of ignoring them.

No option is silently ignored: a field set to a value that nothing in the program would use
(a group size without a scheme that has groups, a head setting without quantized linear layers)
raises, and so does a value the backend cannot take (XNNPACK's groupwise kernels want multiples
of 32). The group size and head defaults are :data:`AUTO`, "the scheme's default", resolved in
``__post_init__``; stored configs (manifests of older versions) are normalised by
:meth:`ExportConfig.from_dict` instead of refused.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidConfigError

logger = logging.getLogger(__name__)

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

#: Backends a program can be lowered to: XNNPACK (CPU kernels for float and 8-bit-activation quantized
#: layers), ``portable`` (no delegate: ExecuTorch's own kernels run everything) and OpenVINO (Intel's
#: runtime, CPU here; ``pip install "et-transformers[openvino]"``), Vulkan (GPUs through Vulkan
#: compute; exported here, run by ExecuTorch builds with Vulkan, which no pip wheel is) and Core ML
#: (Apple devices; exported here with the coremltools that comes with executorch, run by an Apple
#: device's ExecuTorch runtime with the Core ML backend).
#: ``ExportConfig.backend`` takes one name or an ordered tuple of delegating ones; which partitioners
#: each maps to is the table in :mod:`et_transformers.export.backends`.
BACKENDS: tuple[str, ...] = ("xnnpack", "portable", "openvino", "vulkan", "coreml")

#: How each backend is called in text (model cards, ``inspect``).
BACKEND_TITLES: dict[str, str] = {
    "xnnpack": "XNNPACK", "portable": "portable kernels", "openvino": "OpenVINO", "vulkan": "Vulkan",
    "coreml": "Core ML",
}

#: Backends whose ExecuTorch runtime cannot run a delegate with dynamic shapes (the OpenVINO delegate
#: binds ExecuTorch's tensors as they are planned, never resizes its outputs, and fails on them
#: with Internal, 0x1), and Core ML (ExecuTorch's own LLM export refuses dynamic shapes with it; with
#: them every reshape reads the symbolic length, which cuts each layer into many small delegates): a
#: program with one of them takes one token per ``forward`` call (``get_max_seq_len`` = 1; prompts
#: are prefilled a token at a time), and returns one position's logits.
SINGLE_TOKEN_BACKENDS: tuple[str, ...] = ("openvino", "coreml")

#: OpenVINO quantizes with its own weight compression (NNCF) when it comes first, and NNCF treats the
#: embedding and the head as one pair ("first and last layers"): the ``(qlinear, head scheme,
#: qembedding)`` combinations it makes. ``"4w"``: int4 symmetric in groups of ``qlinear_group_size``
#: (smaller for a layer whose inputs it does not divide, see ``export/openvino.py``);
#: ``"8w"``: int8 asymmetric per output channel. ``("4w", "8w", "8w")`` is NNCF's default (and
#: ExecuTorch's OpenVINO LLM recipe's); ``("4w", "4w", "4w")`` is its ``all_layers=True``.
OPENVINO_COMPRESSIONS: tuple[tuple[str, str, str], ...] = (("4w", "8w", "8w"), ("4w", "4w", "4w"), ("8w", "8w", "8w"))

#: Linear-layer quantization schemes: 8-bit dynamic activations with 4- or 8-bit weights, or weight-only
#: (ExecuTorch's kernels), or ``"q4_0"``: int4 weights in groups of 32 times int8 activations per block
#: of 32, run by our own kernel (:mod:`et_transformers.kernels`; float32 programs only, and a program
#: with it runs only where that kernel library is loaded, i.e. through this package), or
#: ``"8da4w_own"``: ``8da4w`` (the same torchao weights in groups of 32 and per-token int8
#: activations) run by our own kernel instead of XNNPACK's, on the same terms as ``q4_0``.
QLINEAR_SCHEMES: tuple[str, ...] = ("8da4w", "8da8w", "4w", "8w", "q4_0", "8da4w_own")

#: Schemes run by our own kernels rather than ExecuTorch's (their programs need our kernel library).
OWN_KERNEL_SCHEMES: tuple[str, ...] = ("q4_0", "8da4w_own")

#: How the output head (``lm_head``, often tied to the embedding) is quantized: like the other linear
#: layers (``"same"``), left in float (``None``), or with its own scheme (8-bit schemes per channel,
#: 4-bit ones with ``qlinear_group_size``). The head is the layer most sensitive to 4-bit weights.
QHEAD_CHOICES: tuple[str | None, ...] = ("same", None, *QLINEAR_SCHEMES)

#: Default of ``qlinear_group_size`` and ``qhead``: "the scheme's default", resolved when the config
#: is built (see :class:`ExportConfig`), so a value the user gives can be told from the default.
AUTO = "auto"
#: ``ExportConfig.qvision`` values: the vision encoder's linear layers (XNNPACK schemes).
VISION_SCHEMES = (None, "8da8w", "8da4w")

#: Linear schemes with 4-bit weights: the only ones a group size applies to (8-bit weights always
#: have one scale per output channel, the only layout XNNPACK and the portable kernels run).
FOUR_BIT_SCHEMES: tuple[str, ...] = ("8da4w", "4w")

#: Group size of 4-bit weights when none is given, per (first) backend: 32 on XNNPACK (channelwise
#: 4-bit costs +160% perplexity on SmolLM2-135M, see the README), per channel (``None``) on the
#: portable kernels, which dequantize per output channel only, and 128 on OpenVINO (NNCF's default
#: for int4 weight compression, and ExecuTorch's OpenVINO LLM recipe's), 32 on Core ML (the block
#: of ExecuTorch's Core ML ``b4w`` weights) and on Vulkan (its ``linear_q4gsw`` takes any group that
#: divides the input size; 32 is the quality of XNNPACK's default and divides more layers than 128).
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"xnnpack": 32, "portable": None, "openvino": 128, "coreml": 32,
                                             "vulkan": 32}

#: Core ML first: the dtypes it computes in (no bfloat16 in Core ML), and the weight-only schemes it
#: stores as 4/8-bit constants (linear layers through ``torchao.dequantize_affine``, the embedding
#: through ``embedding_4bit``; ExecuTorch's 8-bit embedding lookup is not a Core ML operator).
COREML_DTYPES: tuple[str, ...] = ("float16", "float32")
COREML_QLINEAR: tuple[str | None, ...] = (None, "4w", "8w")
COREML_QEMBEDDING: tuple[str | None, ...] = (None, "4w")

#: Vulkan first: the weight-only schemes its partitioner fuses into its own 4-bit operators
#: (``executorch/backends/vulkan/patterns``): 4-bit linear layers (and head) with per-group scales
#: become ``et_vk.linear_q4gsw``, a 4-bit ``embedding_4bit`` lookup ``et_vk.embedding_q4gsw``. Vulkan
#: has no weight-only 8-bit linear (8-bit weights would be dequantized to float on every call) and
#: no 8-bit embedding lookup (``embedding_byte`` would run outside the delegate).
VULKAN_QLINEAR: tuple[str | None, ...] = (None, "4w")
VULKAN_QEMBEDDING: tuple[str | None, ...] = (None, "4w")

#: XNNPACK delegates groupwise weights only in groups that are multiples of this
#: (``executorch/backends/xnnpack/operators/node_visitor.py``, ``_check_per_channel_group_params``:
#: "Delegation to XNNPACK requires group_size to be a multiple of 32"), and 4-bit ones only.
XNNPACK_GROUP_MULTIPLE = 32

#: Embedding quantization schemes (weight-only).
QEMBEDDING_SCHEMES: tuple[str, ...] = ("4w", "8w")

#: KV cache storage: ``None`` keeps the model dtype; ``"int8"`` quantizes per token and head.
KV_CACHE_DTYPES: tuple[str | None, ...] = (None, "int8")

#: What ``forward`` returns: the last position's logits, or every position's (evaluation programs).
LOGITS_MODES: tuple[str, ...] = ("last", "all")

#: Default of :attr:`ExportConfig.verify_tokens`: how many trailing positions' logits ``forward``
#: returns, so one call scores a whole draft of assisted generation (``verify_tokens - 1`` drafted
#: tokens after the last accepted one). 1 (the last position only) where the head is XNNPACK's: it
#: delegates a fixed-shape GEMM only, so a wider head computes ``k`` rows on every decode step
#: (6-12% of plain decoding's speed at k = 8).
DEFAULT_VERIFY_TOKENS = 1

#: The default where the output head runs on our kernel (:data:`OWN_KERNEL_SCHEMES`): it computes
#: ``min(S, k)`` rows, so a decode step still computes one, and plain decoding measured no slower
#: (bare runtime loop, 5 interleaved rounds: 1.02x at one thread, 1.005x at two; ``generate()``,
#: 21 paired rounds: 1.03x, quartiles 0.94-1.07x), while ``prompt_lookup_num_tokens`` and
#: ``assistant_model`` work without exporting again.
OWN_HEAD_VERIFY_TOKENS = 8

#: Largest ``verify_tokens``: past it the logits output alone grows to megabytes per call.
MAX_VERIFY_TOKENS = 64

#: Largest context we let a program be built for; beyond it the static KV cache alone is gigabytes.
MAX_SEQ_LEN_LIMIT = 131072


class _NoEffectError(InvalidConfigError):
    """A field is set to a value nothing in the program would use; ``from_dict`` resets it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _check_group_size(name: str, value: int | str | None) -> None:
    if value is None or (value == AUTO and name == "qlinear_group_size"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise InvalidConfigError(
            f"{name}={value!r} is not valid: use a positive power of two (e.g. 32, 64, 128, 256) "
            f"for groupwise quantization, or None for one group per output channel."
        )


def _normalise_backend(value: Any) -> str | tuple[str, ...]:
    """``backend`` as stored: one name as a string (a one-name tuple too: one spelling, one cache key,
    and the key of every config from before lists were accepted), several as a tuple in order.

    Raises:
        InvalidConfigError: not a name or a sequence of names, an unknown or repeated name, an empty
            list, or ``portable`` in a list (it delegates nothing: leave it out).
    """
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise InvalidConfigError(
            f"backend={value!r} is not valid: give one of {list(BACKENDS)}, or an ordered tuple of them "
            f"(the first gets first pick of the operators), e.g. backend=('openvino', 'xnnpack')."
        )
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise InvalidConfigError(
            f"backend={value!r}: {unknown[0]!r} is not a supported backend; use one of {list(BACKENDS)} "
            f"(or an ordered tuple of them)."
        )
    if len(set(names)) != len(names):
        raise InvalidConfigError(f"backend={value!r} names a backend twice; give each once, in order of preference.")
    if len(names) > 1 and "portable" in names:
        raise InvalidConfigError(
            f"backend={value!r}: 'portable' delegates nothing, so in a list it changes nothing (whatever no "
            f"backend takes runs on the portable kernels anyway). Leave it out, or use backend='portable' alone."
        )
    return names[0] if len(names) == 1 else tuple(names)


def _check_single_token(cfg: "ExportConfig") -> None:
    """A program with a :data:`SINGLE_TOKEN_BACKENDS` backend runs one token per call, so a wider head
    has nothing to verify."""
    k = cfg.verify_tokens
    if k is not None and k > 1:
        single = [BACKEND_TITLES[b] for b in cfg.backends if b in SINGLE_TOKEN_BACKENDS]
        raise InvalidConfigError(
            f"verify_tokens={k} cannot run with backend={cfg.backend!r}: {single[0]} delegates take one token per "
            f"forward call, so there is no draft to verify. Leave verify_tokens out (1), or use backend='xnnpack'."
        )


def _check_openvino_support(cfg: "ExportConfig") -> None:
    """OpenVINO first: refuse what a program with OpenVINO delegates cannot do, or what this package
    has not verified. Quantization is its own (NNCF weight compression,
    :data:`OPENVINO_COMPRESSIONS`): the 8-bit-activation schemes and ``q4_0`` are XNNPACK's and our
    kernels' vocabulary, and only float32 activations were verified token for token.
    """
    if cfg.dtype != "float32":
        raise InvalidConfigError(
            f"dtype={cfg.dtype!r} is not supported with backend={cfg.backend!r} first: only float32 programs were "
            f"verified on OpenVINO. Use dtype='float32' (recipe 'openvino-4w' for smaller weights), or backend='xnnpack'."
        )
    wanted = (cfg.qlinear, cfg.head_scheme, cfg.qembedding)
    if cfg.qlinear is not None and wanted not in OPENVINO_COMPRESSIONS:
        raise InvalidConfigError(
            f"qlinear={cfg.qlinear!r}, head {cfg.head_scheme!r}, qembedding={cfg.qembedding!r} is not a weight "
            f"compression OpenVINO makes (backend={cfg.backend!r} first; NNCF quantizes linear layers, and the "
            f"embedding and head as a pair). Use one of (qlinear, qhead, qembedding) = "
            f"{[tuple(c) for c in OPENVINO_COMPRESSIONS]} (recipe 'openvino-4w' is the first), or put 'xnnpack' first."
        )
    if cfg.qlinear is None and (cfg.qembedding or cfg.head_scheme):
        field = "qembedding" if cfg.qembedding else "qhead"
        raise InvalidConfigError(
            f"{field}={getattr(cfg, field)!r} needs qlinear with backend={cfg.backend!r} first: OpenVINO compresses "
            f"the embedding and head together with the linear layers. Set qlinear='4w' (recipe 'openvino-4w'), "
            f"or leave {field} out."
        )
    if cfg.qembedding_group_size is not None:
        raise InvalidConfigError(
            f"qembedding_group_size={cfg.qembedding_group_size} cannot apply with backend={cfg.backend!r} first: "
            f"OpenVINO compresses the embedding per channel, or in qlinear_group_size groups with qembedding='4w'. "
            f"Leave it out."
        )
    for field in ("qlinear_8bit", "kv_cache_dtype"):
        if getattr(cfg, field):
            raise InvalidConfigError(
                f"{field}={getattr(cfg, field)!r} is not supported with backend={cfg.backend!r} first (not "
                f"verified on OpenVINO). Leave {field} out, or put 'xnnpack' first."
            )


def _check_weight_only_schemes(cfg: "ExportConfig", title: str, qlinear: tuple, qembedding: tuple, recipe_name: str,
                               how: str = "") -> None:
    """A backend that takes weight-only schemes only: refuse a ``qlinear``, head or ``qembedding``
    scheme outside ``qlinear`` / ``qembedding`` (the allowed ones, ``None`` for float)."""
    for field, value, allowed in (("qlinear", cfg.qlinear, qlinear), ("qhead", cfg.head_scheme, qlinear),
                                  ("qembedding", cfg.qembedding, qembedding)):
        if value not in allowed:
            raise InvalidConfigError(
                f"{field}={value!r} is not supported with backend={cfg.backend!r} first: {title} takes weight-only "
                f"{[a for a in allowed if a]} (float activations){how}. Use one of those (recipe {recipe_name!r}) or "
                f"leave it out, or put 'xnnpack' first."
            )


def _check_vulkan_support(cfg: "ExportConfig") -> None:
    """Vulkan first: float32 (ExecuTorch's LLM helper asserts fp32 for Vulkan) and the weight-only
    4-bit schemes Vulkan fuses into its own operators (:data:`VULKAN_QLINEAR`,
    :data:`VULKAN_QEMBEDDING`); the rest is refused, not quietly run in float."""
    if cfg.dtype != "float32":
        raise InvalidConfigError(
            f"dtype={cfg.dtype!r} is not supported with backend={cfg.backend!r} first: ExecuTorch lowers LLMs to "
            f"Vulkan in float32 only. Use dtype='float32' (recipe 'vulkan-4w' for smaller weights)."
        )
    _check_weight_only_schemes(cfg, "Vulkan", VULKAN_QLINEAR, VULKAN_QEMBEDDING, "vulkan-4w",
                               ", fused into its own 4-bit operators")
    for field in ("qlinear_8bit", "kv_cache_dtype"):
        if getattr(cfg, field):
            raise InvalidConfigError(
                f"{field}={getattr(cfg, field)!r} is not supported with backend={cfg.backend!r} first: Vulkan has no "
                f"weight-only 8-bit linear, and an int8 KV cache is not verified there. Leave {field} out, or put "
                f"'xnnpack' first."
            )


def _check_coreml_support(cfg: "ExportConfig") -> None:
    """Core ML first: its dtypes (:data:`COREML_DTYPES`) and weight-only schemes
    (:data:`COREML_QLINEAR`, :data:`COREML_QEMBEDDING`); the 8-bit-activation schemes and ``q4_0``
    are XNNPACK's and our kernels' vocabulary, and the int8 KV cache's attention is not verified."""
    if cfg.dtype not in COREML_DTYPES:
        raise InvalidConfigError(
            f"dtype={cfg.dtype!r} is not supported with backend={cfg.backend!r} first: Core ML computes in "
            f"{' or '.join(COREML_DTYPES)}. Use dtype='float16' (recipe 'coreml-fp16') or 'float32'."
        )
    _check_weight_only_schemes(cfg, "Core ML", COREML_QLINEAR, COREML_QEMBEDDING, "coreml-4w")
    if cfg.kv_cache_dtype:
        raise InvalidConfigError(
            f"kv_cache_dtype={cfg.kv_cache_dtype!r} is not supported with backend={cfg.backend!r} first (not "
            f"verified with Core ML). Leave kv_cache_dtype out, or put 'xnnpack' first."
        )


def _check_backend_support(cfg: "ExportConfig") -> None:
    """Refuse combinations the backend cannot run as asked (rather than quietly running float).

    Each rule was found by exporting and running the combination (``tests/test_quantization.py``
    keeps them honest) or read in XNNPACK's lowering code: XNNPACK has no float-activation x
    integer-weight linear, takes groupwise weights in multiples of 32 only (its lowering asserts
    it, minutes into an export) and fails at run time on bf16 activations with 8-bit weights; the
    portable kernels dequantize weights per output channel only (group-wise weights would be
    folded back to float at export). The quantization is for the first backend of a list (the
    one offered the quantized layers first); OpenVINO's, Vulkan's and Core ML's rules are
    :func:`_check_openvino_support`, :func:`_check_vulkan_support` and :func:`_check_coreml_support`.
    Runs after :meth:`ExportConfig._resolve_quantization`.
    """
    scheme, gs = cfg.qlinear, cfg.qlinear_group_size
    own = [f for f, v in (("qlinear", scheme), ("qhead", cfg.head_scheme)) if v in OWN_KERNEL_SCHEMES]
    if own and cfg.dtype != "float32":
        raise InvalidConfigError(
            f"{own[0]}={(scheme if own[0] == 'qlinear' else cfg.head_scheme)!r} needs dtype='float32' (its kernel "
            f"takes float32 activations; the weights are 4-bit either way), got dtype={cfg.dtype!r}; use "
            f"dtype='float32' or {own[0]}='8da4w'."
        )
    if any(b in SINGLE_TOKEN_BACKENDS for b in cfg.backends):
        _check_single_token(cfg)
    first = {"openvino": _check_openvino_support, "vulkan": _check_vulkan_support, "coreml": _check_coreml_support}
    if cfg.backends[0] in first:
        first[cfg.backends[0]](cfg)
        return
    if cfg.backends[0] == "xnnpack":
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
        if gs is not None and gs % XNNPACK_GROUP_MULTIPLE:
            raise InvalidConfigError(
                f"qlinear_group_size={gs} cannot run on backend='xnnpack': XNNPACK delegates groupwise "
                f"4-bit weights only in groups that are multiples of {XNNPACK_GROUP_MULTIPLE}. Use "
                f"{XNNPACK_GROUP_MULTIPLE}, 64, 128 or 256, or None (one scale per output channel)."
            )
        head = cfg.head_scheme
        eight = "8da8w" if cfg.qlinear_8bit and scheme in ("8da4w", "q4_0", "8da4w_own") else None
        for field, value in (("qlinear", scheme), ("qhead", head), ("qlinear_8bit", eight)):
            if value == "8da8w" and cfg.dtype == "bfloat16":
                raise InvalidConfigError(
                    f"{field}='8da8w' with dtype='bfloat16' cannot run on backend='xnnpack' (no bf16 kernel "
                    f"for 8-bit weights); use dtype='float32' or 'float16', or {field}='8da4w'."
                )
    if cfg.backend == "portable" and gs is not None:
        raise InvalidConfigError(
            f"qlinear_group_size={gs} cannot run on backend='portable' (4-bit layers: qlinear={scheme!r}, "
            f"head {cfg.head_scheme!r}): its kernels dequantize weights per output channel only. Use "
            f"qlinear_group_size=None, or leave it out."
        )


@dataclass(frozen=True)
class ExportConfig:
    """What program to build from a Hugging Face causal LM.

    Args:
        max_seq_len: Length of the static KV cache, i.e. the whole context (prompt + generated
            tokens) the program can hold. One forward call may take up to this many tokens.
        dtype: Weights and activations dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``
            (``"fp32"``, ``"bf16"``, ``"fp16"`` are accepted and normalised).
        backend: ``"xnnpack"`` (default; delegates to XNNPACK), ``"portable"`` (no delegate) or
            ``"openvino"`` (OpenVINO delegates; one token per call), ``"vulkan"`` (float32 only; runs
            on ExecuTorch builds with Vulkan, not here), ``"coreml"`` (Core ML delegates, one token per
            call; runs on Apple devices, not here), or an ordered tuple of the
            delegating ones, e.g. ``("openvino", "xnnpack")``: each backend's partitioners are offered
            the graph in that order, so the first takes every operator it supports and the next gets
            what is left. The quantization fields are for the first backend. A one-name tuple is
            stored as the name; see :attr:`backends`.
        qlinear: Quantization of linear layers: ``None``, ``"8da4w"``, ``"8da8w"``, ``"4w"``, ``"8w"``.
        qlinear_group_size: Group size of 4-bit linear weights (``qlinear`` or ``qhead`` ``"8da4w"``/
            ``"4w"``), a power of two, or ``None`` for one scale per output channel. The default,
            :data:`AUTO`, is the scheme's default: 32 on XNNPACK (a multiple of 32 is required
            there), per channel on ``portable``; with no 4-bit layer it resolves to ``None``, and
            any other value raises (8-bit weights are always per channel). A layer whose input
            size the group size does not divide is quantized per output channel instead (logged).
        qhead: Quantization of the output head: ``"same"`` as ``qlinear``; ``None`` keeps it in
            float; or a ``qlinear`` scheme of its own (``"8da8w"`` per channel, ``"8da4w"`` with
            ``qlinear_group_size``). The default, :data:`AUTO`, is ``"same"`` when ``qlinear`` is
            set and ``None`` otherwise; ``"same"`` without ``qlinear`` raises (it would change
            nothing), and ``qhead`` equal to ``qlinear`` is stored as ``"same"``.
        qlinear_8bit: Module-name patterns (``fnmatch``, e.g. ``"*.mlp.down_proj"``) of linear layers
            that get 8-bit weights per output channel instead of ``qlinear``'s 4 bits (``8da8w`` for
            the dynamic-activation schemes, ``8w`` for weight-only): the mixed-precision knob for the
            layers most sensitive to 4-bit weights.
        qembedding: Quantization of the token embedding: ``None``, ``"4w"``, ``"8w"``.
        qembedding_group_size: Group size for ``qembedding``, a power of two, or ``None`` for one
            scale per embedding row; setting it without ``qembedding`` raises.
        kv_cache_dtype: ``None`` caches keys and values in ``dtype``; ``"int8"`` quantizes them per
            token and head and runs ExecuTorch's ``llama.custom_quantized_sdpa``.
        logits: ``"last"`` (default): ``forward`` returns the last position's logits, which is all
            generation needs; ``"all"``: every position's, for evaluation (perplexity) programs.
        verify_tokens: with ``logits="last"``, ``forward`` returns the logits of the last
            ``verify_tokens`` positions (``[1, k, vocab]``, padding rows when ``S < k``), so assisted generation
            verifies ``k - 1`` drafted tokens in one call; ``1`` builds the ``[1, vocab]`` program
            of earlier versions. An XNNPACK head then computes ``k`` rows on every call, decode
            steps included; a head on our kernel (``q4_0``, ``8da4w_own``) computes and returns
            ``min(S, k)``. Defaults (:data:`AUTO`) to :data:`OWN_HEAD_VERIFY_TOKENS` (8) for a head
            on our kernel, else :data:`DEFAULT_VERIFY_TOKENS` (1); setting it with
            ``logits="all"`` raises (every position is returned already).
        qvision: Quantization of an image-text-to-text model's vision encoder (its linear layers):
            ``None`` (float), ``"8da8w"`` or ``"8da4w"`` (groups of ``qlinear_group_size``, 32
            without one). The default, :data:`AUTO`, is ``"8da8w"`` when ``qlinear`` is set and
            ``None`` otherwise. Text-only models have no vision encoder: exporting one with
            ``qvision`` set raises.

    Raises:
        InvalidConfigError: a field has a value outside the accepted set (the message lists it), a
            value that has no effect under the other fields, or one the backend cannot run.
    """

    max_seq_len: int = 1024
    dtype: str = "float32"
    backend: str | tuple[str, ...] = "xnnpack"
    qlinear: str | None = None
    qlinear_group_size: int | str | None = AUTO
    qhead: str | None = AUTO
    qlinear_8bit: tuple[str, ...] = ()
    qembedding: str | None = None
    qembedding_group_size: int | None = None
    kv_cache_dtype: str | None = None
    logits: str = "last"
    verify_tokens: int | str | None = AUTO
    qvision: str | None = AUTO

    def __post_init__(self) -> None:
        # What the caller asked for, before AUTO is resolved: replace() starts from it.
        object.__setattr__(self, "_requested", {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
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
        object.__setattr__(self, "backend", _normalise_backend(self.backend))
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
        if patterns and self.qlinear not in ("8da4w", "4w", "q4_0", "8da4w_own"):
            raise InvalidConfigError(
                f"qlinear_8bit={tuple(patterns)!r} needs a 4-bit qlinear ('8da4w', '4w', 'q4_0' or '8da4w_own') to differ from; "
                f"qlinear is {self.qlinear!r}."
            )
        if self.qhead not in (AUTO, *QHEAD_CHOICES):
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
        self._resolve_quantization()
        self._resolve_verify_tokens()
        self._resolve_qvision()
        _check_backend_support(self)

    def _resolve_verify_tokens(self) -> None:
        k = self.verify_tokens
        if self.logits == "all":
            if k not in (AUTO, None):
                raise _NoEffectError(
                    "verify_tokens",
                    f"verify_tokens={k!r} has no effect with logits='all': forward already returns every "
                    f"position's logits. Leave it out.",
                )
            object.__setattr__(self, "verify_tokens", None)
            return
        if k == AUTO:
            own_head = self.head_scheme in OWN_KERNEL_SCHEMES and self.backends == ("xnnpack",)
            k = OWN_HEAD_VERIFY_TOKENS if own_head else DEFAULT_VERIFY_TOKENS
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_VERIFY_TOKENS:
            raise InvalidConfigError(
                f"verify_tokens={k!r} is not valid: it must be an integer from 1 to {MAX_VERIFY_TOKENS} "
                f"(positions whose logits one forward call returns; 1 for the last position only)."
            )
        object.__setattr__(self, "verify_tokens", k)

    def _resolve_quantization(self) -> None:
        """Resolve :data:`AUTO`; raise :class:`_NoEffectError` for a value nothing would use."""
        qlinear, qhead, gs = self.qlinear, self.qhead, self.qlinear_group_size
        if qhead == AUTO:
            qhead = "same" if qlinear else None
        elif qhead == "same" and qlinear is None:
            raise _NoEffectError(
                "qhead",
                "qhead='same' has no effect with qlinear=None: the head would follow linear layers that stay "
                "in float. Leave qhead out, or give the head a scheme of its own (e.g. qhead='8da8w').",
            )
        elif qhead is not None and qhead == qlinear:
            qhead = "same"  # the same program: one spelling, one cache key
        object.__setattr__(self, "qhead", qhead)
        four_bit = [s for s in dict.fromkeys((qlinear, self.head_scheme)) if s in FOUR_BIT_SCHEMES]
        if gs == AUTO:
            # a backend without an entry has no 4-bit scheme: _check_backend_support refuses it
            gs = DEFAULT_GROUP_SIZE.get(self.backends[0]) if four_bit else None
        elif gs is not None and not four_bit and any(
            s in OWN_KERNEL_SCHEMES for s in (qlinear, self.head_scheme)
        ):
            raise _NoEffectError(
                "qlinear_group_size",
                f"qlinear_group_size={gs} has no effect: {qlinear!r} (head {self.head_scheme!r}) runs on our kernel, "
                f"whose 4-bit weights always come in groups of 32 (its block). Leave it out (or pass None).",
            )
        elif gs is not None and not four_bit:
            raise _NoEffectError(
                "qlinear_group_size",
                f"qlinear_group_size={gs} has no effect: no linear layer gets 4-bit weights (qlinear={qlinear!r}, "
                f"head {self.head_scheme!r}), and 8-bit weights always have one scale per output channel. "
                f"Leave it out (or pass None), or choose a 4-bit scheme such as qlinear='8da4w'.",
            )
        object.__setattr__(self, "qlinear_group_size", gs)
        if self.qembedding is None and self.qembedding_group_size is not None:
            raise _NoEffectError(
                "qembedding_group_size",
                f"qembedding_group_size={self.qembedding_group_size} has no effect with qembedding=None (the "
                f"embedding stays in {self.dtype}). Leave it out, or quantize the embedding (qembedding='8w' "
                f"or '4w').",
            )

    def _resolve_qvision(self) -> None:
        value = self.qvision
        if value == AUTO:
            value = "8da8w" if self.qlinear else None
        if value not in VISION_SCHEMES:
            raise InvalidConfigError(f"qvision={value!r} is not valid; use one of {list(VISION_SCHEMES)}.")
        object.__setattr__(self, "qvision", value)

    @property
    def qvision_requested(self) -> bool:
        """Whether ``qvision`` was given (not left at :data:`AUTO`): only a vision model can honour it."""
        return self._requested["qvision"] != AUTO

    @property
    def backends(self) -> tuple[str, ...]:
        """:attr:`backend` as a tuple of names, in the order their partitioners pick operators."""
        return (self.backend,) if isinstance(self.backend, str) else self.backend

    @property
    def tokens_per_call(self) -> int:
        """Most tokens one ``forward`` call takes: ``max_seq_len``, or 1 with a backend of
        :data:`SINGLE_TOKEN_BACKENDS` (its delegates run static shapes)."""
        return 1 if any(b in SINGLE_TOKEN_BACKENDS for b in self.backends) else self.max_seq_len

    @property
    def uses_own_kernels(self) -> bool:
        """Whether the program needs our kernel library (:data:`OWN_KERNEL_SCHEMES`); such programs
        also run their float32 attention through our ``et_transformers::sdpa`` kernel."""
        return any(s in OWN_KERNEL_SCHEMES for s in (self.qlinear, self.head_scheme))

    @property
    def head_scheme(self) -> str | None:
        """The output head's scheme: ``qlinear`` when ``qhead`` is ``"same"``, else ``qhead``."""
        return self.qlinear if self.qhead in ("same", AUTO) else self.qhead

    def linear_group_size(self, scheme: str | None) -> int | None:
        """Group size of the linear layers quantized with ``scheme``.

        Args:
            scheme: a :data:`QLINEAR_SCHEMES` name, or ``None``.

        Returns:
            ``qlinear_group_size`` for 4-bit schemes; ``None`` (one scale per output channel) for
            8-bit ones and for float layers.
        """
        return self.qlinear_group_size if scheme in FOUR_BIT_SCHEMES else None

    @property
    def torch_dtype(self):
        """The ``torch.dtype`` named by :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict (used in manifests and cache keys)."""
        data = dataclasses.asdict(self)
        data["qlinear_8bit"] = list(self.qlinear_8bit)
        if not isinstance(self.backend, str):
            data["backend"] = list(self.backend)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExportConfig":
        """Build a config from :meth:`to_dict` output, e.g. a stored manifest.

        A stored dict may hold fields with no effect (older versions wrote the then-default
        ``qlinear_group_size=32`` and ``qhead='same'`` with ``qlinear=None``): they are reset to
        their defaults, which builds the same program, rather than refused.

        Raises:
            InvalidConfigError: unknown keys, or a value that is not valid.
        """
        data = dict(data)
        if "verify_tokens" not in data:  # written before programs verified drafts: last position only
            data["verify_tokens"] = None if data.get("logits") == "all" else 1
        for _ in range(len(dataclasses.fields(cls)) + 1):
            try:
                return cls().replace(**data)
            except _NoEffectError as e:
                logger.debug("Stored export config: %s was reset to its default (%s)", e.field, e)
                data[e.field] = cls.__dataclass_fields__[e.field].default
        raise AssertionError("unreachable: every field can be reset once")

    def replace(self, **overrides: Any) -> "ExportConfig":
        """Return a copy with ``overrides`` applied to the fields as this config was asked for.

        Defaults left at :data:`AUTO` are resolved again, so ``ExportConfig().replace(qlinear="8da4w")``
        gets 4-bit groups of 32 and a quantized head. (``dataclasses.replace`` would pass the
        resolved values on as if given: use this method.)

        Raises:
            InvalidConfigError: an override names no field of ``ExportConfig``, or has a bad value.
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InvalidConfigError(
                f"unknown ExportConfig field(s) {unknown}; the fields are "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return type(self)(**{**self._requested, **overrides})


#: Named export recipes: ``ExportConfig`` fields per name (4-bit recipes get XNNPACK's default groups
#: of 32 from :data:`DEFAULT_GROUP_SIZE`). ``DEFAULT_RECIPE`` is what
#: ``from_pretrained`` builds when given neither a recipe nor an ``ExportConfig``; the README's
#: quality/speed table (produced by ``benchmarks/quality.py``) says why it is the default.
RECIPES: dict[str, dict[str, Any]] = {
    "xnnpack-fp32": {},
    "xnnpack-8da8w": {"qlinear": "8da8w", "qembedding": "8w"},
    "xnnpack-8da4w": {"qlinear": "8da4w", "qhead": "8da8w", "qlinear_8bit": ("*.mlp.down_proj",), "qembedding": "8w"},
    "xnnpack-8da4w-kv8": {
        "qlinear": "8da4w", "qhead": "8da8w", "qlinear_8bit": ("*.mlp.down_proj",), "qembedding": "8w",
        "kv_cache_dtype": "int8",
    },
    "xnnpack-8da4w-pure": {"qlinear": "8da4w", "qembedding": "8w"},
    # our own kernels (x86-64 AVX2; the program runs only where et_transformers loads them): every
    # linear, the head too, in q4_0; the -head8 variant keeps an 8-bit head (better quality, slower)
    "xnnpack-q4_0": {"qlinear": "q4_0", "qembedding": "8w"},
    "xnnpack-q4_0-head8": {"qlinear": "q4_0", "qhead": "8da8w", "qembedding": "8w"},
    # xnnpack-8da4w-pure's numerics (the peer's scheme: 8da4w in groups of 32 everywhere, 8-bit
    # embeddings) with every linear on our kernel instead of XNNPACK's
    "xnnpack-8da4w-own": {"qlinear": "8da4w_own", "qembedding": "8w"},
    "portable-fp32": {"backend": "portable"},
    # OpenVINO (pip install "et-transformers[openvino]"): one token per call; attention and the KV
    # cache stay on ExecuTorch's kernels between OpenVINO subgraphs (see export/backends.py)
    "openvino-fp32": {"backend": "openvino"},
    # NNCF weight compression: int4 linears in groups of 128, int8 embedding and head
    "openvino-4w": {"backend": "openvino", "qlinear": "4w", "qhead": "8w", "qembedding": "8w"},
    # Vulkan GPUs: exported here, run elsewhere (no pip wheel's runtime has Vulkan). -4w: float32
    # activations, int4 weight-only linears in groups of 32, the head too (Vulkan's linear_q4gsw), and a
    # 4-bit embedding (its embedding_q4gsw)
    "vulkan-fp32": {"backend": "vulkan"},
    "vulkan-4w": {"backend": "vulkan", "qlinear": "4w", "qembedding": "4w"},
    # Core ML (Apple devices): exported here, run there; one token per call, attention and the KV cache
    # on ExecuTorch's kernels between Core ML subgraphs. -4w: int4 weight-only linears in blocks of 32
    # (ExecuTorch's Core ML b4w), the head too, and a 4-bit embedding
    "coreml-fp16": {"backend": "coreml", "dtype": "float16"},
    "coreml-4w": {"backend": "coreml", "dtype": "float16", "qlinear": "4w", "qembedding": "4w"},
}
#: The default where our kernels cannot run here (another CPU or OS, no C++ compiler), and for
#: programs that must run on a stock ExecuTorch runtime (phones, the C++ runner without us).
PORTABLE_DEFAULT_RECIPE = "xnnpack-8da4w"
#: The default where our kernels build and run: faster and better than llama.cpp's Q4_0 here (README).
OWN_KERNELS_DEFAULT_RECIPE = "xnnpack-q4_0"


def default_recipe() -> str:
    """The recipe ``from_pretrained`` builds when given none: :data:`OWN_KERNELS_DEFAULT_RECIPE` on
    an x86-64 Linux CPU with AVX2/FMA/F16C and a C++ compiler (where :mod:`et_transformers.kernels`
    builds), else :data:`PORTABLE_DEFAULT_RECIPE`."""
    from .kernels import available

    return OWN_KERNELS_DEFAULT_RECIPE if available() else PORTABLE_DEFAULT_RECIPE


#: This machine's default recipe (see :func:`default_recipe`).
DEFAULT_RECIPE = default_recipe()


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
    """The named recipe ``export_config`` is (at its own context length and ``verify_tokens``), or ``None``."""
    mine = {**export_config.to_dict(), "verify_tokens": None}
    for name in RECIPES:
        if {**recipe(name, max_seq_len=export_config.max_seq_len).to_dict(), "verify_tokens": None} == mine:
            return name
    return None

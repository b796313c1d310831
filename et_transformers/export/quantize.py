"""Quantization stage: linear and embedding layers → modules in ExecuTorch's quantized-op vocabulary.

Weights are quantized by torchao with the configs of ExecuTorch's own LLM helpers
(``executorch.extension.llm.export.quantize``: symmetric, HQQ scale search), so a scheme means here
exactly what it means in ExecuTorch's ``export_llm``. The quantized layers then compute with
``quantized_decomposed`` ops, the vocabulary XNNPACK's partitioner and ExecuTorch's quantized
kernels consume directly:

* ``8da4w`` / ``8da8w``: per-token dynamic int8 activations (``choose_qparams_per_token_asymmetric``
  → ``quantize_per_token`` → ``dequantize_per_token``) times dequantized int4/int8 weights; XNNPACK
  fuses the pattern into one dynamically-quantized GEMM;
* ``4w`` / ``8w``: float activations times dequantized weights (with Core ML first, dequantized
  by torchao's ``dequantize_affine``, the op Core ML's converter stores as 4/8-bit constants:
  ``Backend.weight_ops`` in :mod:`.backends`; with Vulkan first, 4-bit ones are fused by its
  partitioner into ``et_vk.linear_q4gsw``, or ``et_vk.linear_qcs4w`` when per channel);
* ``q4_0``: our own kernel, ``et_transformers::q4_linear`` (:mod:`et_transformers.kernels`): int4
  weights in groups of 32 with float16 scales, activations quantized to int8 per block of 32
  inside the kernel (llama.cpp's Q4_0 x Q8_0 arithmetic); a layer whose shape the kernel's layout
  cannot hold (out features not a multiple of 8, in features not of 32) gets ``8da8w`` instead;
* ``8da4w_own``: ``8da4w``'s weights (torchao's, group 32) and activations (per-token asymmetric
  int8) run by our ``et_transformers::q4_linear_per_token`` kernel in ``q4_0``'s weight layout
  (scales stored as float16); a layer the layout cannot hold gets XNNPACK's ``8da4w``;
* embeddings: ``embedding_byte`` / ``embedding_4bit`` lookups.

We use this vocabulary rather than torchao's tensor subclasses in the graph because the subclasses'
ops are composite-implicit: every pass of lowering re-traces their Python bodies, which made
lowering several times slower (measured: see ``benchmarks/export.py``). Numerics are unchanged:
the quantized values are torchao's.

Per-layer policy: a layer whose input size the requested group size does not divide is quantized
per output channel instead (a finer grouping is impossible and leaving it in float would be a
silent change); each such layer is logged. The output head, often tied to the embedding and the
layer most sensitive to 4-bit weights, follows ``ExportConfig.qhead`` (like the others by default,
or its own scheme, or float). Tied embedding and head are stored as two tensors once quantized:
XNNPACK packs the head's weights into its own layout, which the embedding lookup cannot read.

Memory: each weight is cast to the export dtype only when its turn comes and is quantized a block
of rows at a time (:data:`CHUNK_ELEMENTS`), so a half-precision checkpoint loaded as stored never
exists whole in float32 and a large vocabulary's head adds no GB-sized temporaries.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExportConfig

logger = logging.getLogger(__name__)

#: scheme -> (weight bits, dynamic int8 activations)
LINEAR_SCHEMES: dict[str, tuple[int, bool]] = {
    "8da4w": (4, True),
    "8da8w": (8, True),
    "4w": (4, False),
    "8w": (8, False),
    "q4_0": (4, True),
    "8da4w_own": (4, True),
}
#: Fixed group size of the ``q4_0`` and ``8da4w_own`` schemes (their kernel's block).
Q4_GROUP_SIZE = 32
#: scheme -> weight bits
EMBEDDING_SCHEMES: dict[str, int] = {"4w": 4, "8w": 8}

_PER_CHANNEL = 0  # group size ExecuTorch's helpers use for "one group per output channel"


def _qd():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    return torch.ops.quantized_decomposed


#: Rows of a weight quantized per torchao call: about 16M elements (64 MB in float32), so the
#: temporaries of a 128k-vocabulary head stay in the hundreds of MB. Groups lie along rows, so
#: the result is bit-identical to one call over the whole weight.
CHUNK_ELEMENTS = 1 << 24


def _torchao_quantize(weight: torch.Tensor, config, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``[N, K]`` weight, first cast to ``dtype``, with a torchao config, a block of rows
    at a time; return int8 ``qdata`` and ``scale``.

    ExecuTorch's configs are symmetric: zero points are all zero and not kept.
    """
    from torchao.quantization import quantize_

    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    qdata, scales = [], []
    for start in range(0, weight.shape[0], rows):
        block = weight.detach()[start : start + rows].to(dtype).float()
        holder = nn.Sequential(nn.Linear(block.shape[1], block.shape[0], bias=False, device="meta"))
        holder[0].weight = nn.Parameter(block, requires_grad=False)
        quantize_(holder, config)
        q = holder[0].weight
        if q.zero_point is not None and bool((q.zero_point != 0).any()):
            raise ValueError("expected symmetric quantization (zero points 0) from ExecuTorch's config.")
        qdata.append(q.qdata)
        scales.append(q.scale.float())
        del holder, q, block
    if len(qdata) == 1:
        return qdata[0].contiguous(), scales[0].contiguous()
    return torch.cat(qdata).contiguous(), torch.cat(scales).contiguous()


class QuantizedLinear(nn.Module):
    """A linear layer with int4/int8 weights, optionally with dynamic int8 activations.

    Args:
        qdata: ``[out, in]`` int8 values (in ``[-8, 7]`` for 4-bit).
        scale: ``[out, in // group_size]`` float32 (``[out, 1]`` for per-channel).
        bits: 4 or 8.
        group_size: elements per scale along the input dim (``in`` for per-channel).
        dynamic_activations: quantize activations per token to int8 on the fly.
        bias: optional float bias.
        affine: dequantize with torchao's ``dequantize_affine`` (what Core ML converts) instead of
            ``quantized_decomposed`` (what XNNPACK and ExecuTorch's kernels take); weight-only only.
    """

    def __init__(self, qdata, scale, bits: int, group_size: int, dynamic_activations: bool, bias=None,
                 affine: bool = False):
        super().__init__()
        if affine and dynamic_activations:
            raise ValueError("affine dequantization is for weight-only layers (no dynamic activations).")
        self.bits, self.group_size, self.dynamic_activations = bits, group_size, dynamic_activations
        self.affine = affine
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        if self.per_channel:
            scale = scale.reshape(-1)  # [out]: the graph must see the buffer itself, not a view of it
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        # Symmetric: all zero. XNNPACK's lowering wants the zero points as a tensor all the same.
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (the group spans the whole input)."""
        return self.group_size >= self.in_features

    def extra_repr(self) -> str:
        kind = "8da" if self.dynamic_activations else ""
        return f"{self.in_features}, {self.out_features}, {kind}{self.bits}w, group_size={self.group_size}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight these int values stand for."""
        qd = _qd()
        qmin, qmax = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        if self.affine:
            import torchao.quantization.quant_primitives  # noqa: F401  (registers torchao::dequantize_affine)

            return torch.ops.torchao.dequantize_affine(
                self.qdata, [1, self.group_size], self.scale, None, torch.int8, qmin, qmax, dtype
            )
        if self.per_channel:
            return qd.dequantize_per_channel(
                self.qdata, self.scale, self.zero_point, 0, qmin, qmax, torch.int8, out_dtype=dtype
            )
        return qd.dequantize_per_channel_group(
            self.qdata, self.scale, self.zero_point, qmin, qmax, torch.int8, self.group_size, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with ``W`` dequantized (and ``x`` fake-quantized per token if dynamic)."""
        if self.dynamic_activations:
            qd = _qd()
            scale, zero = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
            xq = qd.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
            x = qd.dequantize_per_token(xq, scale, zero, -128, 127, torch.int8, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def _q4_call(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, weight_sums: torch.Tensor | None):
    """Our kernel on ``x``: ``q4_linear`` (``q4_0``), or with ``weight_sums`` ``q4_linear_per_token`` (``8da4w_own``)."""
    if weight_sums is None:
        return torch.ops.et_transformers.q4_linear(x, qweight, scales)
    return torch.ops.et_transformers.q4_linear_per_token(x, qweight, scales, weight_sums)


class Q4Linear(nn.Module):
    """A linear layer run by our kernels: ``et_transformers::q4_linear`` (the ``q4_0`` scheme), or with
    ``weight_sums`` ``et_transformers::q4_linear_per_token`` (the ``8da4w_own`` scheme).

    Args:
        qweight: packed int4 values, uint8 ``[out/8, in/32, 128]`` (:func:`~et_transformers.kernels.ops.pack_q4`).
        scales: float16 ``[out/8, in/32, 8]``.
        bias: optional float bias, added after the kernel.
        weight_sums: float32 ``[out]`` (:func:`~et_transformers.kernels.ops.weight_sums`) for
            per-token activations, or ``None`` for ``q4_0``'s per-block ones.
    """

    def __init__(self, qweight, scales, bias=None, weight_sums=None):
        super().__init__()
        from ..kernels import ops  # noqa: F401  (defines the operator)

        self.out_features, self.in_features = qweight.shape[0] * 8, qweight.shape[1] * 32
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("weight_sums", weight_sums)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def scheme(self) -> str:
        """``"q4_0"`` or ``"8da4w_own"``."""
        return "q4_0" if self.weight_sums is None else "8da4w_own"

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with the kernel's arithmetic (its bit-exact reference in eager)."""
        y = _q4_call(x, self.qweight, self.scales, self.weight_sums)
        return y if self.bias is None else y + self.bias


class _LastCall:
    """The input and output of a fused layer's last call (a plain object: not module state)."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> "_LastCall":
        return _LastCall()  # a copy of the module starts with nothing remembered


class FusedQ4Linear(nn.Module):
    """Sibling :class:`Q4Linear` layers that read the same input (q/k/v, gate/up) as one kernel call.

    Their packed weights are concatenated along the output rows (groups of 8 rows are independent
    in the layout, so each output is computed exactly as before); the siblings become
    :class:`Q4LinearSlice` views that call this once per input and take their columns.
    """

    def __init__(self, parts: list[Q4Linear]):
        super().__init__()
        self.in_features = parts[0].in_features
        self.register_buffer("qweight", torch.cat([p.qweight for p in parts]))
        self.register_buffer("scales", torch.cat([p.scales for p in parts]))
        per_token = parts[0].weight_sums is not None
        self.register_buffer("weight_sums", torch.cat([p.weight_sums for p in parts]) if per_token else None)
        self.scheme = parts[0].scheme
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        has_bias = any(p.bias is not None for p in parts)
        self.bias = nn.Parameter(torch.cat(biases), requires_grad=False) if has_bias else None
        self._last = _LastCall()

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.qweight.shape[0] * 8}, {self.scheme} fused"

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The fused output for ``x``, computed once per input tensor."""
        if self._last.x is not x:
            y = _q4_call(x, self.qweight, self.scales, self.weight_sums)
            self._last.x, self._last.y = x, (y if self.bias is None else y + self.bias)
        return self._last.y


class Q4LinearSlice(nn.Module):
    """One of the layers a :class:`FusedQ4Linear` computes: its columns ``[start, stop)``."""

    def __init__(self, fused: FusedQ4Linear, start: int, stop: int):
        super().__init__()
        self._fused = (fused,)  # a tuple: the fused module is registered once, on the parent
        self.start, self.stop = start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._fused[0].scheme} columns [{self.start}, {self.stop})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's columns of the fused output."""
        return self._fused[0].output(x)[..., self.start : self.stop]


#: Sibling layers that read the same input in the families' attention and MLP blocks.
FUSABLE_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_q4_siblings(model: nn.Module) -> int:
    """Replace each set of :data:`FUSABLE_SIBLINGS` that are all :class:`Q4Linear` by one fused call.

    Returns:
        How many fused layers were made.
    """
    made = 0
    for parent in list(model.modules()):
        for names in FUSABLE_SIBLINGS:
            parts = [getattr(parent, n, None) for n in names]
            if not all(type(p) is Q4Linear for p in parts) or len({(p.in_features, p.scheme) for p in parts}) != 1:
                continue
            fused = FusedQ4Linear(parts)
            parent.add_module("".join(n.split("_")[0] for n in names) + "_fused", fused)  # qkv_fused, gateup_fused
            start = 0
            for name, part in zip(names, parts):
                setattr(parent, name, Q4LinearSlice(fused, start, start + part.out_features))
                start += part.out_features
            made += 1
    return made


class QuantizedEmbedding(nn.Module):
    """An embedding table with int4/int8 rows looked up by ExecuTorch's quantized embedding ops.

    Args:
        qdata: ``[vocab, dim]`` int8 values.
        scale: ``[vocab, dim // group_size]`` float32.
        bits: 4 or 8.
        dtype: output dtype.
    """

    def __init__(self, qdata, scale, bits: int, dtype: torch.dtype):
        super().__init__()
        self.bits, self.out_dtype = bits, dtype
        self.num_embeddings, self.embedding_dim = qdata.shape
        if bits == 4:
            from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401

            # Two values per byte, in the layout ExecuTorch's embedding_4bit kernel reads.
            qdata = torch.ops.quant_fusion._pack_embedding_weight(qdata, 4)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}w"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows for ``ids``."""
        from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401

        qd = torch.ops.quantized_decomposed
        scale = self.scale.to(self.out_dtype)
        if self.bits == 8:
            return qd.embedding_byte.dtype(self.qdata, scale, None, -128, 127, ids, dtype=self.out_dtype)
        return qd.embedding_4bit.dtype(self.qdata, scale, None, -8, 7, ids, dtype=self.out_dtype)


def _group_size_for(name: str, in_dim: int, requested: int | None, scheme: str, fallbacks: list[str]) -> int:
    if requested is None:
        return _PER_CHANNEL
    if in_dim % requested:
        fallbacks.append(name)
        return _PER_CHANNEL
    return requested


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _q4_linear(
    name: str, module: nn.Linear, dtype: torch.dtype, fallbacks: list[str], importance: torch.Tensor | None
) -> Q4Linear | None:
    """``module`` as a :class:`Q4Linear` (scales searched against ``importance``, see
    :mod:`.weight_search`; stored as float16), or ``None`` (recorded in ``fallbacks``) when the
    kernel's layout cannot hold its shape."""
    from ..kernels.ops import pack_q4, packable
    from .weight_search import search_q4

    out_features, in_features = module.weight.shape
    if not packable(out_features, in_features):
        fallbacks.append(name)
        return None
    qdata, scale = search_q4(module.weight.detach().to(dtype), importance)
    qweight, scales = pack_q4(qdata, scale)
    bias = None if module.bias is None else module.bias.to(dtype)
    return Q4Linear(qweight, scales, bias)


def _q4_per_token_linear(name: str, module: nn.Linear, dtype: torch.dtype, fallbacks: list[str]) -> Q4Linear | None:
    """``module`` as an ``8da4w_own`` :class:`Q4Linear`: torchao's ``8da4w`` weights in groups of 32
    (ExecuTorch's config, as for ``8da4w``) in the kernel's layout, or ``None`` (recorded in
    ``fallbacks``) when the layout cannot hold its shape."""
    from executorch.extension.llm.export.quantize import _make_linear_config

    from ..kernels.ops import pack_q4, packable, weight_sums

    out_features, in_features = module.weight.shape
    if not packable(out_features, in_features):
        fallbacks.append(name)
        return None
    qdata, scale = _torchao_quantize(module.weight, _make_linear_config("8da4w", Q4_GROUP_SIZE), dtype)
    qweight, scales = pack_q4(qdata, scale)
    bias = None if module.bias is None else module.bias.to(dtype)
    return Q4Linear(qweight, scales, bias, weight_sums(qweight, scales))


def output_head_name(model: nn.Module) -> str | None:
    """The qualified name of the model's output head (its ``get_output_embeddings()``), if a Linear."""
    for owner in model.modules():
        getter = getattr(owner, "get_output_embeddings", None)
        if callable(getter):
            head = getter()
            if isinstance(head, nn.Linear):
                return next((n for n, m in model.named_modules() if m is head), None)
    return None


def _linear_plan(name: str, head: str | None, config: ExportConfig) -> tuple[str | None, int | None]:
    """``(scheme, group size)`` for one linear layer: the head may have its own (``config.qhead``);
    8-bit weights are always per output channel (``config.linear_group_size``)."""
    if name != head and config.qlinear_8bit and any(fnmatch.fnmatchcase(name, p) for p in config.qlinear_8bit):
        return ("8da8w" if LINEAR_SCHEMES[config.qlinear][1] else "8w"), None
    scheme = config.head_scheme if name == head else config.qlinear
    return scheme, config.linear_group_size(scheme)


def float_layer_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights :func:`quantize_model` reads: those of ``model``'s ``nn.Linear`` and
    ``nn.Embedding`` layers (the dtype stage leaves them to it when quantization is asked for)."""
    return [m.weight for m in model.modules() if type(m) in (nn.Linear, nn.Embedding)]


def quantize_model(
    model: nn.Module,
    config: ExportConfig,
    dtype: torch.dtype | None = None,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Replace ``model``'s linear and embedding layers by quantized ones, as ``config`` asks.

    Each weight is cast to ``dtype`` just before it is quantized, so a model whose other parts
    are already in ``dtype`` may keep these weights in their stored dtype until then (peak memory:
    one layer in float32, not the whole model). Linear and embedding layers left in float are cast
    to ``dtype`` at the end.

    Args:
        model: the module to quantize in place.
        config: ``qlinear``/``qembedding`` of ``None`` leave those layers in float; ``qhead``
            decides the output head (see :func:`_linear_plan`).
        dtype: the model's final dtype; ``config.torch_dtype`` by default.
        importance: per linear layer name, the mean square of its input channels
            (:func:`.weight_search.input_importance`); ``q4_0`` layers choose their scales with
            it (layers without an entry weigh their inputs alike).

    Returns:
        ``{"linear": {...}, "embedding": {...}, "head": {...}}``: counts of layers quantized with
        their group size and of those that fell back to per-channel, and the head's scheme.
    """
    from executorch.extension.llm.export.quantize import _make_embedding_config, _make_linear_config

    from .backends import weight_ops_for

    affine = weight_ops_for(config) == "torchao"
    report: dict[str, dict] = {}
    dtype = dtype or config.torch_dtype
    head = output_head_name(model)
    # embeddings first: quantizing the head must not change a tied embedding's float weight under it
    embeddings = [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding] if config.qembedding else []
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    head_scheme, eight_bit = None, 0
    q4_fallbacks: list[str] = []
    own_fallbacks: list[str] = []
    for kind, targets in (("embedding", embeddings), ("linear", linears)):
        fallbacks: list[str] = []
        done = 0
        for name, module in targets:
            weight = module.weight
            if kind == "linear":
                scheme, requested = _linear_plan(name, head, config)
                if name == head:
                    head_scheme = scheme
                elif scheme != config.qlinear:
                    eight_bit += 1
                if scheme is None:
                    continue
                if scheme == "q4_0":
                    new = _q4_linear(name, module, dtype, q4_fallbacks, (importance or {}).get(name))
                    if new is not None:
                        _replace(model, name, new)
                        done += 1
                        continue
                    scheme, requested = "8da8w", None
                elif scheme == "8da4w_own":
                    new = _q4_per_token_linear(name, module, dtype, own_fallbacks)
                    if new is not None:
                        _replace(model, name, new)
                        done += 1
                        continue
                    scheme, requested = "8da4w", Q4_GROUP_SIZE  # the same numerics on XNNPACK
                group = _group_size_for(name, weight.shape[1], requested, scheme, fallbacks)
                bits, dynamic = LINEAR_SCHEMES[scheme]
                qdata, scale = _torchao_quantize(weight, _make_linear_config(scheme, group), dtype)
                bias = None if module.bias is None else module.bias.to(dtype)
                new = QuantizedLinear(qdata, scale, bits, group or weight.shape[1], dynamic, bias, affine=affine)
            else:
                scheme, requested = config.qembedding, config.qembedding_group_size
                group = _group_size_for(name, weight.shape[1], requested, scheme, fallbacks)
                bits = EMBEDDING_SCHEMES[scheme]
                qdata, scale = _torchao_quantize(weight, _make_embedding_config(scheme, group), dtype)
                new = QuantizedEmbedding(qdata, scale, bits, dtype)
            _replace(model, name, new)
            done += 1
        if fallbacks:
            logger.info(
                "%s: %d layer(s) have an input size not divisible by their group size; quantized per "
                "output channel instead: %s",
                kind,
                len(fallbacks),
                ", ".join(fallbacks[:8]) + (" ..." if len(fallbacks) > 8 else ""),
            )
        if done:
            report[kind] = {"grouped": done - len(fallbacks), "per_channel_fallback": len(fallbacks)}
    if q4_fallbacks:
        logger.info(
            "q4_0: %d layer(s) have a shape the kernel's layout cannot hold (out %% 8, in %% 32); quantized "
            "8da8w instead: %s", len(q4_fallbacks), ", ".join(q4_fallbacks[:8]) + (" ..." if len(q4_fallbacks) > 8 else ""),
        )
        report["q4_0_fallback_8da8w"] = len(q4_fallbacks)
    if own_fallbacks:
        logger.info(
            "8da4w_own: %d layer(s) have a shape the kernel's layout cannot hold (out %% 8, in %% 32); run by "
            "XNNPACK's 8da4w instead: %s", len(own_fallbacks),
            ", ".join(own_fallbacks[:8]) + (" ..." if len(own_fallbacks) > 8 else ""),
        )
        report["8da4w_own_fallback_8da4w"] = len(own_fallbacks)
    for weight in float_layer_weights(model):  # layers left in float
        if weight.is_floating_point() and weight.dtype != dtype:
            weight.data = weight.data.to(dtype)
    fused = fuse_q4_siblings(model)
    if fused:
        report["q4_0_fused"] = fused
    if head_scheme is not None:
        report["head"] = {"name": head, "scheme": head_scheme}
    if config.qlinear_8bit and config.qlinear:
        report["linear_8bit"] = eight_bit
    if report:
        logger.info("Quantized: %s", report)
    return report

"""The staged exporter: HF causal LM → exportable module → quantize → torch.export → lower → ``.pte``.

:class:`Exporter` runs one stage per method, each returning ``self``, so an advanced user can stop
after any stage, inspect or change ``exporter.module`` / ``exporter.exported_program`` /
``exporter.edge_program``, add a source transform or a partitioner, and continue::

    ex = Exporter.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", ExportConfig(qlinear="8da4w"))
    ex.load().source_transform([my_transform]).to_dtype().quantize().export()
    ex.lower([my_partitioner, *ex.default_partitioners()]).to_executorch().save("out/")

:meth:`Exporter.run` does all stages. :meth:`Exporter.save` writes a complete model folder
(``model.pte``, ``manifest.json``, config, generation config and tokenizer files) atomically: the
folder is assembled in a temporary sibling and moved into place, so a failed or interrupted export
leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import cache_rebuild_length
from ..config import ExportConfig
from ..errors import ExportError, InvalidConfigError
from ..hub import ModelSource, resolve
from ..manifest import ETRECORD_NAME, PTE_NAME, Manifest, sha256_file
from .layer_ops import apply_layer_ops
from .loading import LoadedModel, load_model
from .backends import graph_quantizer_for, keep_ops_for, partitioners_for, quantizes_graph
from .lowering import lower
from .passes import apply_xnnpack_friendly_rewrites
from .quantize import float_layer_weights, quantize_model
from .transforms import apply_builtin_transforms
from .weight_bytes import decode_weight_bytes
from .weight_search import CALIBRATION_TOKENS, calibration_ids, input_importance
from .wrapper import ExportableCausalLM

logger = logging.getLogger(__name__)

#: Stage names in order, as recorded in :attr:`Exporter.timings`.
STAGES: tuple[str, ...] = (
    "load",
    "source_transform",
    "to_dtype",
    "quantize",
    "export",
    "lower",
    "to_executorch",
    "save",
)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Exporter:
    """Export a Hugging Face decoder-only model to an ExecuTorch program, one stage at a time.

    Args:
        source: the resolved model files (see :func:`et_transformers.hub.resolve`).
        export_config: what to build; defaults to ``ExportConfig()``.
        trust_remote_code: allow models whose config declares custom code.
        progress: show a tqdm bar over the stages in :meth:`run` (``None``: only on a terminal).

    Attributes:
        loaded: output of the load stage (model, tokenizer, configs).
        module: the eager module being prepared (an :class:`ExportableCausalLM` after
            :meth:`source_transform`).
        exported_program: output of :meth:`export`.
        edge_program: output of :meth:`lower` (an ``EdgeProgramManager``).
        executorch_program: output of :meth:`to_executorch`.
        etrecord: ExecuTorch's ETRecord of the program when :meth:`lower` was asked for one
            (``generate_etrecord=True``); :meth:`save` writes it as ``etrecord.bin``.
        timings: seconds per completed stage.
        peak_rss: peak RSS in bytes after each completed stage.
    """

    #: The program's method that decodes (``text_decoder`` in image-text-to-text programs).
    decoder_method = "forward"

    def __init__(
        self,
        source: ModelSource,
        export_config: ExportConfig | None = None,
        *,
        trust_remote_code: bool = False,
        progress: bool | None = None,
    ):
        self.source = source
        self.export_config = export_config or ExportConfig()
        self.trust_remote_code = trust_remote_code
        self.progress = progress
        self.loaded: LoadedModel | None = None
        self.module: nn.Module | None = None
        self.exported_program = None
        self.edge_program = None
        self.executorch_program = None
        self.etrecord = None
        self._etrecord_requested = False
        self.quantization_report: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | os.PathLike, export_config: ExportConfig | None = None, **kwargs: Any
    ) -> "Exporter":
        """Resolve ``model_id_or_path`` (Hub id, folder or GGUF file) and return an exporter for it.

        ``kwargs`` are :func:`et_transformers.hub.resolve` options (``revision``, ``token``,
        ``gguf_file``...) plus ``trust_remote_code`` and ``progress``.
        """
        own = {k: kwargs.pop(k) for k in ("trust_remote_code", "progress") if k in kwargs}
        return cls(resolve(model_id_or_path, **kwargs), export_config, **own)

    # -- helpers -----------------------------------------------------------------------------

    def _stage(self, name: str):
        exporter = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()
                logger.info("Export stage %s ...", name)

            def __exit__(self, exc_type, exc, tb):
                if exc_type is None:
                    exporter.timings[name] = time.perf_counter() - self.t0
                    exporter.peak_rss[name] = peak_rss_bytes()
                    logger.info("Export stage %s done in %.1f s", name, exporter.timings[name])
                    return False
                if isinstance(exc, (ExportError, KeyboardInterrupt)) or not isinstance(exc, Exception):
                    return False
                from ..errors import ETTransformersError

                if isinstance(exc, ETTransformersError):
                    return False
                reason = str(exc) or f"{type(exc).__name__} (no message; see the chained traceback)"
                raise ExportError(f"export stage {name!r} failed for {exporter.source.name}: {reason}") from exc

        return _Timer()

    def _require(self, attr: str, stage: str):
        if getattr(self, attr) is None:
            raise ExportError(f"run the {stage!r} stage first.")
        return getattr(self, attr)

    # -- stages ------------------------------------------------------------------------------

    def load(self) -> "Exporter":
        """Load model, tokenizer and configs (float32, eval mode); checks the architecture first.

        Raises:
            ExportError: the model cannot run as the one-token program the backend makes.
        """
        if self.export_config.qvision_requested:
            raise InvalidConfigError(
                f"qvision={self.export_config.qvision!r} quantizes a vision encoder, and {self.source.name} is "
                f"exported as a text-only model (ETModelForCausalLM): leave qvision out, or load an "
                f"image-text-to-text model with ETModelForImageTextToText."
            )
        with self._stage("load"):
            self.loaded = load_model(
                self.source, trust_remote_code=self.trust_remote_code, max_seq_len=self.export_config.max_seq_len
            )
            self._check_one_token_calls()
            self.module = self.loaded.model
        return self

    def _check_one_token_calls(self) -> None:
        """A model that must rebuild its KV cache in one whole-sequence call (Phi-3's longrope past its
        original context) cannot run as a one-token program (``ExportConfig.tokens_per_call``)."""
        cfg, loaded = self.export_config, self.loaded
        rebuild = cache_rebuild_length(loaded.architecture, loaded.config, cfg.max_seq_len)
        if rebuild is not None and cfg.tokens_per_call < cfg.max_seq_len:
            raise ExportError(
                f"{self.source.name} switches its rotary factors for every position once a sequence passes "
                f"{rebuild} tokens, which needs one call over the whole sequence, and backend={cfg.backend!r} "
                f"runs one token per call. Export with max_seq_len={rebuild} (or less), or with backend='xnnpack'."
            )

    def source_transform(self, transforms: Sequence[Callable[[nn.Module], nn.Module]] = ()) -> "Exporter":
        """Apply ``transforms`` to the transformers model, then wrap it for export.

        The built-in transforms (always last) rewrite family-specific parts into exportable
        equivalents (:mod:`.transforms`), swap attention for ``llama.custom_sdpa`` over a static
        KV cache of ``max_seq_len`` positions and make ``forward`` return last-position logits.
        """
        self._require("loaded", "load")
        with self._stage("source_transform"):
            model = self.loaded.model
            for transform in transforms:
                model = transform(model)
            model = apply_builtin_transforms(model)
            cfg = self.export_config
            if cfg.uses_own_kernels:
                model = apply_layer_ops(model)
            self.module = ExportableCausalLM(
                model,
                cfg.max_seq_len,
                kv_cache_dtype=cfg.kv_cache_dtype,
                logits=cfg.logits,
                verify_tokens=cfg.verify_tokens or 1,
                own_kernels=cfg.uses_own_kernels,
            ).eval()
        return self

    def to_dtype(self) -> "Exporter":
        """Cast weights, activations and the KV cache to ``export_config.dtype``.

        When the config asks for quantization, linear and embedding weights are left to the
        quantize stage, which casts and quantizes them one layer at a time (a bf16 1B model then
        never exists whole in float32); run it next.
        """
        module = self._require("module", "source_transform")
        if not isinstance(module, ExportableCausalLM):
            raise ExportError("run the 'source_transform' stage before 'to_dtype'.")
        cfg = self.export_config
        with self._stage("to_dtype"):
            source_quantized = (cfg.qlinear or cfg.qembedding) and not quantizes_graph(cfg)
            deferred = float_layer_weights(module) if source_quantized else []
            module.to_dtype(cfg.torch_dtype, skip=deferred)
        return self

    def quantize(self) -> "Exporter":
        """Quantize linear and embedding layers as ``export_config`` asks (no-op when it asks none),
        casting each to ``export_config.dtype`` first. A backend with its own quantizer (OpenVINO
        first) quantizes the exported graph in :meth:`export` instead."""
        module = self._require("module", "source_transform")
        cfg = self.export_config
        with self._stage("quantize"):
            if quantizes_graph(cfg):
                return self
            importance = None
            if "q4_0" in (cfg.qlinear, cfg.head_scheme):  # its scales are searched against real inputs
                ids = calibration_ids(self.loaded.tokenizer, int(self.loaded.config.get_text_config().vocab_size),
                                      min(CALIBRATION_TOKENS, cfg.max_seq_len))
                if ids is None:
                    logger.info("q4_0: no usable tokenizer for the calibration text; input channels weigh alike")
                else:
                    importance = input_importance(module, ids)
            self.quantization_report = quantize_model(module, cfg, cfg.torch_dtype, importance)
            if importance is not None:
                self.quantization_report["q4_0_calibration_tokens"] = int(ids.shape[1])
        return self

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``(input_ids [1, 3], cache_position [3])`` used to trace ``forward`` (``[1, 1]``
        and ``[1]`` for a one-token program, see ``ExportConfig.tokens_per_call``)."""
        n = min(3, self.export_config.tokens_per_call)
        return torch.zeros(1, n, dtype=torch.long), torch.arange(n, dtype=torch.long)

    def dynamic_shapes(self):
        """``input_ids`` dim 1 and ``cache_position`` dim 0 share one length from 1 to ``max_seq_len``;
        ``None`` (static shapes) for a one-token program."""
        if self.export_config.tokens_per_call == 1:
            return None
        seq = torch.export.Dim("seq_len", min=1, max=self.export_config.max_seq_len)
        return ({1: seq}, {0: seq})

    def export(self) -> "Exporter":
        """``torch.export`` the module once, with a dynamic prompt length.

        RoPE runs as a matmul while tracing (see :mod:`.rope`) and the XNNPACK-friendly graph
        rewrites of :mod:`.passes` are applied. When the first backend has its own quantizer
        (:func:`.backends.graph_quantizer_for`), it compresses the traced module, which is traced again. The program is left unfunctionalized: lowering
        functionalizes it anyway, and doing it twice costs minutes on real models.
        """
        module = self._require("module", "source_transform")
        with self._stage("export"), torch.no_grad(), module.for_export():
            ep = torch.export.export(
                module, self.example_inputs(), dynamic_shapes=self.dynamic_shapes(), strict=False
            )
            compress = graph_quantizer_for(self.export_config)
            if compress is not None:  # the backend's own quantizer rewrites the graph: trace it again
                gm, self.quantization_report = compress(ep.module())
                ep = torch.export.export(gm, self.example_inputs(), dynamic_shapes=self.dynamic_shapes(), strict=False)
            self.exported_program = apply_xnnpack_friendly_rewrites(ep)
        return self

    def default_partitioners(self) -> list:
        """The partitioners of ``export_config.backends`` in order (:data:`.backends.BACKEND_TABLE`):
        XNNPACK's, OpenVINO's, none for ``portable``."""
        return partitioners_for(self.export_config)

    def metadata(self) -> dict[str, Any]:
        """The constant methods the program carries (read by ExecuTorch's runner and ours)."""
        loaded = self._require("loaded", "load")
        config, tokenizer, gen = loaded.config.get_text_config(), loaded.tokenizer, loaded.generation_config
        eos: list[int] = []
        tok_eos, tok_bos = (None, None) if tokenizer is None else (tokenizer.eos_token_id, tokenizer.bos_token_id)
        for value in (gen.eos_token_id, getattr(config, "eos_token_id", None), tok_eos):
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if token is not None and int(token) not in eos:
                    eos.append(int(token))
        bos = next((b for b in (gen.bos_token_id, getattr(config, "bos_token_id", None), tok_bos) if b is not None), -1)
        module = self._require("module", "source_transform")
        n_layers = getattr(config, "num_hidden_layers", None) or len(module.layer_ids)
        rebuild = cache_rebuild_length(loaded.architecture, config, self.export_config.max_seq_len)
        # Our own method (ExecuTorch's runner ignores it): see Architecture.rebuilds_cache_past_original_context.
        extra = {} if rebuild is None else {"get_cache_rebuild_len": rebuild}
        if (self.export_config.verify_tokens or 1) > 1:  # ours: how many trailing positions forward returns
            extra["get_verify_tokens"] = self.export_config.verify_tokens
        if self.export_config.uses_own_kernels:  # ours: the kernels' contract the program is built for
            from ..kernels import ABI

            extra["get_et_transformers_kernels_abi"] = ABI
        return {
            "get_max_seq_len": self.export_config.tokens_per_call,  # tokens per forward call
            "get_max_context_len": self.export_config.max_seq_len,
            "get_vocab_size": int(config.vocab_size),
            "get_bos_id": int(bos),
            "get_eos_ids": eos,
            "use_kv_cache": True,
            "enable_dynamic_shape": self.export_config.tokens_per_call > 1,
            "get_n_layers": int(n_layers),
            **extra,
        }

    def lower(self, partitioners: Iterable | None = None, *, generate_etrecord: bool = False) -> "Exporter":
        """Convert to the Edge dialect and delegate with ``partitioners`` (in order).

        Args:
            partitioners: ordered partitioners; ``None`` uses :meth:`default_partitioners`.
            generate_etrecord: record an ETRecord (graphs + debug handles that let the Inspector
                name the operators of an ETDump profile); :meth:`save` writes it.
        """
        ep = self._require("exported_program", "export")
        parts = self.default_partitioners() if partitioners is None else list(partitioners)
        with self._stage("lower"):
            keep = keep_ops_for(self.export_config) if parts else []
            self.edge_program = lower(ep, parts, self.metadata(), keep_ops=keep, generate_etrecord=generate_etrecord)
        self._etrecord_requested = generate_etrecord
        return self

    def delegation_summary(self):
        """ExecuTorch's ``DelegationBreakdown`` of the lowered program (counts and per-op table)."""
        edge = self._require("edge_program", "lower")
        from executorch.devtools.backend_debug import get_delegation_info

        return get_delegation_info(edge.exported_program(self.decoder_method).graph_module)

    def delegation_by_backend(self) -> dict[str, dict[str, int]]:
        """Which backend took which part of the lowered program: per delegate id (``XnnpackBackend``,
        ``OpenvinoBackend``), its subgraphs and the graph operators inside them."""
        gm = self._require("edge_program", "lower").exported_program(self.decoder_method).graph_module
        counts: dict[str, dict[str, int]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is executorch_call_delegate():
                lowered = getattr(gm, node.args[0].target)
                row = counts.setdefault(lowered.backend_id, {"subgraphs": 0, "nodes": 0})
                row["subgraphs"] += 1
                row["nodes"] += sum(n.op == "call_function" for n in lowered.original_module.graph.nodes)
        return dict(sorted(counts.items()))

    def delegation_table(self) -> dict[str, Any]:
        """:meth:`delegation_summary` and :meth:`delegation_by_backend` as plain data (kept in the
        manifest for ``inspect``)."""
        info = self.delegation_summary()
        return {
            "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes,
            "non_delegated_nodes": info.num_non_delegated_nodes,
            "by_backend": self.delegation_by_backend(),
            "by_operator": {
                op: [b.delegated, b.non_delegated] for op, b in sorted(info.delegation_by_operator.items())
            },
        }

    def to_executorch(self) -> "Exporter":
        """Plan memory and emit the ExecuTorch program."""
        edge = self._require("edge_program", "lower")
        import executorch.kernels.quantized  # noqa: F401  (out-variants of quantized embedding ops)
        from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
        from executorch.exir import ExecutorchBackendConfig
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

        with self._stage("to_executorch"):
            # Linears left outside a delegate run as one op_linear, not transpose + mm.
            edge = edge.transform([ConvertToLinearPass()])
            self.executorch_program = edge.to_executorch(
                ExecutorchBackendConfig(
                    extract_delegate_segments=True,
                    do_quant_fusion_and_const_prop=True,
                    memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                    sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                )
            )
            if self._etrecord_requested:
                self.etrecord = self.executorch_program.get_etrecord()
        return self

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write the model folder to ``output_dir`` atomically and return the ``.pte`` path.

        The folder holds ``model.pte``, ``manifest.json``, ``config.json``,
        ``generation_config.json`` and the tokenizer files (``tokenizer.json`` is what ExecuTorch's
        C++ runner loads; none when the checkpoint had none, as the manifest's ``program.tokenizer``
        records), plus ``etrecord.bin`` when an ETRecord was recorded. Files already in
        ``output_dir`` with other names are left alone.
        """
        program = self._require("executorch_program", "to_executorch")
        loaded = self._require("loaded", "load")
        output_dir = Path(output_dir)
        with self._stage("save"):
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
            try:
                pte = staging / PTE_NAME
                with open(pte, "wb") as f:
                    program.write_to_file(f)
                loaded.config.save_pretrained(staging)
                loaded.generation_config.save_pretrained(staging)
                if loaded.tokenizer is not None:  # a checkpoint saved without one: ids only
                    loaded.tokenizer.save_pretrained(staging)
                if self.etrecord is not None:
                    self.etrecord.save(str(staging / ETRECORD_NAME))
                self.write_extras(staging)
                self.build_manifest(pte).write(staging)
                _move_into_place(staging, output_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return output_dir / PTE_NAME

    def write_extras(self, folder: Path) -> None:
        """Write any further files the model folder needs (a processor); none for text models."""

    def build_manifest(self, pte_path: str | os.PathLike) -> Manifest:
        """The :class:`~et_transformers.manifest.Manifest` of the program written at ``pte_path``."""
        loaded = self._require("loaded", "load")
        program = self._require("executorch_program", "to_executorch")
        methods = sorted(program.methods) if hasattr(program, "methods") else ["forward"]
        return Manifest(
            export_config=self.export_config.to_dict(),
            source=self.source.describe(),
            pte_sha256=sha256_file(pte_path),
            pte_size=os.path.getsize(pte_path),
            model_type=loaded.config.model_type,
            weight_bytes_per_token=decode_weight_bytes(getattr(self.module, "model", self.module)),
            program={
                "methods": methods,
                "metadata": self.metadata(),
                "quantization": self.quantization_report,
                "delegation": self.delegation_table(),
                "export_seconds": {k: round(v, 2) for k, v in self.timings.items()},
                "tokenizer": loaded.tokenizer is not None,
            },
        )

    def run(self, output_dir: str | os.PathLike, *, etrecord: bool = False) -> Path:
        """Run every stage with the defaults and save to ``output_dir``; return the ``.pte`` path.

        Args:
            output_dir: the model folder to write.
            etrecord: also write ``etrecord.bin`` (for ``et-transformers profile``'s operator names).
        """
        from tqdm.auto import tqdm

        steps: list[tuple[str, Callable[[], Any]]] = [
            ("load", self.load),
            ("source_transform", self.source_transform),
            ("to_dtype", self.to_dtype),
            ("quantize", self.quantize),
            ("export", self.export),
            ("lower", lambda: self.lower(generate_etrecord=etrecord)),
            ("to_executorch", self.to_executorch),
            ("save", lambda: self.save(output_dir)),
        ]
        disable = None if self.progress is None else not self.progress
        result: Any = None
        with tqdm(steps, desc=f"Exporting {self.source.name}", unit="stage", disable=disable) as bar:
            for name, step in bar:
                bar.set_postfix_str(name)
                result = step()
        return result


def executorch_call_delegate():
    """ExecuTorch's ``executorch_call_delegate`` higher-order op (the target of a delegate call node)."""
    from executorch.exir.delegate import executorch_call_delegate as op

    return op


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Move the staged folder's files to ``output_dir``: one rename when it is new or empty."""
    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
        return
    if not output_dir.is_dir():
        raise ExportError(f"output_dir {output_dir} exists and is not a folder.")
    # Existing folder: each file moves atomically; the manifest, which vouches for the .pte, last.
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda n: n == "manifest.json")
    for name in names:
        os.replace(staging / name, output_dir / name)


def export_to_pte(
    model_id_or_path: str | os.PathLike,
    export_config: ExportConfig | None = None,
    output_dir: str | os.PathLike = "exported",
    **kwargs: Any,
) -> Path:
    """Export a Hugging Face causal LM to an ExecuTorch program.

    Args:
        model_id_or_path: Hub id (``"org/name"``), local model folder, or ``.gguf`` file.
        export_config: what to build; ``ExportConfig()`` by default.
        output_dir: folder to write ``model.pte``, ``manifest.json`` and tokenizer/config files to.
        kwargs: resolution options (``revision``, ``token``, ``gguf_file``, ``subfolder``,
            ``cache_dir``, ``local_files_only``, ``force_download``), ``trust_remote_code`` and
            ``progress``.

    Returns:
        Path of the written ``model.pte``.

    Raises:
        InvalidConfigError, UnsupportedModelError, ModelNotFoundError: before any heavy work.
        ExportError: a stage failed; ``output_dir`` is left as it was.
    """
    exporter = Exporter.from_pretrained(model_id_or_path, export_config, **kwargs)
    return exporter.run(output_dir)

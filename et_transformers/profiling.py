"""One generation with ExecuTorch's event tracer on, read back per operator and per phase.

:func:`profile_generation` loads the model's ``.pte`` a second time with ETDump recording on
(``_load_for_executorch(..., enable_etdump=True)``), runs one ``generate()`` through it with every
program call timed and labelled (warm-up, prefill, decode), writes the ETDump and reads it with
ExecuTorch's :class:`~executorch.devtools.Inspector`, linked to the ETRecord when ``export
--etrecord`` left one beside the ``.pte`` (it names the graph operators behind each event and
each delegate call). Runs are matched to phases by their start times, so the operator table splits
each operator's time between prefill and decode; XNNPACK reports the operators inside its
delegates as events of their own. The phase breakdown separates what the program costs from what
Python costs around it: tokenize, prefill, decode model time vs sampling/processors/streaming,
detokenize.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation import GenerationStats, Generator
from .manifest import ETRECORD_NAME
from .runtime import Program

logger = logging.getLogger(__name__)

#: Runtime events that frame others (a method run, one instruction, one delegate call).
_FRAME_EVENTS = ("Method::execute", "OPERATOR_CALL", "DELEGATE_CALL")
_BACKEND_NAMES = {"XnnpackBackend": "XNNPACK", "OpenvinoBackend": "OpenVINO"}


@dataclass
class OperatorProfile:
    """Time spent in one operator type over the profiled generation.

    Attributes:
        name: kernel name (``embedding.out``) or the delegate's operator (``Fully Connected (NC, F32) GEMM``).
        where: ``"kernel"`` (run by ExecuTorch itself) or the delegate backend (``"XNNPACK"``).
        calls: executions counted (all runs, warm-up excluded).
        ms: total milliseconds per phase (``"prefill"``, ``"decode"``).
        graph_ops: graph operators behind the events (from the ETRecord), when linked.
    """

    name: str
    where: str
    calls: int = 0
    ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    graph_ops: tuple[str, ...] = ()

    @property
    def total_ms(self) -> float:
        """Milliseconds over every phase."""
        return sum(self.ms.values())

    @property
    def delegated(self) -> bool:
        """True for operators inside a delegate."""
        return self.where != "kernel"


@dataclass
class ProfileReport:
    """What :func:`profile_generation` measured.

    Attributes:
        operators: per operator type, most expensive first.
        delegate_calls: per delegate call instruction (``DELEGATE_CALL`` events): name, ms per phase
            and, with an ETRecord, the graph operators it runs.
        phases: wall seconds per phase: ``tokenize``, ``prefill``, ``decode_model`` (program calls),
            ``decode_other`` (sampling, processors, stopping, streaming: Python), ``detokenize``.
        runtime_ms: the runtime's own ``Method::execute`` milliseconds per phase (ETDump).
        runs: program runs per phase (``warmup``, ``prefill``, ``decode``).
        stats: the generation's :class:`~et_transformers.generation.GenerationStats`.
        text: the generated text.
        etdump_path: where the raw ETDump was written.
        etrecord_path: the ETRecord the Inspector was linked to, if any.
    """

    operators: list[OperatorProfile]
    delegate_calls: list[dict[str, Any]]
    phases: dict[str, float]
    runtime_ms: dict[str, float]
    runs: dict[str, int]
    stats: GenerationStats
    text: str
    etdump_path: Path
    etrecord_path: Path | None = None

    @property
    def operator_ms(self) -> float:
        """Milliseconds over all operator rows."""
        return sum(op.total_ms for op in self.operators)


class _TimedProgram:
    """A :class:`Program` stand-in for the generator that times and labels every call."""

    def __init__(self, program: Program):
        self._program = program
        self.metadata = program.metadata
        self.lock = program.lock
        self.calls: list[tuple[str, float]] = []  # (phase, seconds), in order

    @property
    def executions(self) -> int:
        """The wrapped program's execution count (the generation loop checks it between steps)."""
        return self._program.executions

    def forward(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        t = time.perf_counter()
        out = self._program.forward(input_ids, start_pos)
        self.calls.append(("prefill", time.perf_counter() - t))
        return out

    def decode(self, token_id: int, pos: int, *, copy: bool = True) -> torch.Tensor:
        t = time.perf_counter()
        out = self._program.decode(token_id, pos, copy=copy)
        self.calls.append(("decode", time.perf_counter() - t))
        return out


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """``prompt`` as input ids ``[1, n]``; with ``chat``, as a user turn in the tokenizer's chat template."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def profile_generation(
    model,
    prompt: str,
    *,
    chat: bool = False,
    etdump_path: str | os.PathLike | None = None,
    etrecord_path: str | os.PathLike | None = None,
    **generation_kwargs: Any,
) -> ProfileReport:
    """Generate once from ``prompt`` with ETDump on and return the per-operator and per-phase profile.

    Args:
        model: an :class:`~et_transformers.ETModelForCausalLM` (its ``.pte`` is loaded again with
            the event tracer on; the model's own program is not touched).
        prompt: the prompt text.
        chat: apply the tokenizer's chat template to the prompt.
        etdump_path: where to keep the raw ETDump (default: a temporary file, deleted).
        etrecord_path: the ETRecord to link; default: ``etrecord.bin`` beside the ``.pte`` if any.
        **generation_kwargs: ``generate()`` options (``max_new_tokens``, ``do_sample``...).

    Returns:
        A :class:`ProfileReport`.

    Raises:
        ETTransformersError: the model has no tokenizer; ValueError: bad generation options.
    """
    from .errors import ETTransformersError

    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ETTransformersError(f"{model.pte_path.parent} has no tokenizer; cannot encode a text prompt.")
    if etrecord_path is None and (model.pte_path.parent / ETRECORD_NAME).is_file():
        etrecord_path = model.pte_path.parent / ETRECORD_NAME

    t = time.perf_counter()
    ids = encode_prompt(tokenizer, prompt, chat)
    tokenize_s = time.perf_counter() - t

    program = Program(model.pte_path, enable_etdump=True)
    program.forward(torch.zeros(1, 1, dtype=torch.long), 0)  # warm-up: XNNPACK packs weights
    timed = _TimedProgram(program)
    generator = Generator(timed, model._generator.max_position_embeddings, tokenizer,
                          model._generator.weight_bytes_per_token)
    out, stats = generator.generate(model.generation_config, ids, **generation_kwargs)

    t = time.perf_counter()
    text = tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)
    detokenize_s = time.perf_counter() - t

    model_s = {p: sum(s for q, s in timed.calls if q == p) for p in ("prefill", "decode")}
    phases = {
        "tokenize": tokenize_s,
        "prefill": stats.prefill_time,
        "decode_model": model_s["decode"],
        "decode_other": max(stats.decode_time - model_s["decode"], 0.0),
        "detokenize": detokenize_s,
    }
    keep = etdump_path is not None
    path = Path(etdump_path) if keep else Path(tempfile.mkstemp(prefix="et-profile-", suffix=".etdp")[1])
    program.write_etdump(path)
    try:
        labels = ["warmup"] + [phase for phase, _ in timed.calls]
        operators, delegate_calls, runtime_ms = _read_etdump(path, etrecord_path, labels)
    finally:
        if not keep:
            path.unlink(missing_ok=True)
    runs = {p: labels.count(p) for p in ("warmup", "prefill", "decode")}
    return ProfileReport(
        operators=operators, delegate_calls=delegate_calls, phases=phases, runtime_ms=runtime_ms, runs=runs,
        stats=stats, text=text, etdump_path=path,
        etrecord_path=Path(etrecord_path) if etrecord_path else None,
    )


def _operator_name(event) -> str:
    name = event.name
    if name.startswith("native_call_"):
        return name.removeprefix("native_call_")
    return re.sub(r" #\d+$", "", name)  # XNNPACK numbers each operator instance


def _read_etdump(path: Path, etrecord: str | os.PathLike | None, labels: list[str]):
    """Operator rows, delegate-call rows and Method::execute ms per phase from an ETDump.

    ``labels`` names each ``forward`` run in order (the runs of the constant methods at load time
    are not in it: their blocks hold no operator events).
    """
    import warnings

    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Output Buffer not found": we do not debug tensors
        inspector = Inspector(etdump_path=str(path), etrecord=str(etrecord) if etrecord else None)
    blocks = [
        b for b in inspector.event_blocks
        if b.name == "Execute" and any(e.name not in _FRAME_EVENTS for e in b.events)
    ]
    # Runs of the same shape share a block; order every run of every block by start time.
    starts = sorted(
        (start, bi, ri)
        for bi, b in enumerate(blocks)
        for ri, start in enumerate(b.events[0].start_time or [])
    )
    if len(starts) != len(labels):
        logger.warning("ETDump holds %d forward runs but %d were made; phases are approximate.",
                       len(starts), len(labels))
    phase = {(bi, ri): labels[k] if k < len(labels) else "decode" for k, (_, bi, ri) in enumerate(starts)}

    operators: dict[tuple[str, str], OperatorProfile] = {}
    delegate_calls: dict[int, dict[str, Any]] = {}
    runtime_ms: dict[str, float] = defaultdict(float)
    for bi, block in enumerate(blocks):
        delegate_ordinal = 0
        for event in block.events:
            if event.name == "DELEGATE_CALL":
                delegate_ordinal += 1  # the n-th delegate instruction of the method
            if event.perf_data is None:
                continue
            for ri, ms in enumerate(event.perf_data.raw):
                p = phase.get((bi, ri), "decode")
                if p == "warmup":
                    continue
                if event.name == "Method::execute":
                    runtime_ms[p] += ms
                elif event.name == "DELEGATE_CALL":
                    row = delegate_calls.setdefault(delegate_ordinal, {
                        "delegate": delegate_ordinal,
                        "backend": _BACKEND_NAMES.get(event.delegate_backend_name, event.delegate_backend_name),
                        "graph_ops": list(event.op_types or []),
                        "ms": defaultdict(float),
                    })
                    row["ms"][p] += ms
                elif event.name != "OPERATOR_CALL":
                    where = "kernel"
                    if event.is_delegated_op:  # the Inspector names the backend only with an ETRecord
                        backend = event.delegate_backend_name or "XnnpackBackend"
                        where = _BACKEND_NAMES.get(backend, backend)
                    op = operators.setdefault((_operator_name(event), where),
                                              OperatorProfile(_operator_name(event), where))
                    op.calls += 1
                    op.ms[p] += ms
                    if event.op_types and not op.graph_ops:
                        op.graph_ops = tuple(event.op_types)
    ordered = sorted(operators.values(), key=lambda o: o.total_ms, reverse=True)
    calls = sorted(delegate_calls.values(), key=lambda r: sum(r["ms"].values()), reverse=True)
    return ordered, calls, dict(runtime_ms)

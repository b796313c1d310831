"""What a ``.pte`` holds, read from the file itself: methods, metadata, size, and what got delegated.

:func:`inspect_program` reads the program's flatbuffer with the ``flatc`` that ships in the
executorch wheel (a few milliseconds; neither torch nor ``executorch.exir`` is imported): the
methods, the values of the constant methods (``get_max_seq_len``...), the instructions of each
method and its delegates. The operators left outside any delegate are the kernel calls of the
program's instructions, i.e. what the ExecuTorch runtime runs itself. Inside an XNNPACK delegate,
the operators are the nodes of its serialized XNNPACK graph (``flatc`` again, with XNNPACK's
schema). When the folder's ``manifest.json`` carries the delegation table ExecuTorch's
``get_delegation_info`` computed at export (every export of this version records it), that table
is the one shown, in the graph's operator names; otherwise the table is built from the program.
"""

from __future__ import annotations

import importlib.util
import json
import re
import logging
import os
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ProgramError
from .manifest import ETRECORD_NAME, MANIFEST_NAME, PTE_NAME

logger = logging.getLogger(__name__)

_XNNPACK_BACKEND = "XnnpackBackend"
_XNNPACK_MAGIC = b"XH00"


@dataclass
class OperatorCount:
    """One row of a delegation table.

    Attributes:
        op_type: operator name (the graph's, or the runtime kernel's / XNNPACK node's).
        delegated: occurrences inside delegated subgraphs.
        non_delegated: occurrences run by the ExecuTorch runtime itself.
    """

    op_type: str
    delegated: int = 0
    non_delegated: int = 0


@dataclass
class MethodInfo:
    """A method of the program.

    Attributes:
        name: method name.
        inputs: number of inputs.
        outputs: number of outputs.
        instructions: instructions of its (first) chain.
        delegate_calls: how many of them call a delegate.
        value: the constant a method without instructions returns (``get_max_seq_len``...).
    """

    name: str
    inputs: int
    outputs: int
    instructions: int
    delegate_calls: int
    value: Any = None


@dataclass
class ProgramReport:
    """Everything :func:`inspect_program` learned about a ``.pte``.

    Attributes:
        path: the ``.pte``.
        size_bytes: its size.
        methods: every method, ``forward`` first.
        delegates: number of delegate blobs per backend id.
        delegate_bytes: bytes of delegate blobs per backend id.
        operators: the delegation table (see ``operators_source``), by operator type.
        operators_source: ``"export graph"`` (ExecuTorch's ``get_delegation_info`` recorded in the
            manifest) or ``"program"`` (runtime kernels + XNNPACK graph nodes read from the .pte).
        outside_delegates: runtime kernel -> number of calls, over every method's instructions:
            the operators left outside any delegate.
        export_config: the manifest's export config, when there is a manifest.
        etrecord: the ETRecord beside the ``.pte``, if any.
        totals: delegated subgraphs, delegated and non-delegated graph nodes.
        nodes_by_backend: graph nodes inside each backend's delegates, per delegate id: which
            backend took which part of the program (from the manifest, recorded at export; for
            XNNPACK delegates of a program without one, its serialized graph nodes).
    """

    path: Path
    size_bytes: int
    methods: list[MethodInfo]
    delegates: dict[str, int]
    delegate_bytes: dict[str, int]
    operators: list[OperatorCount]
    operators_source: str
    outside_delegates: dict[str, int]
    export_config: dict[str, Any] | None = None
    etrecord: Path | None = None
    totals: dict[str, int] = field(default_factory=dict)
    nodes_by_backend: dict[str, int] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """The constant methods' values (``{"get_max_seq_len": 128, ...}``)."""
        return {m.name: m.value for m in self.methods if m.instructions == 0 and m.value is not None}

    def summary(self) -> str:
        """One line: delegates, share of graph nodes delegated (per backend when several took some),
        kernel calls left outside."""
        n = sum(self.delegates.values())
        backends = ", ".join(f"{c} {b}" for b, c in sorted(self.delegates.items())) or "no delegates"
        delegated = sum(r.delegated for r in self.operators)
        total = delegated + sum(r.non_delegated for r in self.operators)
        parts = [f"delegation: {backends} ({n} subgraphs)"]
        if total:
            # which backend took which share, when several did
            took = "".join(f", {b} {n}" for b, n in sorted(self.nodes_by_backend.items())) if len(self.nodes_by_backend) > 1 else ""
            parts.append(f"{delegated} of {total} graph nodes delegated ({100 * delegated / total:.0f}%{took})")
        parts.append(f"{sum(self.outside_delegates.values())} kernel calls outside delegates")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["etrecord"] = str(self.etrecord) if self.etrecord else None
        data["metadata"] = self.metadata
        return data


# -- flatbuffer access --------------------------------------------------------------------


def _executorch_file(*parts: str) -> Path:
    """A file inside the installed executorch package (found without importing it)."""
    spec = importlib.util.find_spec("executorch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder, *parts)
        if path.exists():
            return path
    raise ProgramError(f"executorch/{'/'.join(parts)} not found; reinstall executorch.")


def _flatbuffers_to_json(schema: Path, blobs: list[bytes]) -> list[dict]:
    """Decode flatbuffer ``blobs`` with ``schema`` using the ``flatc`` bundled with executorch."""
    flatc = _executorch_file("data", "bin", "flatc")
    with tempfile.TemporaryDirectory(prefix="et-inspect-") as tmp:
        names = []
        for i, blob in enumerate(blobs):
            names.append(Path(tmp, f"b{i}.bin"))
            names[-1].write_bytes(blob)
        cmd = [str(flatc), "--json", "--strict-json", "--raw-binary", "--defaults-json",
               "-I", str(schema.parent), "-o", tmp, str(schema), "--", *map(str, names)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProgramError(f"flatc could not decode the program ({proc.stderr.strip()[:300]}).")
        # flatc spells non-finite doubles (a -inf mask fill in a vision encoder) as bare inf / nan
        return [json.loads(_FLATC_NON_FINITE.sub(_json_non_finite, n.with_suffix(".json").read_text())) for n in names]


_FLATC_NON_FINITE = re.compile(r'(?<=: )(-?)(inf|nan)\b')


def _json_non_finite(match: re.Match) -> str:
    """flatc's ``inf`` / ``-inf`` / ``nan`` as the ``Infinity`` / ``-Infinity`` / ``NaN`` Python's json reads."""
    return match.group(1) + ("Infinity" if match.group(2) == "inf" else "NaN")


def _read_program(path: Path) -> tuple[dict, bytes, int]:
    """The program flatbuffer as JSON, the file's bytes, and where its segments start."""
    data = path.read_bytes()
    if len(data) < 8 or data[4:6] != b"ET":
        raise ProgramError(f"{path} is not an ExecuTorch program (.pte): no 'ET' file identifier.")
    program_size, segment_base = len(data), 0
    if data[8:12] == b"eh00":  # extended header: the flatbuffer is followed by segments
        program_size = int.from_bytes(data[16:24], "little")
        segment_base = int.from_bytes(data[24:32], "little")
    schema = _executorch_file("exir", "_serialize", "program.fbs")
    (program,) = _flatbuffers_to_json(schema, [data[:program_size]])
    return program, data, segment_base


def _delegate_blob(program: dict, data: bytes, segment_base: int, delegate: dict) -> bytes | None:
    processed = delegate.get("processed", {})
    index = processed.get("index", 0)
    if processed.get("location") == "SEGMENT":
        seg = program["segments"][index]
        start = segment_base + seg["offset"]
        return data[start : start + seg["size"]]
    inline = program.get("backend_delegate_data") or []
    return bytes(inline[index].get("data", [])) if index < len(inline) else None


def _xnnpack_node_types(blobs: list[bytes]) -> Counter:
    """XNNPACK graph node types (``FullyConnected``...) across delegate blobs."""
    graphs = []
    for blob in blobs:
        if blob[4:8] == _XNNPACK_MAGIC:  # header: magic, size, flatbuffer offset + size
            offset = int.from_bytes(blob[10:14], "little")
            size = int.from_bytes(blob[14:18], "little")
            graphs.append(blob[offset : offset + size])
        else:
            graphs.append(blob)
    if not graphs:
        return Counter()
    schema = _executorch_file("backends", "xnnpack", "serialization", "schema.fbs")
    counts: Counter = Counter()
    for graph in _flatbuffers_to_json(schema, graphs):
        for node in graph.get("xnodes", []):
            counts[node.get("xnode_union_type", "?").removeprefix("XNN")] += 1
    return counts


# -- the report ---------------------------------------------------------------------------


def _constant(plan: dict) -> Any:
    values = [plan["values"][i].get("val", {}) for i in plan.get("outputs", [])]
    scalars = [next(iter(v.values()), None) if isinstance(v, dict) and len(v) == 1 else None for v in values]
    if not scalars or any(s is None for s in scalars):
        return None
    return scalars[0] if len(scalars) == 1 else scalars


def resolve_pte(path: str | os.PathLike) -> Path:
    """The ``.pte`` a path names: the file itself, or ``model.pte`` in a folder.

    Raises:
        ModelNotFoundError: nothing exists at ``path``.
        ProgramError: the file is not an ExecuTorch program, or the folder holds none.
    """
    from .errors import ModelNotFoundError

    path = Path(path)
    if path.is_dir():
        if not (path / PTE_NAME).is_file():
            raise ProgramError(f"{path} is a folder without {PTE_NAME}.")
        return path / PTE_NAME
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:6] != b"ET":
        raise ProgramError(f"{path} is not an ExecuTorch program (.pte): no 'ET' file identifier.")
    return path


def inspect_program(path: str | os.PathLike) -> ProgramReport:
    """Read a ``.pte`` (or a model folder holding ``model.pte``) and report what it holds.

    Args:
        path: a ``.pte`` file or a folder with ``model.pte`` (and optionally ``manifest.json``).

    Returns:
        A :class:`ProgramReport`.

    Raises:
        ModelNotFoundError: nothing exists at ``path``.
        ProgramError: not an ExecuTorch program, or its flatbuffer cannot be decoded.
    """
    pte = resolve_pte(path)
    program, data, segment_base = _read_program(pte)
    methods, outside = [], Counter()
    delegates, delegate_bytes = Counter(), Counter()
    xnnpack_blobs = []
    for plan in program["execution_plan"]:
        instructions = [i for chain in plan.get("chains", []) for i in chain.get("instructions", [])]
        calls = 0
        for instruction in instructions:
            kind, args = instruction.get("instr_args_type"), instruction.get("instr_args", {})
            if kind == "KernelCall":
                op = plan["operators"][args["op_index"]]
                outside[op["name"] + (f".{op['overload']}" if op.get("overload") else "")] += 1
            elif kind == "DelegateCall":
                calls += 1
        for delegate in plan.get("delegates", []):
            blob = _delegate_blob(program, data, segment_base, delegate)
            delegates[delegate["id"]] += 1
            delegate_bytes[delegate["id"]] += len(blob or b"")
            if delegate["id"] == _XNNPACK_BACKEND and blob:
                xnnpack_blobs.append(blob)
        methods.append(MethodInfo(
            name=plan["name"], inputs=len(plan.get("inputs", [])), outputs=len(plan.get("outputs", [])),
            instructions=len(instructions), delegate_calls=calls,
            value=_constant(plan) if not instructions else None,
        ))
    methods.sort(key=lambda m: (m.name != "forward", m.instructions == 0, m.name))

    manifest = _read_manifest(pte)
    recorded = (manifest or {}).get("program", {}).get("delegation")
    if recorded:
        operators = [OperatorCount(op, d, n) for op, (d, n) in recorded["by_operator"].items()]
        source = "export graph"
        totals = {k: recorded[k] for k in ("delegated_subgraphs", "delegated_nodes", "non_delegated_nodes")}
        by_backend = {b: row["nodes"] for b, row in recorded.get("by_backend", {}).items()}
    else:
        inside = _xnnpack_node_types(xnnpack_blobs)
        operators = [OperatorCount(f"xnnpack::{op}", delegated=c) for op, c in sorted(inside.items())]
        operators += [OperatorCount(op, non_delegated=c) for op, c in sorted(outside.items())]
        source = "program"
        totals = {"delegated_subgraphs": sum(delegates.values()), "delegated_nodes": sum(inside.values()),
                  "non_delegated_nodes": sum(outside.values())}
        by_backend = {_XNNPACK_BACKEND: sum(inside.values())} if inside else {}
    etrecord = pte.parent / ETRECORD_NAME
    return ProgramReport(
        path=pte,
        size_bytes=len(data),
        methods=methods,
        delegates=dict(delegates),
        delegate_bytes=dict(delegate_bytes),
        operators=operators,
        operators_source=source,
        outside_delegates=dict(outside.most_common()),
        export_config=(manifest or {}).get("export_config"),
        etrecord=etrecord if etrecord.is_file() else None,
        totals=totals,
        nodes_by_backend=by_backend,
    )


def _read_manifest(pte: Path) -> dict | None:
    """The manifest beside ``pte`` when it describes that file (same size), else ``None``."""
    try:
        manifest = json.loads((pte.parent / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("pte_size") == pte.stat().st_size else None

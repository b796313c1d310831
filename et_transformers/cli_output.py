"""Text the ``et-transformers`` command prints: tables and one-line summaries of library results.

The library returns data (:class:`~et_transformers.inspection.ProgramReport`,
:class:`~et_transformers.profiling.ProfileReport`, :class:`~et_transformers.bench.BenchResult`,
cache entries); this module turns it into aligned plain-text tables for a terminal. It does no
work of its own and imports nothing heavy, so formatting never decides what gets loaded.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .config import ExportConfig, recipe_name


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """An aligned plain-text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def mib(n_bytes: float) -> str:
    """Bytes as ``"12.3 MiB"`` (or KiB below one MiB)."""
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


def number(value: float | None, digits: int = 1) -> str:
    """A float with ``digits`` decimals, or ``-`` for ``None``."""
    return "-" if value is None else f"{value:,.{digits}f}"


def ago(timestamp: float) -> str:
    """``"5 min ago"``-style age of a Unix time."""
    seconds = max(time.time() - timestamp, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def describe_export_config(data: dict[str, Any] | None) -> str:
    """A short description: the recipe it matches (plus context length), else its non-default fields."""
    if not data:
        return "?"
    try:
        cfg = ExportConfig.from_dict(data)
    except ValueError:
        return "?"
    name = recipe_name(cfg)
    if name:
        return f"{name}, ctx {cfg.max_seq_len}"
    default = ExportConfig().to_dict()
    changed = [f"{k}={','.join(v) if k == 'backend' and isinstance(v, list) else v}"  # as --backend takes it
               for k, v in cfg.to_dict().items() if v != default[k] and k != "max_seq_len"]
    return ", ".join(changed + [f"ctx {cfg.max_seq_len}"])


def describe_source(source: dict[str, Any]) -> str:
    """The model an entry was built from: repo id, or GGUF / folder name."""
    if source.get("repo_id"):
        return source["repo_id"] + (f"@{source['revision'][:8]}" if source.get("revision") else "")
    path = source.get("path", "?")
    return f"{path}/{source['gguf_file']}" if source.get("gguf_file") else path


# -- inspect -----------------------------------------------------------------------------------


def program_report(report) -> str:
    """The ``inspect`` output for a :class:`~et_transformers.inspection.ProgramReport`."""
    lines = [f"{report.path}  {mib(report.size_bytes)}"]
    if report.export_config:
        lines.append(f"export config: {describe_export_config(report.export_config)}")
    if report.etrecord:
        lines.append(f"etrecord: {report.etrecord}")
    lines += ["", "methods:"]
    rows = []
    for m in report.methods:
        what = f"{m.instructions} instructions, {m.delegate_calls} delegate calls"
        if m.instructions == 0:
            what = f"= {m.value}"
        rows.append((m.name, m.inputs, m.outputs, what))
    lines += ["  " + r for r in table(("method", "inputs", "outputs", ""), rows, right=(1, 2)).splitlines()]
    lines += ["", "delegates:"]
    if report.delegates:
        rows = [(b, n, report.nodes_by_backend.get(b, "?"), mib(report.delegate_bytes.get(b, 0)))
                for b, n in sorted(report.delegates.items())]
        lines += ["  " + r for r in table(("backend", "subgraphs", "graph nodes", "size"), rows,
                                          right=(1, 2, 3)).splitlines()]
    else:
        lines.append("  none: every operator runs on ExecuTorch's own kernels")
    source = {
        "export graph": "ExecuTorch get_delegation_info on the lowered graph, recorded at export",
        "program": "read from the .pte: runtime kernel calls, and XNNPACK graph nodes inside delegates",
    }[report.operators_source]
    lines += ["", f"delegation table ({source}):"]
    rows = [(o.op_type, o.delegated, o.non_delegated) for o in report.operators]
    t = report.totals
    rows.append(("Total", t.get("delegated_nodes", ""), t.get("non_delegated_nodes", "")))
    lines += ["  " + r for r in table(("operator", "delegated", "non-delegated"), rows, right=(1, 2)).splitlines()]
    lines += ["", "operators left outside any delegate (kernel calls in the program):"]
    if report.outside_delegates:
        rows = list(report.outside_delegates.items())
        lines += ["  " + r for r in table(("kernel", "calls"), rows, right=(1,)).splitlines()]
    else:
        lines.append("  none")
    lines += ["", report.summary()]
    return "\n".join(lines)


# -- profile ----------------------------------------------------------------------------------


def _op_summary(ops: Sequence[str], limit: int = 4) -> str:
    counts = Counter(op.removeprefix("aten.").split(".")[0] for op in ops)
    parts = [f"{name} x{n}" if n > 1 else name for name, n in counts.most_common(limit)]
    return ", ".join(parts) + (", ..." if len(counts) > limit else "")


def profile_report(report, top: int = 25) -> str:
    """The ``profile`` output for a :class:`~et_transformers.profiling.ProfileReport`."""
    stats, runs = report.stats, report.runs
    total = report.operator_ms or 1.0
    link = f", linked to {report.etrecord_path}" if report.etrecord_path else (
        " (no ETRecord: export --etrecord to name graph operators)")
    lines = [
        f"profiled one generation: {stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated "
        f"({runs['prefill']} prefill + {runs['decode']} decode program runs, warm-up excluded)",
        f"ETDump events read with ExecuTorch's Inspector{link}",
        "",
        f"operators (top {min(top, len(report.operators))} of {len(report.operators)} by time):",
    ]
    rows = []
    for op in report.operators[:top]:
        rows.append((
            op.name, op.where, op.calls, number(op.total_ms, 3), number(op.ms.get("prefill", 0.0), 3),
            number(op.ms.get("decode", 0.0), 3), number(1000 * op.total_ms / op.calls if op.calls else None, 1),
            f"{100 * op.total_ms / total:.1f}%",
        ))
    headers = ("operator", "runs on", "calls", "total ms", "prefill ms", "decode ms", "avg us", "share")
    lines += ["  " + r for r in table(headers, rows, right=(2, 3, 4, 5, 6, 7)).splitlines()]
    delegated = sum(op.total_ms for op in report.operators if op.delegated)
    lines.append(f"  delegated operators: {100 * delegated / total:.0f}% of operator time")
    if report.delegate_calls:
        lines += ["", "delegate calls:"]
        rows = [
            (f"#{d['delegate']}", d["backend"] or "?", number(d["ms"].get("prefill", 0.0), 3),
             number(d["ms"].get("decode", 0.0), 3), _op_summary(d["graph_ops"]) if d["graph_ops"] else "")
            for d in report.delegate_calls[:top]
        ]
        headers = ("delegate", "backend", "prefill ms", "decode ms", "graph operators (ETRecord)")
        lines += ["  " + r for r in table(headers, rows, right=(2, 3)).splitlines()]
    p, rt = report.phases, report.runtime_ms
    rows = [
        ("tokenize", number(1000 * p["tokenize"], 2), ""),
        ("prefill", number(1000 * p["prefill"], 2), number(rt.get("prefill"), 2)),
        ("decode: model", number(1000 * p["decode_model"], 2), number(rt.get("decode"), 2)),
        ("decode: sampling, stopping, streaming (Python)", number(1000 * p["decode_other"], 2), ""),
        ("detokenize", number(1000 * p["detokenize"], 2), ""),
    ]
    lines += ["", "phases:"]
    lines += ["  " + r for r in table(("phase", "wall ms", "runtime ms (ETDump)"), rows, right=(1, 2)).splitlines()]
    lines += ["", stats.summary()]
    return "\n".join(lines)


# -- bench ------------------------------------------------------------------------------------


def bench_table(results) -> str:
    """The ``bench`` table for a list of :class:`~et_transformers.bench.BenchResult`."""
    rows = []
    for r in results:
        rows.append((
            r.name, number(r.prefill_tok_s), number(r.decode_tok_s), number(r.ttft_ms), r.generated,
            number(r.weight_bytes_per_token / 1e6 if r.weight_bytes_per_token else None),
            number(r.decode_gb_s, 2), number(r.peak_rss_mib, 0), number(r.load_s, 1), r.note,
        ))
    headers = ("", "prefill tok/s", "decode tok/s", "TTFT ms", "generated", "weights MB/tok", "decode GB/s",
               "peak RSS MiB", "load s", "note")
    return table(headers, rows, right=(1, 2, 3, 4, 5, 6, 7, 8))


# -- cache ------------------------------------------------------------------------------------


def cache_table(entries) -> str:
    """The ``cache ls`` table for a list of :class:`~et_transformers.cache.Entry`."""
    rows = [
        (e.key[:12], describe_source(e.manifest.source), describe_export_config(e.manifest.export_config),
         mib(e.size), ago(e.last_used))
        for e in entries
    ]
    return table(("key", "model", "config", "size", "last used"), rows, right=(3,))

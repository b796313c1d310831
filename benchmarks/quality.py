"""Quality, size and speed of every export recipe on the real SmolLM2-135M-Instruct, in one table.

For each recipe (``et_transformers.config.RECIPES``, or ``--recipes``) the script exports the demo
model (cached after the first run) and measures, on the same machine in one run:

* the ``.pte`` size;
* teacher-forced next-token top-1 agreement with eager fp32 transformers and perplexity, on the
  project's own English text (``benchmarks/data/eval_text.txt``, ~2,350 tokens) cut into windows of
  ``--window`` tokens. The recipe's own generation program is driven one token per call, exactly as
  ``generate()`` decodes, so the figures are those of the shipped file;
* warm prefill and decode tok/s of ``generate()`` (prompt 128 tokens, 128 new, greedy, median of
  ``--runs`` after a warm-up).

``--llamacpp`` adds llama.cpp rows: speed from ``../shared/tools/llamacpp-bench.sh`` (llama-bench,
2 threads) and quality of its Q4_0/Q8_0 files measured the same way as ours, on their weights
dequantized into eager transformers (activations stay float, so this is the weights' share of the
loss). ``--write`` puts the table into README.md and model_cards/ between their table markers.

The reference weights are the demo GGUF's (Q4_1, dequantized to float32): "fp32" means those.
Run:  python benchmarks/quality.py [--recipes a,b] [--runs 3] [--llamacpp] [--write]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from et_transformers.threads import prefer_single_threaded_blas  # noqa: E402

prefer_single_threaded_blas()  # before torch loads (see et_transformers/threads.py)
import torch  # noqa: E402

TEXT = ROOT / "benchmarks" / "data" / "eval_text.txt"
LLAMACPP_TOOL = ROOT.parent / "shared" / "tools" / "llamacpp-bench.sh"
from et_transformers.model_card import QUALITY_MARKERS as MARKERS  # noqa: E402  (the cards' markers)


def eval_tokens(tokenizer) -> torch.Tensor:
    """The evaluation text as one row of token ids ``[1, N]``."""
    return tokenizer(TEXT.read_text(), return_tensors="pt").input_ids


def speed(model, prompt: torch.Tensor, new_tokens: int, runs: int) -> tuple[float, float]:
    """Median warm prefill and decode tok/s of ``generate()`` (one warm-up run first)."""
    results = []
    for i in range(runs + 1):
        model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        if i:
            results.append((model.stats.prefill_tokens_per_s, model.stats.decode_tokens_per_s))
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def llamacpp_rows(hf_folder: Path, ids: torch.Tensor, window: int, reference) -> list[dict]:
    """llama.cpp's Q4_0 / Q8_0: llama-bench speed and the dequantized weights' quality."""
    from transformers import AutoModelForCausalLM

    from et_transformers.evaluation import evaluate_eager

    out = subprocess.run(
        ["bash", str(LLAMACPP_TOOL), str(hf_folder), "none", sys.executable],
        capture_output=True, text=True, check=True,
    ).stdout
    speeds: dict[tuple[str, str], float] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 7 or not cells[-2].startswith(("pp", "tg")):
            continue
        quant = re.search(r"(Q4_0|Q8_0|F16|Q4_1)", cells[0], re.I)
        if quant:
            speeds[(quant.group(1).upper(), cells[-2][:2])] = float(cells[-1].split("±")[0])
    home = Path.home() / ".cache" / "llamacpp-bench"
    rows = []
    for quant in ("Q4_0", "Q8_0"):
        files = sorted(home.glob(f"model-*-{quant}.gguf"), key=lambda p: p.stat().st_mtime)
        if not files:
            continue
        model = AutoModelForCausalLM.from_pretrained(files[-1].parent, gguf_file=files[-1].name, dtype=torch.float32)
        run = evaluate_eager(model, ids, window)
        agreement, ppl = run.agreement(reference), run.perplexity
        rows.append({
            "recipe": f"llama.cpp {quant} (llama-bench; quality of its weights in eager)",
            "size_mb": files[-1].stat().st_size / 1e6,
            "agreement": agreement,
            "ppl": ppl,
            "prefill": speeds.get((quant, "pp")),
            "decode": speeds.get((quant, "tg")),
        })
    return rows


def render(rows: list[dict], base_ppl: float, meta: str) -> str:
    """The markdown table."""
    lines = [
        meta,
        "",
        "| recipe | .pte MB | top-1 agreement vs fp32 | perplexity | vs fp32 | prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| eager fp32 (transformers) | | 100% | {base_ppl:.2f} | | | |",
    ]

    def num(v, fmt):
        return format(v, fmt) if v is not None else "n/a"

    for r in rows:
        rise = f"{(r['ppl'] / base_ppl - 1) * 100:+.1f}%"
        lines.append(
            f"| {r['recipe']} | {num(r['size_mb'], '.1f')} | {r['agreement'] * 100:.1f}% | {r['ppl']:.2f} | {rise} "
            f"| {num(r['prefill'], '.0f')} | {num(r['decode'], '.0f')} |"
        )
    return "\n".join(lines)


def write_table(path: Path, table: str) -> None:
    """Replace the text between the table markers of ``path`` (appending them if absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{MARKERS[0]}\n{table}\n{MARKERS[1]}"
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + block + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def merge_table(old: str, new: str, note: str) -> str:
    """``old`` (a table :func:`render` wrote) with the recipe rows of ``new`` replacing or joining
    its own (new recipes go before the llama.cpp rows); ``note`` is appended to the caption."""
    def rows(table: str) -> list[str]:
        return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| recipe |")]

    def name(line: str) -> str:
        return line.split("|")[1].strip()

    fresh = {name(line): line for line in rows(new) if not name(line).startswith("eager")}
    lines = old.splitlines()
    out = []
    for line in lines:
        if line.startswith("| ") and name(line) in fresh:
            out.append(fresh.pop(name(line)))
        elif line.startswith("| llama.cpp") and fresh:
            out.extend(fresh.values())
            fresh.clear()
            out.append(line)
        else:
            out.append(line)
    out.extend(fresh.values())
    if note:
        out[0] = f"{out[0]} {note}"
    return "\n".join(out)


def read_table(path: Path) -> str | None:
    """The table between ``path``'s markers, or ``None``."""
    text = path.read_text() if path.exists() else ""
    if MARKERS[0] not in text or MARKERS[1] not in text:
        return None
    return text.split(MARKERS[0], 1)[1].split(MARKERS[1], 1)[0].strip("\n")


def main() -> None:
    from et_transformers import ETModelForCausalLM
    from et_transformers.config import RECIPES
    from et_transformers.evaluation import evaluate_eager, evaluate_program
    from fetch_demo_model import fetch, hf_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every xnnpack recipe)")
    parser.add_argument("--window", type=int, default=1024, help="evaluation window (tokens)")
    parser.add_argument("--runs", type=int, default=3, help="timed generate() runs per recipe")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".demo" / "et-cache")
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp rows (builds it once, ~12 min)")
    parser.add_argument("--write", action="store_true", help="write the table into README.md and model_cards/")
    parser.add_argument("--update", action="store_true",
                        help="with --write: replace (or add) only the measured recipes' rows of the written table")
    parser.add_argument("--note", default="", help="a sentence appended to the table's caption")
    parser.add_argument("--json", type=Path, help="also save the rows as JSON here")
    args = parser.parse_args()
    if args.update and not args.write:
        parser.error("--update replaces rows of the written table: pass it with --write")

    names = args.recipes.split(",") if args.recipes else [n for n in RECIPES if n.startswith("xnnpack")]
    folder = hf_folder(fetch(ROOT / ".demo"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = eval_tokens(tokenizer)
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = evaluate_eager(eager, ids, args.window)
    base_ppl = reference.perplexity
    del eager
    prompt = ids[:, :128]
    print(f"eval text: {ids.shape[1]} tokens, window {args.window}; eager fp32 ppl {base_ppl:.3f}", flush=True)

    rows = []
    for name in names:
        t0 = time.perf_counter()
        model = ETModelForCausalLM.from_pretrained(folder, recipe=name, max_seq_len=args.window, cache_dir=args.cache_dir)
        run = evaluate_program(model.program, ids, args.window)
        agreement, ppl = run.agreement(reference), run.perplexity
        prefill, decode = speed(model, prompt, 128, args.runs)
        row = {"recipe": name, "size_mb": model.pte_path.stat().st_size / 1e6, "agreement": agreement,
               "ppl": ppl, "prefill": prefill, "decode": decode}
        rows.append(row)
        print(json.dumps({**row, "seconds": round(time.perf_counter() - t0)}), flush=True)
        del model
    if args.llamacpp:
        rows += llamacpp_rows(folder, ids, args.window, reference)

    meta = (
        f"SmolLM2-135M-Instruct (weights of the Q4_1 GGUF, dequantized), {ids.shape[1]}-token English "
        f"text in {args.window}-token windows, teacher-forced; speed: prompt 128 + 128 new tokens, greedy, "
        f"median of {args.runs} warm runs, 2 threads, `OMP_NUM_THREADS=1`. Produced by `benchmarks/quality.py`. {args.note}"
    ).strip()
    table = render(rows, base_ppl, meta)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"base_ppl": base_ppl, "rows": rows}, indent=1))
    if args.write:
        for path in (ROOT / "README.md", ROOT / "model_cards" / "SmolLM2-135M-Instruct.md"):
            old = read_table(path) if args.update else None
            write_table(path, merge_table(old, table, args.note) if old else table)


if __name__ == "__main__":
    main()

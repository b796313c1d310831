"""Write the demo model's card by running it: measure, ``save_pretrained``, time the reload, keep the card.

Loads SmolLM2-135M-Instruct exported with the default recipe (``--model``: an exported folder, or
the demo GGUF, which is exported once and cached), measures on this machine in one run:

* warm prefill and decode tok/s of ``generate()`` (prompt 128 tokens of the evaluation text,
  128 new, greedy, median of ``--runs`` after a warm-up), and peak RSS;
* with ``--gguf``: teacher-forced perplexity and next-token top-1 agreement against eager float32
  transformers on that GGUF's dequantized weights, on ``benchmarks/data/eval_text.txt`` in
  ``--window``-token windows (as ``benchmarks/quality.py`` does for every recipe);
* the load time of ``from_pretrained(<saved folder>)`` in a fresh process (no export);

then ``save_pretrained``s the folder with those figures and copies its ``README.md`` to
``--card`` (default ``model_cards/SmolLM2-135M-Instruct.md``), keeping the recipe table that
``benchmarks/quality.py --write`` maintains between the card's quality-table markers.

Run:  python benchmarks/model_card.py --model <exported folder or .gguf> [--gguf <.gguf>] [--runs 3]
      [--out <folder>] [--push org/name]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import eval_tokens, speed  # noqa: E402  (sets OMP_NUM_THREADS=1 before torch loads)

import torch  # noqa: E402

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE = "apache-2.0"
DEMO_GGUF = ROOT / ".demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"

LOAD = """
import json, time
import torch
t0 = time.perf_counter()
from et_transformers import ETModelForCausalLM
t1 = time.perf_counter()
model = ETModelForCausalLM.from_pretrained({folder!r})
t2 = time.perf_counter()
print(json.dumps({{"from_pretrained": t2 - t1, "ready": t2 - t0, "exported": model.stats.export_time is not None}}))
"""


def fresh_process_load(folder: Path) -> dict:
    """Seconds of ``from_pretrained(folder)`` in a new interpreter (and from after ``import torch``)."""
    proc = subprocess.run([sys.executable, "-c", LOAD.format(folder=str(folder))], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["exported"]:
        raise RuntimeError(f"loading {folder} exported the model: it is not a saved program folder")
    return result


def quality(model, gguf: Path, ids: torch.Tensor, window: int) -> dict:
    """Perplexity and top-1 agreement of the program vs eager float32 on the GGUF's weights."""
    from transformers import AutoModelForCausalLM

    from et_transformers.evaluation import evaluate_eager, evaluate_program

    eager = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    reference = evaluate_eager(eager, ids, window)
    del eager
    run = evaluate_program(model.program, ids, window)
    return {"perplexity": round(run.perplexity, 2), "perplexity_fp32": round(reference.perplexity, 2),
            "top1_agreement": round(run.agreement(reference), 4)}


def main() -> None:
    from et_transformers import ETModelForCausalLM
    from et_transformers.model_card import quality_block

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_GGUF, help="exported folder, or the demo .gguf")
    parser.add_argument("--gguf", type=Path, help="the GGUF the program came from: adds quality figures")
    parser.add_argument("--window", type=int, default=1024, help="evaluation window (tokens)")
    parser.add_argument("--runs", type=int, default=3, help="timed generate() runs")
    parser.add_argument("--out", type=Path, default=ROOT / ".demo" / "SmolLM2-135M-Instruct-xnnpack-8da4w",
                        help="folder save_pretrained writes")
    parser.add_argument("--card", type=Path, default=ROOT / "model_cards" / "SmolLM2-135M-Instruct.md")
    parser.add_argument("--push", metavar="REPO_ID", help="also push_to_hub the folder to this repository")
    args = parser.parse_args()

    model = ETModelForCausalLM.from_pretrained(args.model, max_seq_len=1024) if args.model.suffix == ".gguf" \
        else ETModelForCausalLM.from_pretrained(args.model)
    ids = eval_tokens(model.tokenizer)
    load_avg = os.getloadavg()[0]
    prefill, decode = speed(model, ids[:, :128], 128, args.runs)
    metrics: dict = {"prefill_tokens_per_s": round(prefill, 1), "decode_tokens_per_s": round(decode, 1),
                     "peak_rss_mb": round(model.stats.peak_rss_bytes / 1e6)}
    if args.gguf:
        metrics.update(quality(model, args.gguf, ids, args.window))
    print(json.dumps(metrics), flush=True)

    old = args.card.read_text() if args.card.exists() else ""
    card = {"base_model": BASE_MODEL, "license": LICENSE, "metrics": metrics, "quality_table": quality_block(old)}
    model.save_pretrained(args.out, card=card)
    loads = [fresh_process_load(args.out) for _ in range(args.runs)]
    load = sorted(r["from_pretrained"] for r in loads)[len(loads) // 2]
    ready = sorted(r["ready"] for r in loads)[len(loads) // 2]
    metrics["load_seconds"] = round(load, 2)
    metrics["measured_on"] = (
        f"Measured by `benchmarks/model_card.py` on {platform.machine()} Linux, {os.cpu_count()} cores "
        f"(shared with other jobs: load average {load_avg:.1f} at the start), `OMP_NUM_THREADS=1` "
        f"(ExecuTorch's own thread pool uses every core). Speed: prompt 128 + 128 new tokens, greedy, median "
        f"of {args.runs} warm runs. Load: `from_pretrained` of the saved folder in a fresh process, median "
        f"of {len(loads)} ({ready:.2f} s from after `import torch`, including our imports), no export."
        + (f" Quality: {ids.shape[1]} tokens of `benchmarks/data/eval_text.txt` in {args.window}-token windows, "
           f"teacher-forced, against eager float32 transformers on the weights of `{args.gguf.name}`."
           if args.gguf else "")
    )
    model.save_pretrained(args.out, card=card)
    args.card.write_text((args.out / "README.md").read_text())
    print(json.dumps({**metrics, "ready": ready}), flush=True)
    print(f"wrote {args.out} and {args.card}")
    if args.push:
        print(model.push_to_hub(args.push, card=card))


if __name__ == "__main__":
    main()

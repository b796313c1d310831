"""The peer's numbers: optimum-executorch's own export and generate() of the demo model.

Runs inside a separate virtual environment that has ``optimum-executorch`` (it pins a different
transformers than we do, so it cannot share ours); ``benchmarks/generate.py --peer-python`` calls it
and prints its figures beside ours. Its export lives in a temporary folder, so we copy the ``.pte``
to ``--keep`` and reuse it on later runs. Greedy, EOS ignored, prompt/new tokens as given; prints
one JSON line ``{"prefill", "decode", "generated"}`` (tok/s, median of --runs warm runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=ROOT / ".demo" / "peer-8da4w")
    args = parser.parse_args()

    from optimum.executorch import ExecuTorchModelForCausalLM
    from transformers import AutoTokenizer

    hf = Path(
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "fetch_demo_model.py"), str(ROOT / ".demo"), "--hf-folder"],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
    )
    if not (args.keep / "model.pte").is_file():
        start = time.perf_counter()
        model = ExecuTorchModelForCausalLM.from_pretrained(
            str(hf), export=True, task="text-generation", recipe="xnnpack", attn_implementation="custom_sdpa",
            use_custom_kv_cache=True, qlinear="8da4w", qlinear_group_size=32, qembedding="8w", max_seq_len=1024,
        )
        print(f"peer export took {time.perf_counter() - start:.0f} s", file=sys.stderr)
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(model._temp_dir.name) / "model.pte", args.keep / "model.pte")
    model = ExecuTorchModelForCausalLM.from_pretrained(str(args.keep))
    model.eos_token_ids = []  # generate exactly --new-tokens, as the other rows do

    tok = AutoTokenizer.from_pretrained(hf)
    text = ROOT / "benchmarks" / "data" / "eval_text.txt"
    text = text.read_text() if text.exists() else "The history of the city begins long before records. " * 40
    ids = tok(text).input_ids[: args.prompt_tokens]
    total = args.prompt_tokens + args.new_tokens

    forward = model.forward
    first_call: list[float] = []
    calls = [0]

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        calls[0] += 1
        if not first_call:
            first_call.append(time.perf_counter() - t)
        return out

    model.forward = timed_forward

    def run():
        first_call.clear()
        calls[0] = 0
        t0 = time.perf_counter()
        out = model.generate(ids, max_seq_len=total)  # the peer's own generate(): greedy
        elapsed = time.perf_counter() - t0
        prefill_s = first_call[0]
        # its generate() may prefill in several calls; tokens after the first come one per call
        return len(ids) / prefill_s, (len(out) - 1) / (elapsed - prefill_s), len(out), calls[0]

    run()
    results = [run() for _ in range(args.runs)]
    print(json.dumps({
        "prefill": statistics.median(r[0] for r in results),
        "decode": statistics.median(r[1] for r in results),
        "generated": results[0][2],
        "forward_calls": results[0][3],
    }))


if __name__ == "__main__":
    main()

"""Generation speed, side by side on the same .pte: our generate(), a bare runtime loop, ExecuTorch's C++
TextLLMRunner, and optionally the peer (optimum-executorch) on its own export.

Default: SmolLM2-135M-Instruct (GGUF from PyPI) with 8da4w (group 32) + 8-bit embeddings, prompt 128
tokens, 128 new tokens, greedy, EOS ignored, one warm-up run then --runs interleaved rounds (the order
reversed every other round): medians per contender, and ours/C++ ratios round by round (each pair
measured seconds apart, so machine noise cancels more than in a ratio of medians).
Issue targets: ours >= 0.95x the C++ runner in prefill and decode; vs the peer, prefill >= 1.15x and
decode no slower.

Run:  python benchmarks/generate.py [--pte DIR] [--runs 3] [--peer-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from et_transformers.threads import prefer_single_threaded_blas  # noqa: E402

prefer_single_threaded_blas()  # before torch loads; the same for every contender in this process
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

TEXT = ROOT / "benchmarks" / "data" / "eval_text.txt"


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """Exactly ``n`` tokens of English text (repeated if needed)."""
    from et_transformers.bench import DEFAULT_TEXT
    from et_transformers.bench import prompt_ids as cut

    return cut(tokenizer, n, TEXT.read_text() if TEXT.exists() else DEFAULT_TEXT)


def bench_bare_loop(program, ids, new_tokens):
    """The floor: prefill + greedy decode straight on the runtime, no generate() machinery."""
    with program.lock:  # the program's callers hold it (decode refills shared input tensors)
        t0 = time.perf_counter()
        logits = program.forward(ids, 0)
        token = int(logits.argmax())
        t1 = time.perf_counter()
        pos = ids.shape[1]
        for _ in range(new_tokens - 1):
            token = int(program.decode(token, pos, copy=False).argmax())
            pos += 1
        t2 = time.perf_counter()
    return ids.shape[1] / (t1 - t0), (new_tokens - 1) / (t2 - t1), t1 - t0, new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pte", type=Path, help="exported model folder (default: export the demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer-python", help="python of a venv with optimum-executorch, to bench the peer")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from et_transformers import ETModelForCausalLM, ExportConfig
    from et_transformers.bench import interleaved_runs, measure_cpp_runner, measure_ours, medians, paired_ratios
    from et_transformers.runtime import load_kernel_libraries, load_own_kernels

    if args.pte:
        model = ETModelForCausalLM.from_pretrained(args.pte)
    else:
        from fetch_demo_model import fetch

        model = ETModelForCausalLM.from_pretrained(
            fetch(ROOT / ".demo"),
            export_config=ExportConfig(max_seq_len=1024, qlinear="8da4w", qlinear_group_size=32, qembedding="8w"),
        )
    folder = model.pte_path.parent
    tok = model.tokenizer
    ids = prompt_ids(tok, args.prompt_tokens)
    text = tok.decode(ids[0])
    n = args.new_tokens

    load_kernel_libraries()
    load_own_kernels(folder / "model.pte")
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
    contenders = {
        "et_transformers generate()": lambda: measure_ours(model, ids, n),
        "bare runtime loop": lambda: bench_bare_loop(model.program, ids, n),
        "ExecuTorch C++ TextLLMRunner": lambda: measure_cpp_runner(runner, GenerationConfig, text, n),
    }
    for fn in contenders.values():  # warm-up (the C++ runner loads its own copy of the program)
        fn()
    samples = interleaved_runs(contenders, args.runs)
    rows = {name: medians(rs) for name, rs in samples.items()}
    paired = {
        phase: paired_ratios(samples["et_transformers generate()"], samples["ExecuTorch C++ TextLLMRunner"], i)
        for i, phase in enumerate(("prefill", "decode"))
    }
    if args.peer_python:
        peer = subprocess.run(
            [args.peer_python, str(ROOT / "benchmarks" / "peer_generate.py"), "--prompt-tokens",
             str(args.prompt_tokens), "--new-tokens", str(n), "--runs", str(args.runs)],
            capture_output=True, text=True,
        )
        if peer.returncode == 0:
            r = json.loads(peer.stdout.strip().splitlines()[-1])
            rows["optimum-executorch (its own export)"] = (r["prefill"], r["decode"], None, r["generated"])
        else:
            print("peer benchmark failed:", peer.stderr[-2000:], file=sys.stderr)

    ours = rows["et_transformers generate()"]
    result = {name: {"prefill_tok_s": round(p, 1), "decode_tok_s": round(d, 1), "generated": g}
              for name, (p, d, _, g) in rows.items()}
    cpp = rows["ExecuTorch C++ TextLLMRunner"]
    ratios = {"ours/cpp_runner": (round(ours[0] / cpp[0], 2), round(ours[1] / cpp[1], 2))}
    if "optimum-executorch (its own export)" in rows:
        peer = rows["optimum-executorch (its own export)"]
        ratios["ours/peer"] = (round(ours[0] / peer[0], 2), round(ours[1] / peer[1], 2))
    round_ratios = {phase: [round(r, 3) for r in rs] for phase, rs in paired.items()}
    if args.json:
        print(json.dumps({"rows": result, "ratios": ratios, "ours/cpp_runner by round": round_ratios}))
        return
    print(f"prompt {ids.shape[1]} tokens, {n} new tokens, greedy, median of {args.runs} warm runs; "
          f"pte {model.pte_path} ({model.export_config})")
    print(f"{'':38}{'prefill tok/s':>14}{'decode tok/s':>14}{'generated':>11}")
    for name, r in result.items():
        print(f"{name:38}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}{r['generated']:>11}")
    for name, (p, d) in ratios.items():
        print(f"ratio {name}: prefill {p:.2f}x, decode {d:.2f}x (of the medians)")
    for phase, rs in paired.items():
        print(f"ours/cpp_runner {phase}, round by round: median {statistics.median(rs):.2f}x, "
              f"range {rs[0]:.2f}-{rs[-1]:.2f}x over {len(rs)} rounds")


if __name__ == "__main__":
    main()

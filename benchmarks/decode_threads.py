"""Decode speed of our .pte and the peer's .pte of the same weights, at one and two runtime threads.

The programs run in the same ExecuTorch runtime, through the same bare loop (prefill, then greedy
one-token forwards reading the logits in place), on the same prompt ids. ExecuTorch's thread pool
can only be sized before a program is loaded (XNNPACK keeps a pointer to it), so each round starts
one process per thread count; inside it the programs alternate, the order reversed every other
round, and the thread counts alternate across rounds too. Printed: medians of prefill and decode
tok/s per program and thread count, our/peer ratios, and with ``--etdump`` the per-token ETDump of
32 decode steps: delegate calls, XNNPACK GEMM time, other delegate time, ``custom_sdpa`` time and
microseconds per call, everything else.

With ``--cpp-runner TOKENIZER_JSON``, each process also runs every program through ExecuTorch's C++
``TextLLMRunner`` (a text prompt of about the same length, greedy, EOS ignored; the runner's own
clock), printed as the program's "(C++ runner)" row with its own ratios.

With ``--llama-bench BIN --gguf FILE``, each round also runs llama.cpp's ``llama-bench`` (pp and tg
of the same lengths, at each thread count) between the processes, so llama.cpp stands in the same
interleaved rounds and gets its own medians and ratios.

Run:  python benchmarks/decode_threads.py --ours DIR_OR_PTE --peer PEER_PTE [--runs 5] [--etdump]
          [--llama-bench BIN --gguf Q4_0.gguf] [--recipe default]
      (``--ours`` defaults to a fresh export of the demo model, made by this checkout into a
      temporary cache: the peer's scheme, or with ``--recipe default`` our default recipe;
      ``../shared/tools/peer-export.sh`` builds the peer's .pte; ``--cpp-runner TOKENIZER_JSON`` adds
      the C++ runner's figures.)
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

PEER_SCHEME = dict(max_seq_len=1024, qlinear="8da4w", qlinear_group_size=32, qembedding="8w")


def _pte(path: Path) -> Path:
    return path / "model.pte" if path.is_dir() else path


class _RawProgram:
    """A ``.pte`` run straight through the bindings: ours and the peer's alike (the peer's lacks our
    metadata methods and returns every position's logits, so only the last row is read)."""

    def __init__(self, path: str, etdump: bool):
        from et_transformers.runtime import _bindings, load_own_kernels

        load_own_kernels(path)
        self.module = _bindings()._load_for_executorch(path, enable_etdump=etdump)
        sizes = tuple(self.module.method_meta("forward").input_tensor_meta(0).sizes())
        self.one_token = sizes[-1] == 1  # a static one-token forward

    def next_token(self, ids, start: int) -> int:
        import torch

        positions = torch.arange(start, start + ids.shape[-1])
        logits = self.module.forward((ids, positions), False)[0]
        return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())

    def write_etdump(self, path) -> None:
        self.module.write_etdump_result_to_file(str(path))


def _runner_rows(ptes: list[str], tokenizer: str, prompt_tokens: int, new_tokens: int, reps: int) -> dict:
    """``{pte: [(prefill, decode), ...]}`` from ExecuTorch's C++ ``TextLLMRunner`` on each program."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from tokenizers import Tokenizer

    from et_transformers.bench import DEFAULT_TEXT, measure_cpp_runner

    tok = Tokenizer.from_file(tokenizer)
    ids = tok.encode((DEFAULT_TEXT + " ") * 8, add_special_tokens=False).ids[:prompt_tokens]
    text = tok.decode(ids)
    runners = {p: TextLLMRunner(p, tokenizer) for p in ptes}
    for runner in runners.values():
        measure_cpp_runner(runner, GenerationConfig, text, 4)  # warm-up
    rows: dict[str, list] = {p: [] for p in ptes}
    for _ in range(reps):
        for p, runner in runners.items():
            prefill, decode, _, _ = measure_cpp_runner(runner, GenerationConfig, text, new_tokens)
            rows[p].append((prefill, decode))
    return rows


def child(threads: int, ptes: list[str], prompt_tokens: int, new_tokens: int, reps: int, etdump: bool,
          tokenizer: str | None = None) -> None:
    """One process: size the pool, load every program, time them alternately; print JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from et_transformers.runtime import _bindings, load_kernel_libraries

    load_kernel_libraries()
    _bindings()._unsafe_reset_threadpool(threads)
    programs = [_RawProgram(p, etdump) for p in ptes]
    ids = torch.randint(1000, 20000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def run(program, steps):
        t0 = time.perf_counter()
        if program.one_token:  # ExecuTorch's runner prefills such a program token by token too
            for i in range(prompt_tokens):
                token = program.next_token(ids[:, i : i + 1], i)
        else:
            token = program.next_token(ids, 0)
        t1 = time.perf_counter()
        pos = prompt_tokens
        for _ in range(steps - 1):
            token = program.next_token(torch.tensor([[token]]), pos)
            pos += 1
        t2 = time.perf_counter()
        return prompt_tokens / (t1 - t0), (steps - 1) / (t2 - t1)

    result: dict[str, list] = {p: [] for p in ptes}
    if etdump:
        for path, program in zip(ptes, programs):
            run(program, 2)  # warm-up
            run(program, 33)  # one prefill + 32 decode steps
            result[path] = _etdump_breakdown(program, steps=32)
    else:
        for program in programs:
            run(program, 4)  # warm-up: XNNPACK packs weights
        for _ in range(reps):
            for path, program in zip(ptes, programs):
                result[path].append(run(program, new_tokens))
        if tokenizer:
            for path, rows in _runner_rows(ptes, tokenizer, prompt_tokens, new_tokens, reps).items():
                result[f"{path}#cpp"] = rows
    print(json.dumps(result))


def _etdump_breakdown(program, steps: int) -> dict:
    """Per decode token: delegate calls, GEMM (XNNPACK's and our q4_linear's) / other delegate /
    attention (custom_sdpa or ours) / other kernel ms."""
    from executorch.devtools import Inspector

    path = Path(tempfile.mkstemp(suffix=".etdp")[1])
    program.write_etdump(path)
    inspector = Inspector(etdump_path=str(path))
    path.unlink()
    decode_blocks = [b for b in inspector.event_blocks if b.name == "Execute"]
    totals = {"delegate_calls": 0.0, "gemm_ms": 0.0, "other_delegate_ms": 0.0, "sdpa_ms": 0.0,
              "sdpa_calls": 0, "other_kernels_ms": 0.0, "execute_ms": 0.0}
    runs = 0
    for block in decode_blocks:
        # the last `steps` one-token runs are what we want; blocks hold every run of one shape
        events = block.events
        n = len(events[0].perf_data.raw) if events and events[0].perf_data else 0
        if n < steps or not any("sdpa" in e.name for e in events):
            continue
        take = slice(n - steps, n)
        runs = steps
        for e in events:
            if e.perf_data is None:
                continue
            ms = sum(e.perf_data.raw[take])
            if e.name == "Method::execute":
                totals["execute_ms"] += ms
            elif e.name == "DELEGATE_CALL":
                totals["delegate_calls"] += steps
                totals["_delegate_ms"] = totals.get("_delegate_ms", 0.0) + ms
            elif e.name == "OPERATOR_CALL":
                continue
            elif e.is_delegated_op:
                key = "gemm_ms" if ("GEMM" in e.name or "Fully Connected" in e.name) else "_xnn_ops_ms"
                totals[key] = totals.get(key, 0.0) + ms
                if key == "gemm_ms":
                    totals["_delegated_gemm_ms"] = totals.get("_delegated_gemm_ms", 0.0) + ms
            elif "q4_linear" in e.name:  # our own kernel's GEMMs (the q4_0 scheme)
                totals["gemm_ms"] += ms
            elif "sdpa" in e.name:  # llama::custom_sdpa, or our et_transformers::sdpa
                totals["sdpa_ms"] += ms
                totals["sdpa_calls"] += steps
            else:
                totals["other_kernels_ms"] += ms
    if not runs:
        return {}
    delegate_ms = totals.pop("_delegate_ms", 0.0)
    totals.pop("_xnn_ops_ms", None)
    totals["other_delegate_ms"] = delegate_ms - totals.pop("_delegated_gemm_ms", 0.0)
    out = {k: round(v / runs, 3) for k, v in totals.items() if k != "sdpa_calls"}
    out["sdpa_us_per_call"] = round(totals["sdpa_ms"] * 1000 / max(totals["sdpa_calls"], 1), 1)
    return out


def export_ours(recipe: str) -> Path:
    """A fresh export of the demo model by this checkout (a temporary cache, force_export):
    ``peer`` is the peer's scheme, ``default`` our default recipe, anything else a recipe name."""
    from fetch_demo_model import fetch

    from et_transformers import ETModelForCausalLM, ExportConfig
    from et_transformers.config import DEFAULT_RECIPE

    cache = Path(tempfile.mkdtemp(prefix="et-bench-cache-"))
    config = ExportConfig(**PEER_SCHEME) if recipe == "peer" else None
    model = ETModelForCausalLM.from_pretrained(
        fetch(ROOT / ".demo"), export_config=config, recipe=None if config else (DEFAULT_RECIPE if recipe == "default" else recipe),
        max_seq_len=PEER_SCHEME["max_seq_len"], cache_dir=cache, force_export=True, warmup=False,
    )
    return model.pte_path


def llama_bench(binary: str, gguf: str, threads: int, prompt: int, new: int,
                reps: int) -> tuple[float, float]:
    """llama.cpp's own benchmark: (pp tok/s, tg tok/s), each the mean of ``reps`` repetitions."""
    cmd = [binary, "-m", gguf, "-p", str(prompt), "-n", str(new), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-bench failed:\n{proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"])
    return float(pp), float(tg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", type=Path, help="our exported folder or .pte (default: export fresh)")
    parser.add_argument("--peer", type=Path, help="the peer's model.pte (optional)")
    parser.add_argument("--other", type=Path, action="append", default=[], help="more .pte files to compare")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=5, help="rounds (one process per thread count each)")
    parser.add_argument("--reps", type=int, default=2, help="timed runs per program per process")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--etdump", action="store_true", help="also print the ETDump breakdown per token")
    parser.add_argument("--recipe", help="what the fresh exports of ours use, comma-separated: peer "
                                         "(the peer's scheme, the default), default (our default "
                                         "recipe) or recipe names; not with --ours")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary, run in the same rounds")
    parser.add_argument("--gguf", help="the GGUF llama-bench reads (with --llama-bench)")
    parser.add_argument("--cpp-runner", metavar="TOKENIZER_JSON",
                        help="also time every program in ExecuTorch's C++ TextLLMRunner with this tokenizer")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("ptes", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.ptes, args.prompt_tokens, args.new_tokens, args.reps, args.etdump,
                     args.cpp_runner)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "et_transformers"],
                                capture_output=True, text=True).stdout.strip())
    if bool(args.llama_bench) != bool(args.gguf):
        parser.error("--llama-bench and --gguf go together")
    if args.ours and args.recipe:
        parser.error("--recipe chooses what to export fresh; --ours is an existing program")
    recipes = [r.strip() for r in (args.recipe or "peer").split(",")]
    if args.ours:
        named = {"ours": _pte(args.ours)}
    else:
        from et_transformers.config import RECIPES

        unknown = [r for r in recipes if r not in {"peer", "default", *RECIPES}]
        if unknown:
            parser.error(f"--recipe takes peer, default or recipe names ({', '.join(RECIPES)}), not {unknown}")
        named = {f"ours:{r}": export_ours(r) for r in recipes}
    if args.peer:
        named["peer"] = _pte(args.peer)
    for i, other in enumerate(args.other):
        named[f"other{i + 1}:{other.parent.name}"] = _pte(other)
    threads = [int(t) for t in args.threads.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def spawn(t: int, order: list[str], etdump: bool) -> dict:
        cmd = [sys.executable, __file__, "--child", str(t), "--reps", str(args.reps),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               *(["--etdump"] if etdump else []),
               *(["--cpp-runner", args.cpp_runner] if args.cpp_runner and not etdump else []),
               *[str(named[n]) for n in order]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = {n: data[str(named[n])] for n in order}
        rows.update({f"{n} (C++ runner)": data[f"{named[n]}#cpp"] for n in order if f"{named[n]}#cpp" in data})
        return rows

    samples: dict[tuple[str, int], list] = {}
    names = list(named)
    for r in range(args.runs):
        for t in (threads if r % 2 == 0 else threads[::-1]):
            order = names if r % 2 == 0 else names[::-1]
            for n, rs in spawn(t, order, False).items():
                samples.setdefault((n, t), []).extend(rs)
            if args.llama_bench:
                lcpp = llama_bench(args.llama_bench, args.gguf, t, args.prompt_tokens, args.new_tokens, args.reps)
                samples.setdefault(("llama.cpp", t), []).append(lcpp)
    print(f"programs (our exporter at commit {commit}{' + uncommitted changes' if dirty else ''}):")
    for n, p in named.items():
        print(f"  {n}: {p}")
    if args.llama_bench:
        print(f"  llama.cpp: llama-bench on {args.gguf}")
    print(f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy, bare runtime loop, "
          f"{args.runs} rounds x {args.reps} runs, medians")
    print(f"{'program':44}{'threads':>8}{'prefill tok/s':>15}{'decode tok/s':>14}")
    med = {}
    for (n, t), rs in sorted(samples.items(), key=lambda item: (item[0][0].endswith("(C++ runner)"), item[0])):
        med[(n, t)] = (statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs))
        print(f"{n:44}{t:>8}{med[(n, t)][0]:>15.1f}{med[(n, t)][1]:>14.1f}")
    for suffix in ("", " (C++ runner)"):
        for mine in (n for n in named if n.startswith("ours")):
            for other in ("peer", "llama.cpp"):
                theirs = other if other == "llama.cpp" else other + suffix
                for t in threads:
                    if (theirs, t) in med and (mine + suffix, t) in med:
                        o, p = med[(mine + suffix, t)], med[(theirs, t)]
                        print(f"{mine + suffix}/{theirs} at {t} thread(s): prefill {o[0] / p[0]:.2f}x, "
                              f"decode {o[1] / p[1]:.2f}x")
    if args.etdump:
        print("ETDump, per decode token (32 steps after a 128-token prompt; ms unless noted):")
        for t in threads:
            for n, row in spawn(t, names, True).items():
                print(f"  {n} @ {t} thread(s): {json.dumps(row)}")


if __name__ == "__main__":
    main()

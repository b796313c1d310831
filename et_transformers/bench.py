"""Generation speed side by side: our generate(), eager transformers, ExecuTorch's C++ runner, llama.cpp.

Every contender runs the same job (a prompt of ``prompt_tokens`` tokens of English text, then
``new_tokens`` greedy tokens, EOS ignored where the contender allows it; one warm-up, then the
median of ``runs``) and reports prefill and decode tokens/s, time to first token and peak RSS.
:func:`compare` runs each contender in a fresh process of its own, one after another, so each
peak RSS is that contender's alone (read from the OS when the process ends) and no contender
competes with another for the cores. The in-process measurements (``measure_*``) are shared with
``benchmarks/generate.py``, which interleaves contenders in one process instead.

Contenders: ``et_transformers`` (the ``.pte`` through :class:`~et_transformers.ETModelForCausalLM`),
``transformers`` (the source checkpoint, eager PyTorch, float32, all cores), ``executorch-runner``
(ExecuTorch's C++ ``TextLLMRunner`` on the same ``.pte`` + ``tokenizer.json``), ``llama.cpp``
(``llama-bench`` on a GGUF of the same model, when both are given). A contender that cannot run
says why in ``note``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONTENDERS = ("et_transformers", "transformers", "executorch-runner", "llama.cpp")
DEFAULT_TEXT = (
    "The history of the city begins long before written records. Farmers settled along the river, "
    "traders followed the roads that crossed it, and over the centuries a market town grew into a "
    "capital with bridges, libraries, theatres and a university that drew students from far away. "
)
#: Where a local llama.cpp build may keep ``llama-bench`` (besides ``PATH``).
LLAMA_BENCH_CANDIDATES = ("~/.cache/llamacpp-bench/llama.cpp/build/bin/llama-bench",)


@dataclass
class BenchSpec:
    """One benchmark job.

    Attributes:
        model_dir: the exported model folder (``model.pte``, ``tokenizer.json``...).
        source: the source checkpoint for the eager column: a folder, a ``.gguf`` file or a Hub id
            (``None``: the column says it is missing).
        prompt_tokens: prompt length in tokens.
        new_tokens: tokens to generate.
        runs: measured runs per contender (after one warm-up); medians are reported.
        gguf: a GGUF of the same model for the llama.cpp column.
        llama_bench: the ``llama-bench`` binary (default: ``PATH``, then a local build).
        threads: threads for eager PyTorch and llama.cpp (default: all cores).
        text: text the prompt is cut from (repeated when short).
        contenders: which contenders to run.
    """

    model_dir: str
    source: str | None = None
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 3
    gguf: str | None = None
    llama_bench: str | None = None
    threads: int | None = None
    text: str = DEFAULT_TEXT
    contenders: tuple[str, ...] = CONTENDERS


@dataclass
class BenchResult:
    """One contender's figures (``None`` where not measured) or the reason it is missing.

    Attributes:
        name: the contender.
        prefill_tok_s: prompt tokens per second of prefill.
        decode_tok_s: generated tokens (after the first) per second of decode.
        ttft_ms: time to first token, from the start of the call.
        generated: tokens generated in a run.
        prompt_tokens: prompt tokens the contender saw.
        peak_rss_mib: peak resident memory of the contender's process.
        weight_bytes_per_token: bytes of weights one decode step reads (the program's manifest
            for ours and the C++ runner; the GGUF's tensors for llama.cpp; the float parameters for
            eager transformers; each embedding table counted as one row unless tied to the head).
        decode_gb_s: achieved weight bandwidth, ``weight_bytes_per_token * decode_tok_s / 1e9``.
        load_s: time to load the model.
        note: why it is missing, or a caveat.
    """

    name: str
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    ttft_ms: float | None = None
    generated: int | None = None
    prompt_tokens: int | None = None
    peak_rss_mib: float | None = None
    weight_bytes_per_token: int | None = None
    decode_gb_s: float | None = None
    load_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The result as plain data."""
        return asdict(self)

    def with_weight_bytes(self, weight_bytes: int | None) -> "BenchResult":
        """Set :attr:`weight_bytes_per_token` and the bandwidth it implies; return ``self``."""
        self.weight_bytes_per_token = weight_bytes
        if weight_bytes and self.decode_tok_s:
            self.decode_gb_s = weight_bytes * self.decode_tok_s / 1e9
        return self


def gguf_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of a GGUF's tensors one decode step reads: all of them, the token embedding as one row
    (unless the file has no separate ``output.weight``: then the head reads the embedding whole)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = 0
    for name, t in tensors.items():
        size = int(t.n_bytes)
        if name == "token_embd.weight" and "output.weight" in tensors:
            size //= int(t.shape[-1])  # rows are the last of GGUF's (reversed) dims
        total += size
    return total


def eager_weight_bytes(hf_model) -> int:
    """Bytes of a transformers model's parameters one decode step reads (embeddings one row unless
    tied to the head)."""
    head = hf_model.get_output_embeddings()
    tied = {id(head.weight)} if head is not None else set()
    total = 0
    for module in hf_model.modules():
        for param in module.parameters(recurse=False):
            size = param.numel() * param.element_size()
            if type(module).__name__ == "Embedding" and id(param) not in tied:
                size //= param.shape[0]
            total += size
    return total


def manifest_weight_bytes(folder: str | os.PathLike) -> int | None:
    """The ``weight_bytes_per_token`` an exported folder's manifest records (None if it has none)."""
    from .errors import ProgramError
    from .manifest import Manifest

    try:
        return Manifest.read(Path(folder)).weight_bytes_per_token
    except ProgramError:  # a folder without a readable manifest simply has no figure
        return None


# -- in-process measurements (shared with benchmarks/generate.py) ---------------------------


def prompt_ids(tokenizer, n: int, text: str = DEFAULT_TEXT):
    """Exactly ``n`` token ids (``[1, n]``) of ``text``, repeated if it is short."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    while ids.shape[1] < n:
        ids = torch.cat([ids, ids], dim=1)[:, :n]
    return ids


def measure_ours(model, ids, new_tokens: int) -> tuple[float, float, float, int]:
    """``(prefill tok/s, decode tok/s, TTFT s, generated)`` of one greedy ``model.generate``."""
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    s = model.stats
    return s.prefill_tokens_per_s, s.decode_tokens_per_s, s.time_to_first_token, s.generated_tokens


class _TokenClock:
    """A streamer that only notes when the first new token arrives (transformers calls ``put``)."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def measure_eager(hf_model, ids, new_tokens: int) -> tuple[float, float, float, int]:
    """``(prefill tok/s, decode tok/s, TTFT s, generated)`` of one greedy eager transformers run.

    Prefill is the time to the first token (transformers does not separate them).
    """
    import torch

    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=clock, pad_token_id=hf_model.generation_config.eos_token_id,
        )
    end = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    ttft = clock.first - t0
    decode = (generated - 1) / (end - clock.first) if generated > 1 else None
    return ids.shape[1] / ttft, decode, ttft, generated


@contextlib.contextmanager
def stdout_silenced():
    """Hide what C++ code prints on the process's stdout (the runner prints every token)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def measure_cpp_runner(runner, generation_config_cls, text: str, new_tokens: int) -> tuple[float, float, float, int]:
    """``(prefill tok/s, decode tok/s, TTFT s, generated)`` of one ``TextLLMRunner.generate``.

    The runner's clock has millisecond resolution, and its build may not offer ``ignore_eos``
    (then it stops at EOS like any generation would).
    """
    stats: dict[str, Any] = {}
    config = generation_config_cls(max_new_tokens=new_tokens, temperature=0.0, echo=False)
    if hasattr(config, "ignore_eos"):
        config.ignore_eos = True
    with stdout_silenced():
        runner.generate(text, config, lambda piece: None, lambda s: stats.update(json.loads(s.to_json_string())))
    runner.reset()
    # Intervals under the clock's resolution count as 1 ms (a lower bound on the speed).
    prefill_s = max(stats["prompt_eval_end_ms"] - stats["inference_start_ms"], 1) / 1000
    decode_s = max(stats["inference_end_ms"] - stats["prompt_eval_end_ms"], 1) / 1000
    # The runner's generated_tokens excludes the token prefill produced; its decode interval
    # (prompt_eval_end -> inference_end) covers exactly those tokens.
    decoded = stats["generated_tokens"]
    ttft = (stats["first_token_ms"] - stats["inference_start_ms"]) / 1000
    decode = decoded / decode_s if decoded > 0 else None
    return stats["prompt_tokens"] / prefill_s, decode, ttft, decoded + 1


def medians(samples: list[tuple]) -> tuple:
    """Per-field medians of measurement tuples (``None`` fields skipped)."""
    out = []
    for values in zip(*samples):
        present = [v for v in values if v is not None]
        out.append(statistics.median(present) if present else None)
    return tuple(out)


def interleaved_runs(contenders: dict, runs: int) -> dict[str, list[tuple]]:
    """Run each contender once per round, ``runs`` rounds, the order reversed every other round (so
    drift and position hit all alike); every contender's measurements, round by round."""
    results: dict[str, list] = {name: [] for name in contenders}
    for round_ in range(runs):
        names = list(contenders) if round_ % 2 == 0 else list(reversed(list(contenders)))
        for name in names:
            results[name].append(contenders[name]())
    return results


def paired_ratios(ours: list[tuple], theirs: list[tuple], field: int) -> list[float]:
    """Round-by-round ratios ``ours[i][field] / theirs[i][field]``, sorted (rounds where either is
    missing skipped): measured seconds apart, each pair shares the machine's state of the moment."""
    return sorted(a[field] / b[field] for a, b in zip(ours, theirs) if a[field] and b[field])


# -- one contender per process ---------------------------------------------------------------


def _worker(name: str, spec: BenchSpec) -> BenchResult:
    """Measure one contender in this (fresh) process."""
    t0 = time.perf_counter()
    folder = Path(spec.model_dir)
    if name == "et_transformers":
        from .modeling import ETModelForCausalLM

        model = ETModelForCausalLM.from_pretrained(folder)
        ids = prompt_ids(model.tokenizer, spec.prompt_tokens, spec.text)
        load = time.perf_counter() - t0
        run = lambda: measure_ours(model, ids, spec.new_tokens)  # noqa: E731
    elif name == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        from .modeling import load_tokenizer

        torch.set_num_threads(spec.threads or os.cpu_count() or 1)  # eager PyTorch uses every core
        source = Path(spec.source).expanduser()
        if source.suffix == ".gguf":
            hf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(spec.source)
        hf_model.eval()
        ids = prompt_ids(load_tokenizer(folder), spec.prompt_tokens, spec.text)
        load = time.perf_counter() - t0
        run = lambda: measure_eager(hf_model, ids, spec.new_tokens)  # noqa: E731
        weight_bytes = eager_weight_bytes(hf_model)
    elif name == "executorch-runner":
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

        from .modeling import load_tokenizer
        from .runtime import load_kernel_libraries, load_own_kernels

        tokenizer = load_tokenizer(folder)
        text = tokenizer.decode(prompt_ids(tokenizer, spec.prompt_tokens, spec.text)[0])
        load_kernel_libraries()
        with stdout_silenced():
            load_own_kernels(folder / "model.pte")
            runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
        load = time.perf_counter() - t0
        run = lambda: measure_cpp_runner(runner, GenerationConfig, text, spec.new_tokens)  # noqa: E731
    else:
        raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}.")
    if name != "transformers":
        weight_bytes = manifest_weight_bytes(folder)  # the same program for ours and the C++ runner
    run()  # warm-up
    prefill, decode, ttft, generated = medians([run() for _ in range(spec.runs)])
    return BenchResult(
        name=name, prefill_tok_s=prefill, decode_tok_s=decode, ttft_ms=None if ttft is None else ttft * 1000,
        generated=int(generated), prompt_tokens=spec.prompt_tokens, load_s=load,
        note="" if generated >= spec.new_tokens else f"stopped at EOS after {int(generated)} tokens",
    ).with_weight_bytes(weight_bytes)


#: Runs its arguments as a command and writes the command's peak RSS (KiB) to ``$ET_BENCH_RSS``.
#: A fresh interpreter, so the command is forked from a small process: Linux starts a forked
#: child's RSS high-water mark at its parent's RSS, and ``exec`` keeps it, so a contender forked
#: straight from a process holding a model would report that model's memory as its own.
_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.execvp(sys.argv[1], sys.argv[1:])\n"
    "    finally:\n"
    "        os._exit(127)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(os.environ['ET_BENCH_RSS'], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _run(cmd: list[str], folder: Path) -> tuple[int, str, str, float]:
    """Run ``cmd`` to completion: ``(exit code, stdout, stderr, peak RSS in MiB)``.

    The peak RSS is the kernel's accounting for that process alone (``wait4`` in
    :data:`_LAUNCHER`, a small process, so the figure does not include this one's memory).
    """
    out_path, err_path, rss_path = folder / "stdout", folder / "stderr", folder / "rss"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=out, stderr=err, text=True,
                              env={**os.environ, "ET_BENCH_RSS": str(rss_path)})
    if not rss_path.is_file():
        raise OSError(f"cannot run {cmd[0]}: {_last_line(err_path.read_text())}")
    return proc.returncode, out_path.read_text(), err_path.read_text(), int(rss_path.read_text()) / 1024  # KiB on Linux


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _run_worker(name: str, spec: BenchSpec) -> BenchResult:
    with tempfile.TemporaryDirectory(prefix="et-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "et_transformers.bench", name, json.dumps(asdict(spec)), str(out)]
        logger.info("bench: running %s", name)
        code, _, stderr, rss = _run(cmd, Path(tmp))
        if code != 0 or not out.is_file():
            return BenchResult(name, note=f"failed: {_last_line(stderr)}")
        result = BenchResult(**json.loads(out.read_text()))
    result.peak_rss_mib = rss
    return result


def find_llama_bench(path: str | None = None) -> str | None:
    """``path`` if given, else ``llama-bench`` on ``PATH``, else a known local build; or ``None``."""
    if path:
        return path
    found = shutil.which("llama-bench")
    if found:
        return found
    for candidate in LLAMA_BENCH_CANDIDATES:
        if Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    return None


def run_llama_bench(spec: BenchSpec) -> BenchResult:
    """The llama.cpp column: ``llama-bench`` on ``spec.gguf`` (or why it is missing)."""
    if not spec.gguf:
        return BenchResult("llama.cpp", note="no GGUF given (--gguf PATH)")
    binary = find_llama_bench(spec.llama_bench)
    if binary is None:
        return BenchResult("llama.cpp", note="llama-bench not found (--llama-bench PATH, or put it on PATH)")
    cmd = [binary, "-m", spec.gguf, "-p", str(spec.prompt_tokens), "-n", str(spec.new_tokens),
           "-r", str(spec.runs), "-o", "json"]
    if spec.threads:
        cmd += ["-t", str(spec.threads)]
    with tempfile.TemporaryDirectory(prefix="et-bench-") as tmp:
        try:
            code, stdout, stderr, rss = _run(cmd, Path(tmp))
        except OSError as e:
            return BenchResult("llama.cpp", note=f"cannot run {binary}: {e}")
    try:
        rows = json.loads(stdout)
        prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
        decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (ValueError, KeyError, StopIteration, TypeError):
        return BenchResult("llama.cpp", note=f"llama-bench failed (exit {code}): {_last_line(stderr)}")
    return BenchResult(
        "llama.cpp", prefill_tok_s=prefill, decode_tok_s=decode, ttft_ms=1000 * spec.prompt_tokens / prefill,
        generated=spec.new_tokens, prompt_tokens=spec.prompt_tokens, peak_rss_mib=rss,
        note="TTFT estimated from prefill speed; llama-bench's own prompt and sampling",
    ).with_weight_bytes(_readable_gguf_weight_bytes(spec.gguf))


def _readable_gguf_weight_bytes(path: str) -> int | None:
    try:
        return gguf_weight_bytes(path)
    except (OSError, ValueError, IndexError, KeyError) as e:  # not a GGUF we can read: no figure
        logger.warning("Cannot read the tensors of %s (%s); its decode bandwidth is not reported.", path, e)
        return None


def compare(spec: BenchSpec, progress=None) -> list[BenchResult]:
    """Run every contender of ``spec`` (each in its own process, one after another).

    Args:
        spec: the job.
        progress: called with each contender's name before it runs (for a progress display).

    Returns:
        One :class:`BenchResult` per contender, in ``spec.contenders`` order.
    """
    unknown = set(spec.contenders) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}.")
    results = []
    for name in spec.contenders:
        if progress is not None:
            progress(name)
        if name == "llama.cpp":
            results.append(run_llama_bench(spec))
        elif name == "transformers" and not spec.source:
            results.append(BenchResult(name, note="source checkpoint unknown or not available locally"))
        else:
            results.append(_run_worker(name, spec))
    return results


def spec_for(model, model_id_or_path: str, *, revision=None, gguf_file=None, cache_dir=None,
             local_files_only: bool = False, gguf: str | None = None, **fields: Any) -> BenchSpec:
    """The :class:`BenchSpec` for a loaded model and the name it was loaded by.

    The eager column needs the source checkpoint: ``model_id_or_path`` itself when it is one (a
    folder, a GGUF, a Hub id), or, for an exported folder, the source its manifest records (when it
    still exists locally). The llama.cpp column uses ``gguf``, else the source when it is a GGUF.

    Args:
        model: the loaded :class:`~et_transformers.ETModelForCausalLM`.
        model_id_or_path: what the user named (as given to ``from_pretrained``).
        revision, gguf_file, cache_dir, local_files_only: as given to ``from_pretrained``.
        gguf: a GGUF of the same model for llama.cpp.
        **fields: other :class:`BenchSpec` fields.
    """
    from . import hub
    from .manifest import Manifest

    resolved = hub.resolve(model_id_or_path, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir,
                           local_files_only=local_files_only)
    if resolved.is_program:
        described = Manifest.read(resolved.path).source
        source = described.get("repo_id")
        if described.get("path"):
            path = Path(described["path"]) / (described.get("gguf_file") or "")
            source = str(path) if path.exists() else source
    elif resolved.repo_id:
        source = resolved.repo_id
    else:
        source = str(resolved.path / resolved.gguf_file) if resolved.gguf_file else str(resolved.path)
    if gguf is None and source and source.endswith(".gguf"):
        gguf = source
    return BenchSpec(model_dir=str(model.pte_path.parent), source=source, gguf=gguf, **fields)


def _worker_main(argv: list[str]) -> int:
    """``python -m et_transformers.bench CONTENDER SPEC_JSON OUT_JSON`` (used by :func:`compare`)."""
    from .threads import prefer_single_threaded_blas

    prefer_single_threaded_blas()  # before torch loads, as in the CLI
    parser = argparse.ArgumentParser(prog="python -m et_transformers.bench")
    parser.add_argument("contender", choices=CONTENDERS)
    parser.add_argument("spec")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    spec = BenchSpec(**{**json.loads(args.spec), "contenders": tuple(json.loads(args.spec)["contenders"])})
    result = _worker(args.contender, spec)
    Path(args.out).write_text(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

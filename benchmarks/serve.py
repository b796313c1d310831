"""The server under load: TTFT and tokens/s for 1, 2 and 4 concurrent clients, and the prompt cache.

Default: SmolLM2-135M-Instruct (GGUF from PyPI) exported with the default recipe, served in this
process (uvicorn on 127.0.0.1, --slots 2), driven by the official openai client over HTTP. Each
client streams a completion of a ~128-token prompt (greedy, 64 new tokens at most); per
concurrency level we report the mean and worst TTFT (queue wait included) and the aggregate
tokens/s. Then a 5-turn chat, each turn re-sending the history: the last turn's TTFT with the
prompt cache (the slot holds the history) and without (the slots' caches cleared first), the same
history in both, median of --runs. Memory: resident memory after loading one slot and after the
others, anonymous (private: what a slot adds) and file-backed (the memory-mapped .pte) apart.

Run:  python benchmarks/serve.py [--model PATH] [--slots 2] [--runs 3] [--max-seq-len 1024] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from et_transformers.threads import prefer_single_threaded_blas  # noqa: E402

prefer_single_threaded_blas()  # before torch loads

DEMO = ROOT / ".demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ROOT / "benchmarks" / "data" / "eval_text.txt"
TURNS = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?",
         "Name a famous museum in each.", "Summarize our conversation in one sentence."]


def memory_mib() -> dict[str, float]:
    """This process's resident memory from /proc/self/status, MiB: ``VmRSS`` and its anonymous part
    (``RssAnon``: private memory, what a slot really adds) and file-backed part (``RssFile``: mapped
    files such as the .pte, counted once per mapping although the page cache holds them once)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


async def one_stream(client, prompt: str, new_tokens: int) -> tuple[float, int, float]:
    """``(TTFT s, completion tokens, total s)`` of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.completions.create(model="demo", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens, time.perf_counter() - t0


async def concurrent(url: str, prompts: list[str], new_tokens: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"clients": len(prompts), "ttft_mean_ms": 1000 * statistics.mean(ttfts), "ttft_max_ms": 1000 * max(ttfts),
            "tokens": tokens, "tok_s": tokens / wall, "per_client_tok_s": statistics.mean(r[1] / r[2] for r in results)}


def chat_history(client) -> list[dict]:
    """A 5-turn conversation (greedy replies to :data:`TURNS`), without its last reply."""
    messages = []
    for text in TURNS[:-1]:
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=32, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    return messages + [{"role": "user", "content": TURNS[-1]}]


def last_turn_ttft(client, pool, history: list[dict], cached: bool) -> tuple[float, int, int]:
    """``(TTFT s, cached tokens, prompt tokens)`` of the last turn of ``history``, after its earlier
    turns were sent one by one as a chat client sends them (each re-sending the history so far); without
    the cache, the slots' caches are cleared before the last turn."""
    for end in range(1, len(history) - 1, 2):
        client.chat.completions.create(model="demo", messages=history[:end], max_tokens=32, temperature=0)
    if not cached:
        for slot in pool.slots:
            slot.cache.clear()
    t0, ttft, usage = time.perf_counter(), None, None
    for chunk in client.chat.completions.create(model="demo", messages=history, max_tokens=32, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    return ttft, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO), help="anything from_pretrained takes (default: the demo GGUF)")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (medians reported)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=1024, help="context of the export (the tests' demo: 1024)")
    parser.add_argument("--cache-dir", help="export cache (default: the user's)")
    args = parser.parse_args()

    if args.model == str(DEMO) and not DEMO.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "fetch_demo_model.py"), str(DEMO.parent)], check=True)
    import openai

    from et_transformers import ETModelForCausalLM
    from et_transformers.bench import DEFAULT_TEXT, prompt_ids
    from et_transformers.serving import create_app, load_slots, running

    base = memory_mib()
    model = ETModelForCausalLM.from_pretrained(args.model, cache_dir=args.cache_dir, max_seq_len=args.max_seq_len)
    one = memory_mib()
    models = load_slots(model, args.slots)
    many = memory_mib()
    print(f"{model.pte_path} ({model.pte_path.stat().st_size / 2**20:.0f} MiB .pte, context "
          f"{model.program.metadata.max_context_len})")
    extra = max(args.slots - 1, 1)
    for name in ("VmRSS", "RssAnon", "RssFile"):
        print(f"{name:>7}: {base[name]:6.0f} MiB before loading, {one[name]:6.0f} with 1 slot, {many[name]:6.0f} "
              f"with {args.slots} (+{(many[name] - one[name]) / extra:.0f} MiB per extra slot)")

    tok = model.tokenizer
    text = TEXT.read_text() if TEXT.exists() else DEFAULT_TEXT
    ids = prompt_ids(tok, args.prompt_tokens, text)[0].tolist()
    app = create_app(models, model_id="demo", max_queue=16)
    with running(app) as url:
        # Distinct prompts (a different first token each), so no client reuses another's cache.
        prompts = [f"{i}. " + tok.decode(ids) for i in range(4)]
        asyncio.run(concurrent(url, prompts[:1], 8))  # warm-up
        print(f"\n{args.slots} slots, prompt ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
              f"median of {args.runs} runs")
        print(f"{'clients':>7}  {'TTFT mean ms':>12}  {'TTFT max ms':>11}  {'tok/s total':>11}  {'tok/s per client':>16}")
        for n in (1, 2, 4):
            runs = []
            for r in range(args.runs):
                for slot in app.state.pool.slots:  # each run prefills its prompts in full
                    slot.cache.clear()
                runs.append(asyncio.run(concurrent(url, prompts[:n], args.new_tokens)))
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            print(f"{n:>7}  {med['ttft_mean_ms']:>12.0f}  {med['ttft_max_ms']:>11.0f}  {med['tok_s']:>11.1f}  "
                  f"{med['per_client_tok_s']:>16.1f}")

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        print("\n5-turn chat, TTFT of the last turn (history re-sent each turn):")
        history = chat_history(client)
        for cached in (True, False):
            runs = [last_turn_ttft(client, app.state.pool, history, cached) for _ in range(args.runs)]
            ttft = statistics.median(r[0] for r in runs)
            print(f"  {'with' if cached else 'without'} the prompt cache: {1000 * ttft:.0f} ms "
                  f"({runs[0][1]} of {runs[0][2]} prompt tokens cached)")


if __name__ == "__main__":
    main()

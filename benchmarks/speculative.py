"""Assisted generation on the demo model: tokens per second with and without drafts, side by side.

SmolLM2-135M-Instruct (from the PyPI GGUF, no Hub), the default recipe with ``verify_tokens=8``
exported into a fresh cache folder by the code being measured (or --cache-dir to reuse one). For
each prompt: plain greedy on a one-row program (``verify_tokens=1``, the default recipe's until
session 31) and on the verifying one (what its wider head costs a decode step), greedy with prompt lookup, and greedy with a draft
model (the same weights at the cheaper ``xnnpack-8da4w-pure`` recipe as their own draft), in
interleaved rounds (order reversed every other round); medians per prompt kind, the ratio to
plain greedy on the one-row program, and the acceptance rate. Every output is compared with
plain greedy's on the verifying program, and the script says where one first differs (a quantized
program's multi-row forward rounds differently from its one-row decode step, so near ties can
flip).

Prompt kinds: input-grounded (rewrite or summarise a given passage, edit a given code block),
where the answer quotes its input and prompt lookup finds drafts, and open-ended ones, where it
mostly does not.

By default every answer is ``--new-tokens`` long (EOS ignored, so the text past the answer counts
too); ``--stop-at-eos`` ends each at the model's end of turn instead (both ways give every contender
the same tokens). ``--verify-tokens`` and ``--lookup`` set the verifying program's rows and
``prompt_lookup_num_tokens``.

Run:  python benchmarks/speculative.py [--runs 3] [--new-tokens 128] [--stop-at-eos] [--verify-tokens 8]
      [--lookup 7] [--cache-dir DIR] [--no-draft]
"""

from __future__ import annotations

import argparse
import statistics
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

PASSAGE = (
    "The city council met on Tuesday to discuss the new public library. The building will have three "
    "floors, a children's reading room, a cafe, and a hall for community events. Construction starts in "
    "March and should take eighteen months. The council expects the library to open in the autumn of next "
    "year, and it will be free for every resident of the city."
)
CODE = (
    "def average(values):\n"
    "    total = 0\n"
    "    for v in values:\n"
    "        total = total + v\n"
    "    return total / len(values)\n"
)
PROMPTS = {
    "grounded": [
        f"Repeat the following text exactly, then say 'Done.'\n\n{PASSAGE}",
        f"Rewrite this text in the past tense:\n\n{PASSAGE}",
        f"Rename the function to mean and the variable v to value. Give the whole code.\n\n{CODE}",
    ],
    "open-ended": [
        "Write a short story about a robot who learns to paint.",
        "Explain why the sky is blue to a ten-year-old.",
    ],
}


def timed(model, ids, new_tokens, stop_at_eos=False, **kwargs):
    """``(new tokens per second of the whole call, output, stats)`` for one greedy call (EOS ignored
    unless ``stop_at_eos``)."""
    t0 = time.perf_counter()
    mask = torch.ones_like(ids)  # the chat template's own special tokens are not padding
    eos = {} if stop_at_eos else {"eos_token_id": None}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **eos, **kwargs)
    dt = time.perf_counter() - t0
    return (out.shape[-1] - ids.shape[-1]) / dt, out, model.stats


def main() -> None:
    from et_transformers import ETModelForCausalLM
    from fetch_demo_model import fetch, hf_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lookup", type=int, default=7, help="prompt_lookup_num_tokens")
    parser.add_argument("--verify-tokens", type=int, default=8, help="the verifying program's verify_tokens")
    parser.add_argument("--cache-dir", type=Path, help="export cache (default: a fresh temporary folder)")
    parser.add_argument("--no-draft", action="store_true", help="skip the draft-model contender")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="end each answer at the model's end-of-turn token (default: always --new-tokens, "
                             "text past the answer included)")
    args = parser.parse_args()

    folder = hf_folder(fetch(ROOT / ".demo"))
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="et-spec-"))
    from et_transformers.config import DEFAULT_RECIPE, recipe

    base = ETModelForCausalLM.from_pretrained(folder, export_config=recipe(DEFAULT_RECIPE, verify_tokens=1), cache_dir=cache)
    model = ETModelForCausalLM.from_pretrained(
        folder, export_config=recipe(DEFAULT_RECIPE, verify_tokens=args.verify_tokens), cache_dir=cache
    )
    draft = None if args.no_draft else ETModelForCausalLM.from_pretrained(
        folder, recipe="xnnpack-8da4w-pure", cache_dir=cache
    )
    tok = model.tokenizer
    contenders = {"plain, k=1": {"_model": base}, "plain": {}, "prompt lookup": {"prompt_lookup_num_tokens": args.lookup}}
    if draft is not None:
        contenders["draft model"] = {"assistant_model": draft}
    encoded = {
        kind: [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"] for p in prompts]
        for kind, prompts in PROMPTS.items()
    }
    for kind, batch in encoded.items():  # warm-up
        timed(model, batch[0], 8)
        timed(base, batch[0], 8)
    rates = {(kind, name): [] for kind in encoded for name in contenders}
    per_prompt = {(kind, i, name): [] for kind, batch in encoded.items() for i in range(len(batch)) for name in contenders}
    per_accept = {key: [0, 0] for key in per_prompt}
    accept = {(kind, name): [0, 0] for kind in encoded for name in contenders}
    diverged: dict = {}  # (kind, contender) -> new-token index where each differing output first differs
    for r in range(args.runs):
        order = list(contenders.items()) if r % 2 == 0 else list(contenders.items())[::-1]
        for kind, batch in encoded.items():
            for i, ids in enumerate(batch):
                plain_out = None
                outs = {}
                for name, kwargs in order:
                    kwargs = dict(kwargs)
                    who = kwargs.pop("_model", model)
                    rate, out, stats = timed(who, ids, args.new_tokens, args.stop_at_eos, **kwargs)
                    rates[(kind, name)].append(rate)
                    per_prompt[(kind, i, name)].append(rate)
                    per_accept[(kind, i, name)][0] += stats.drafted_tokens
                    per_accept[(kind, i, name)][1] += stats.accepted_tokens
                    accept[(kind, name)][0] += stats.drafted_tokens
                    accept[(kind, name)][1] += stats.accepted_tokens
                    outs[name] = out
                plain_out = outs["plain"]
                for name, out in outs.items():
                    if not torch.equal(out, plain_out):
                        n = min(out.shape[-1], plain_out.shape[-1])
                        first = int((out[0, :n] != plain_out[0, :n]).nonzero()[0]) - ids.shape[-1]
                        diverged.setdefault((kind, name), []).append(first)
    commit = _commit()
    print(f"SmolLM2-135M-Instruct, default recipe {DEFAULT_RECIPE} with verify_tokens=1 and {args.verify_tokens}, exported by {commit} into {cache}; greedy, "
          f"{'up to ' + str(args.new_tokens) + ' new tokens, stopping at EOS' if args.stop_at_eos else str(args.new_tokens) + ' new tokens, EOS ignored'}, "
          f"{args.runs} interleaved rounds; medians of new tokens/s per call.")
    for (kind, name), where in sorted(diverged.items()):
        print(f"{kind} / {name}: {len(where)} outputs differ from plain greedy on the verifying program, "
              f"first at new token {sorted(where)}")
    print(f"{'prompts':<12} {'contender':<15} {'tok/s':>7} {'vs plain':>9} {'accepted':>9}")
    for kind in encoded:
        base_rate = statistics.median(rates[(kind, "plain, k=1")])
        for name in contenders:
            med = statistics.median(rates[(kind, name)])
            drafted, accepted = accept[(kind, name)]
            acc = f"{accepted / drafted:.0%}" if drafted else "-"
            print(f"{kind:<12} {name:<15} {med:>7.1f} {med / base_rate:>8.2f}x {acc:>9}")
    print("per prompt (the first words of each):")
    for kind, batch in encoded.items():
        for i, prompt in enumerate(PROMPTS[kind]):
            base_rate = statistics.median(per_prompt[(kind, i, "plain, k=1")])
            cells = []
            for name in contenders:
                drafted, accepted = per_accept[(kind, i, name)]
                acc = f" ({accepted / drafted:.0%} of {drafted // args.runs})" if drafted else ""
                cells.append(f"{name} {statistics.median(per_prompt[(kind, i, name)]) / base_rate:.2f}x{acc}")
            print(f"  {prompt[:40]!r}: " + ", ".join(cells))


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"


if __name__ == "__main__":
    main()

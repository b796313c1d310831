"""Structured output on the demo model: decode tokens/s with and without a JSON-schema constraint,
and the grammar mask's share of a decode step.

SmolLM2-135M-Instruct (from the PyPI GGUF, no Hub), the default recipe (1024 context), exported
into a fresh cache folder by the code being measured (or --cache-dir to reuse one that this code
exported). Each round runs, in alternating order, greedy decoding under :data:`SCHEMA` (a list of
people: bounded strings, an integer range, an e-mail pattern, an enum array), which ends when the
JSON is complete, and plain greedy decoding of as many tokens (``eos_token_id=None``). Decode
rates come from ``GenerationStats`` (tokens after the first per second of decode). The mask's time is measured inside
the processor (llguidance's mask, our apply, and the completion check) and divided by the
constrained run's decode time per token. Medians over ``--runs`` rounds.

Run:  OMP_NUM_THREADS=1 python benchmarks/structured.py [--runs 5] [--new-tokens 160] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
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

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 3, "maxItems": 5, "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
            "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}, "maxItems": 2},
        },
        "required": ["name", "age", "email", "roles"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
PROMPT = "List a few people of a small company as JSON: name, age, e-mail and roles."


def timed_processor(tokenizer, vocab_size: int, eos):
    """A :class:`GrammarLogitsProcessor` for :data:`SCHEMA` that adds up the seconds its calls and its
    completion check take (``.seconds``)."""
    from et_transformers.constraints import GrammarLogitsProcessor

    class Timed(GrammarLogitsProcessor):
        seconds = 0.0
        depth = 0  # __call__ syncs too: count the outermost call only

        def _timed(self, method, *args):
            Timed.depth += 1
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                Timed.depth -= 1
                if not Timed.depth:
                    Timed.seconds += time.perf_counter() - t0

        def __call__(self, input_ids, scores):
            return self._timed(super().__call__, input_ids, scores)

        def sync(self, input_ids):  # what the completion check costs
            return self._timed(super().sync, input_ids)

    Timed.seconds = 0.0
    return Timed(SCHEMA, tokenizer, vocab_size=vocab_size, eos_token_id=eos)


def main() -> None:
    from et_transformers import ETModelForCausalLM
    from et_transformers.config import DEFAULT_RECIPE, recipe
    from fetch_demo_model import fetch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=160, help="most tokens of the constrained output")
    parser.add_argument("--cache-dir", help="reuse this cache (default: a fresh temporary one, exported now)")
    args = parser.parse_args()

    gguf = fetch(ROOT / ".demo")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="et-structured-")
    model = ETModelForCausalLM.from_pretrained(gguf, export_config=recipe(DEFAULT_RECIPE, max_seq_len=1024),
                                               cache_dir=cache)
    print(f"model {gguf.name}, cache {cache} ({'exported now' if model.stats.export_time else 'reused'})")
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    mask = torch.ones_like(ids)
    vocab, eos = model.program.metadata.vocab_size, model.generation_config.eos_token_id
    plain_rates, constrained_rates, shares, lengths = [], [], [], []
    text = ""
    new_tokens = args.new_tokens
    for r in range(args.runs + 1):  # round 0 warms both paths up, sets the length, and is not counted
        order = ("plain", "constrained") if r % 2 else ("constrained", "plain")
        for kind in order:
            if kind == "plain":  # as many tokens as the constrained output: the same attention lengths
                model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None)
                if r:
                    plain_rates.append(model.stats.decode_tokens_per_s)
                continue
            processor = timed_processor(tok, vocab, eos)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                 logits_processor=[processor], stopping_criteria=[processor.stopping_criteria])
            stats = model.stats
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            new_tokens = stats.generated_tokens
            if r:
                constrained_rates.append(stats.decode_tokens_per_s)
                lengths.append(stats.generated_tokens)
                shares.append(type(processor).seconds / stats.generated_tokens /
                              (stats.decode_time / max(1, stats.generated_tokens - 1)))
    data = json.loads(text)  # the constrained output parses (and is what the schema allows)
    plain, constrained = statistics.median(plain_rates), statistics.median(constrained_rates)
    share = statistics.median(shares)
    print(f"constrained output: {len(data['people'])} people, {statistics.median(lengths):.0f} tokens")
    print(f"decode tok/s, median of {args.runs} interleaved rounds (1 thread):")
    print(f"  plain greedy          {plain:6.1f}")
    print(f"  JSON-schema greedy    {constrained:6.1f}  ({constrained / plain - 1:+.1%})")
    print(f"  mask share of a decode step: {share:.1%} "
          f"({share * 1000 / constrained:.2f} ms of {1000 / constrained:.1f} ms per token)")


if __name__ == "__main__":
    main()

"""Generate text with the transformers API on ExecuTorch.

Usage: python examples/generate.py MODEL [PROMPT]
MODEL: a Hub id, a model folder, a .gguf file, or a folder written by `et-transformers export`.
"""

import sys

from et_transformers.threads import prefer_single_threaded_blas

prefer_single_threaded_blas()  # before torch loads: ExecuTorch's attention kernel runs ~1.5x faster

from et_transformers import ETModelForCausalLM  # noqa: E402

model_id = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"

model = ETModelForCausalLM.from_pretrained(model_id)  # exports once, then loads from the cache
tok = model.tokenizer
input_ids = tok(prompt, return_tensors="pt").input_ids
output = model.generate(input_ids, max_new_tokens=32, do_sample=False)

print(tok.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
print(model.stats.summary(), file=sys.stderr)  # TTFT, prefill/decode tok/s, peak RSS

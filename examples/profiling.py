"""Profile one generation with ExecuTorch's ETDump and Inspector: time per operator and per phase.

Usage: python examples/profiling.py MODEL [PROMPT]   (not profile.py: that name shadows the stdlib)
Export with `et-transformers export MODEL -o DIR --etrecord` and profile DIR to name graph operators.
"""

import sys

from et_transformers.threads import prefer_single_threaded_blas

prefer_single_threaded_blas()

from et_transformers import ETModelForCausalLM  # noqa: E402
from et_transformers.profiling import profile_generation  # noqa: E402

model = ETModelForCausalLM.from_pretrained(sys.argv[1], warmup=False)
prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"
report = profile_generation(model, prompt, max_new_tokens=16, do_sample=False)

print(f"{'operator':40} {'runs on':8} {'calls':>6} {'prefill ms':>11} {'decode ms':>10}")
for op in report.operators[:15]:
    print(f"{op.name[:40]:40} {op.where:8} {op.calls:>6} {op.ms['prefill']:>11.3f} {op.ms['decode']:>10.3f}")

for phase, seconds in report.phases.items():  # tokenize, prefill, decode model vs Python, detokenize
    print(f"{phase:14} {seconds * 1000:8.2f} ms")

"""Stream tokens as they are produced: pull-based stream_generate, then transformers' TextIteratorStreamer.

Usage: python examples/stream.py MODEL [PROMPT]
"""

import sys
from threading import Thread

from et_transformers.threads import prefer_single_threaded_blas

prefer_single_threaded_blas()

from transformers import TextIteratorStreamer  # noqa: E402

from et_transformers import ETModelForCausalLM  # noqa: E402

model = ETModelForCausalLM.from_pretrained(sys.argv[1])
tok = model.tokenizer
prompt = sys.argv[2] if len(sys.argv) > 2 else "Tell me a story about a robot."
input_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]

for record in model.stream_generate(input_ids, max_new_tokens=48):  # no thread: the loop runs as you pull
    print(record.text, end="", flush=True)  # record.token, .logprob, .generation_tokens_per_s
print()
print(f"[{record.finish_reason}] {model.stats.summary()}", file=sys.stderr)

streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)  # the transformers way
worker = Thread(target=model.generate, args=(input_ids,), kwargs=dict(max_new_tokens=48, streamer=streamer))
worker.start()
for piece in streamer:  # text arrives while generate() runs in the other thread
    print(piece, end="", flush=True)
worker.join()
print()

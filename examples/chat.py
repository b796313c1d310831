"""A multi-turn chat that keeps the KV cache between turns: each turn reads only its new tokens.

Usage: python examples/chat.py MODEL [MESSAGE ...]   (without messages: reads them from stdin)
"""

import sys

from et_transformers.threads import prefer_single_threaded_blas

prefer_single_threaded_blas()

from transformers import TextStreamer  # noqa: E402

from et_transformers import ChatSession, ContextFullError, ETModelForCausalLM  # noqa: E402

model = ETModelForCausalLM.from_pretrained(sys.argv[1])
chat = ChatSession(model, system_prompt="You are a helpful assistant.", max_new_tokens=64)
messages = sys.argv[2:] or (line.strip() for line in sys.stdin)

for message in messages:
    print(f">>> {message}")
    try:
        chat.send(message, streamer=TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True))
    except ContextFullError as e:
        print(f"(context full: {e})")
        chat.reset()
        continue
    extra = chat.stats.extra
    print(f"[TTFT {chat.stats.time_to_first_token * 1000:.0f} ms; read {extra['prefilled_tokens']} new tokens, "
          f"reused {extra['cached_tokens']} from the cache; {extra['context_used']}/{extra['context_size']} used]")

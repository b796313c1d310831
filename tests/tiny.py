"""Tiny models and tokenizers built in code, for fast tests (no Hub, no downloads).

``make_tokenizer`` trains a small byte-level BPE tokenizer on a fixed English text; ``make_model_dir``
writes a random-weight model of any supported family plus that tokenizer to a folder, exactly the
layout of a Hub checkpoint (config.json, safetensors, tokenizer files, generation_config.json).
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A small model runs on a phone. "
    "Paris is the capital of France. Rome is the capital of Italy. Berlin is the capital of "
    "Germany. Once upon a time there was a little robot who liked to count numbers: one, two, "
    "three, four, five, six, seven, eight, nine, ten. The weather today is sunny with a light "
    "breeze. Questions and answers help people learn. What is the capital of Spain? Madrid. "
) * 4

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 256


def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with chat template, BOS/EOS/PAD = specials.

    The alphabet is the corpus's (ASCII) characters only, so every token decodes to whole
    characters; that keeps token-by-token text comparisons (e.g. with ExecuTorch's C++ runner,
    whose callback receives text pieces) exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(**overrides):
    """A 2-layer Llama config with GQA, sized for the tiny tokenizer."""
    from transformers import LlamaConfig

    tok_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
        **tok_ids,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def make_model(config, seed: int = 0):
    """A random-weight ``*ForCausalLM`` for ``config`` (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def make_model_dir(path: str | Path, config=None, seed: int = 0, generation_config: dict | None = None) -> Path:
    """Write a tiny checkpoint (weights, config, tokenizer, generation config) to ``path``."""
    path = Path(path)
    config = config or llama_config()
    model = make_model(config, seed)
    if generation_config is not None:
        for key, value in generation_config.items():
            setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    make_tokenizer(config.vocab_size).save_pretrained(path)
    return path

"""ChatSession: KV-cache reuse across turns gives exactly what generate() on the full history gives."""

from __future__ import annotations

import pytest
import torch

from et_transformers import ChatSession, ContextFullError
from et_transformers.chat import common_prefix_length

GREEDY = dict(max_new_tokens=12, do_sample=False)


def full_history_reply(model, session) -> list[int]:
    """Greedy tokens of generate() on the whole conversation before the last reply (no reuse)."""
    ids = session.render(session.messages[:-1])
    out = model.generate(torch.tensor([ids]), **GREEDY)
    return out[0, len(ids):].tolist()


def test_second_turn_prefills_only_the_new_tokens_and_matches_a_full_prefill(cli_model):
    chat = ChatSession(cli_model, **GREEDY)
    chat.send("What is the capital of France?")
    turn1 = chat.stats.extra
    cached_after_turn1 = list(chat.prompt_cache.tokens)
    chat.send("And of Italy?")
    turn2 = chat.stats.extra
    ids2 = chat.render(chat.messages[:-1])

    assert turn1["cached_tokens"] == 0
    # Everything turn 1 left in the cache is reused; only the new turn's tokens are read.
    assert turn2["cached_tokens"] == len(cached_after_turn1) == common_prefix_length(cached_after_turn1, ids2)
    assert turn2["prefilled_tokens"] == len(ids2) - len(cached_after_turn1) < len(ids2) // 2
    assert chat.stats.prompt_tokens == turn2["prefilled_tokens"]

    assert chat.reply_ids == full_history_reply(cli_model, chat)  # token for token


def test_a_history_that_renders_differently_is_re_read_from_the_first_difference(cli_model):
    chat = ChatSession(cli_model, **GREEDY)
    chat.send("Tell me about the weather.")
    chat.messages[-1]["content"] = "It is sunny."  # the cache no longer matches the rendered history
    cached = list(chat.prompt_cache.tokens)
    chat.send("And tomorrow?")
    ids = chat.render(chat.messages[:-1])
    assert chat.stats.extra["cached_tokens"] == common_prefix_length(cached, ids) < len(cached)
    assert chat.reply_ids == full_history_reply(cli_model, chat)


def test_another_generate_between_turns_invalidates_the_cache(cli_model):
    chat = ChatSession(cli_model, **GREEDY)
    chat.send("Once upon a time")
    cli_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)  # overwrites the KV cache
    chat.send("What happened next?")
    assert chat.stats.extra["cached_tokens"] == 0
    assert chat.reply_ids == full_history_reply(cli_model, chat)


def test_reset_and_context_full(cli_model):
    chat = ChatSession(cli_model, system_prompt="You are terse.", **GREEDY)
    chat.send("Hi")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "You are terse."}]
    chat.send("Hi again")
    assert chat.stats.extra["cached_tokens"] == 0
    before = list(chat.messages)
    with pytest.raises(ContextFullError, match="context holds 128"):
        chat.send("one two three four five six seven eight nine ten " * 20)
    assert chat.messages == before  # a refused message leaves the conversation as it was


def test_replies_are_cut_at_the_end_of_the_context(cli_model):
    chat = ChatSession(cli_model, max_new_tokens=500, do_sample=False)
    chat.send("Paris is the capital of France. " * 8)
    assert chat.stats.extra["context_full"]
    assert chat.context_used == chat.context_size - 1
    with pytest.raises(ContextFullError):
        chat.send("More?")


def test_generator_rejects_a_cached_prefix_that_leaves_nothing_to_prefill(cli_model):
    with pytest.raises(ValueError, match="at least one"):
        cli_model._generator.generate(cli_model.generation_config, torch.tensor([[5, 6]]), cached_prefix=2,
                                      max_new_tokens=2)


def test_stream_equals_send_turn_for_turn(cli_model):
    turns = ("What is the capital of France?", "And of Italy?")
    sent = ChatSession(cli_model, **GREEDY)
    replies = [(sent.send(text), list(sent.reply_ids), dict(sent.stats.extra)) for text in turns]
    streamed = ChatSession(cli_model, **GREEDY)
    for text, (reply, reply_ids, extra) in zip(turns, replies):
        records = list(streamed.stream(text))
        assert [r.token for r in records] == reply_ids == streamed.reply_ids
        assert "".join(r.text for r in records) == reply
        assert streamed.stats.extra == extra  # the same cache reuse
    assert streamed.messages == sent.messages
    assert extra["cached_tokens"] > 0


def test_a_stream_closed_early_keeps_the_reply_so_far(cli_model):
    chat = ChatSession(cli_model, **GREEDY)
    records = chat.stream("Hello there")
    first = [next(records).token for _ in range(3)]
    records.close()
    assert chat.reply_ids == first and chat.messages[-1]["role"] == "assistant"
    chat.send("And then?")
    assert chat.stats.extra["cached_tokens"] > 0
    assert chat.reply_ids == full_history_reply(cli_model, chat)


def test_a_streamed_turn_that_fails_midway_is_not_trusted_by_the_next_turn(cli_model):
    from transformers import LogitsProcessor, LogitsProcessorList

    class FailOnThirdStep(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                raise ValueError("processor failed")
            return scores

    chat = ChatSession(cli_model, **GREEDY)
    chat.send("What is the capital of France?")
    stream = chat.stream("And of Italy?", logits_processor=LogitsProcessorList([FailOnThirdStep()]))
    with pytest.raises(ValueError, match="processor failed"):
        list(stream)
    chat.send("And of Spain?")
    assert chat.stats.extra["cached_tokens"] == 0  # re-read: the broken turn's cache is not reused
    assert chat.reply_ids == full_history_reply(cli_model, chat)

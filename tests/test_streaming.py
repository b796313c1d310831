"""stream_generate(): the same tokens as generate(), honest finish reasons, eager-exact logprobs, safe text."""

from __future__ import annotations


import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

import tiny
from et_transformers.streaming import TextDeltas


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


def encode(tok, text):
    return tok(text, return_tensors="pt").input_ids


def new_tokens(model, ids, **kwargs):
    return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("prompt", tiny.PROMPTS)
def test_greedy_stream_equals_generate(et, tok, prompt):
    ids = encode(tok, prompt)
    kwargs = dict(max_new_tokens=24, do_sample=False)
    records = list(et.stream_generate(ids, **kwargs))
    expected = new_tokens(et, ids, **kwargs)
    assert [r.token for r in records] == expected
    assert "".join(r.text for r in records) == tok.decode(expected, skip_special_tokens=True)
    assert [r.finish_reason for r in records[:-1]] == [None] * (len(records) - 1)
    assert [r.generation_tokens for r in records] == list(range(1, len(records) + 1))


def test_seeded_sampling_stream_equals_generate(et, tok):
    ids = encode(tok, tiny.PROMPTS[1])
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_k=40, top_p=0.95)
    torch.manual_seed(11)
    streamed = [r.token for r in et.stream_generate(ids, **kwargs)]
    torch.manual_seed(11)
    assert streamed == new_tokens(et, ids, **kwargs)
    torch.manual_seed(12)
    assert streamed != [r.token for r in et.stream_generate(ids, **kwargs)]  # the seed matters


# -- finish reasons ------------------------------------------------------------------------------


def last(records):
    records = list(records)
    return records[-1].finish_reason, [r.token for r in records]


def test_finish_reason_length_and_eos(et, tok):
    ids = encode(tok, tiny.PROMPTS[0])
    reason, free = last(et.stream_generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None))
    assert reason == "length" and len(free) == 10
    eos = free[4]
    reason, tokens = last(et.stream_generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos))
    assert reason == "eos" and tokens == free[: free.index(eos) + 1]


def test_finish_reason_stop_string_holds_the_stop_string_back(et, tok):
    ids = encode(tok, tiny.PROMPTS[0])
    free = [r.token for r in et.stream_generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)]
    text = tok.decode(free)
    stop = tok.decode(free[6:8]).strip() or tok.decode(free[6:8])
    records = list(et.stream_generate(ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok))
    assert records[-1].finish_reason == "stop_string"
    assert [r.token for r in records] == new_tokens(et, ids, max_new_tokens=20, do_sample=False,
                                                    stop_strings=[stop], tokenizer=tok)
    streamed = "".join(r.text for r in records)
    assert stop not in streamed and streamed == text[: text.index(stop)]


def test_finish_reason_max_time(et):
    reason, tokens = last(et.stream_generate(torch.tensor([[5, 9, 100]]), max_new_tokens=50, max_time=1e-9))
    assert reason == "max_time" and len(tokens) == 1


def test_finish_reason_custom_criteria(et):
    class StopAtSix(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 6, dtype=torch.bool)

    reason, tokens = last(et.stream_generate(torch.tensor([[5, 9, 100]]), max_new_tokens=20, eos_token_id=None,
                                             stopping_criteria=StoppingCriteriaList([StopAtSix()])))
    assert reason == "criteria" and len(tokens) == 3


def test_finish_reason_context(et):
    et.generation_config = GenerationConfig(max_length=1000, do_sample=False, eos_token_id=None)
    prompt = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="does not fit the program's context"):
        reason, tokens = last(et.stream_generate(prompt))
    assert reason == "context" and len(tokens) == 8


# -- log-probabilities against the eager model ------------------------------------------------


def eager_step_logits(model, ids, tokens):
    """Raw eager logits ``[steps, V]`` that chose each of ``tokens`` after ``ids``."""
    seq = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    return logits[ids.shape[1] - 1 : ids.shape[1] - 1 + len(tokens)]


def test_greedy_logprobs_equal_eager_log_softmax(et, tiny_llama_model, tok):
    ids = encode(tok, tiny.PROMPTS[1])
    records = list(et.stream_generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, top_logprobs=5))
    tokens = [r.token for r in records]
    expected = torch.log_softmax(eager_step_logits(tiny_llama_model, ids, tokens), dim=-1)
    got = torch.tensor([r.logprob for r in records])
    torch.testing.assert_close(got, expected[torch.arange(len(tokens)), tokens], atol=1e-4, rtol=0)
    for record, row in zip(records, expected):
        values, top_ids = torch.topk(row, 5)
        assert [i for i, _ in record.top_logprobs] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in record.top_logprobs]), values, atol=1e-4, rtol=0)


def test_sampled_logprobs_are_those_of_the_processed_scores(et, tiny_llama_model, tok):
    ids = encode(tok, tiny.PROMPTS[0])
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=30, eos_token_id=None)
    torch.manual_seed(3)
    records = list(et.stream_generate(ids, **kwargs))
    tokens = [r.token for r in records]
    (processors,) = et._generator.prepare(et.generation_config, ids, **kwargs).logits_processors
    raw = eager_step_logits(tiny_llama_model, ids, tokens)
    for i, (record, logits) in enumerate(zip(records, raw)):
        seq = torch.cat([ids, torch.tensor([tokens[:i]], dtype=torch.long)], dim=1)
        expected = torch.log_softmax(processors(seq, logits[None]), dim=-1)[0, tokens[i]]
        assert record.logprob == pytest.approx(float(expected), abs=1e-4)
    assert records[0].logprob != pytest.approx(float(torch.log_softmax(raw[0], -1)[tokens[0]]), abs=1e-3)


def test_logprobs_can_be_skipped(et):
    records = list(et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=3, logprobs=False))
    assert [r.logprob for r in records] == [None] * 3 and records[0].top_logprobs is None


# -- bad calls, early close ----------------------------------------------------------------------


def test_a_batch_or_a_bad_top_logprobs_raises_at_the_call(et):
    with pytest.raises(ValueError, match="batch of 2"):
        et.stream_generate(torch.tensor([[5, 9], [6, 7]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="top_logprobs=-1"):
        et.stream_generate(torch.tensor([[5, 9]]), top_logprobs=-1)


def test_a_stream_closed_early_records_its_stats(et):
    stream = et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=20, eos_token_id=None)
    next(stream), next(stream)
    stream.close()
    assert et.stats.generated_tokens == 2 and et.stats.prompt_tokens == 2


def test_running_the_model_while_this_thread_has_a_stream_paused_raises_and_the_stream_goes_on(et):
    prompt = torch.tensor([[5, 9]])
    expected = [r.token for r in et.stream_generate(prompt, max_new_tokens=8, eos_token_id=None)]
    stream = et.stream_generate(prompt, max_new_tokens=8, eos_token_id=None)
    got = [next(stream).token]
    with pytest.raises(RuntimeError, match="paused stream"):
        et.generate(torch.tensor([[7, 8]]), max_new_tokens=2)  # would overwrite the stream's cache
    got += [r.token for r in stream]
    assert got == expected


# -- text deltas -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level BPE whose vocabulary has every byte: non-ASCII characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    raw.train_from_iterator([tiny.CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def test_text_deltas_never_split_a_multibyte_character(byte_tok):
    text = "Café déjà vu: 日本語 and 🤖 robots."
    ids = byte_tok(text).input_ids
    assert len(ids) > len(text.split())  # several tokens per non-ASCII character
    deltas = TextDeltas(byte_tok)
    pieces = [deltas.add(i) for i in ids] + [deltas.finish(False)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back mid-character


def test_text_deltas_hold_back_a_possible_stop_string(byte_tok):
    deltas = TextDeltas(byte_tok, stop_strings=["END"])
    shown = ""
    for i in byte_tok("one two END").input_ids:
        shown += deltas.add(i)
        assert "E" not in shown  # could still be (or is) the stop string
    assert shown + deltas.finish(True) == "one two "
    # A start of a stop string that does not become one is shown once that is known.
    deltas = TextDeltas(byte_tok, stop_strings=["END"])
    ids = byte_tok("one EN two").input_ids
    assert "".join(deltas.add(i) for i in ids) + deltas.finish(False) == "one EN two"


@pytest.mark.parametrize("option", [dict(output_scores=True, return_dict_in_generate=True), dict(streamer=object())],
                         ids=["output_scores", "streamer"])
def test_generate_only_options_are_refused_by_a_stream(et, option):
    with pytest.raises(ValueError, match="generate()"):
        et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=3, **option)


def test_generate_computes_no_logprobs(et, monkeypatch):
    calls = []
    for name in ("log_softmax", "logsumexp"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    et.generate(torch.tensor([[5, 9]]), max_new_tokens=6, eos_token_id=None)
    list(et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=6, logprobs=False))
    assert calls == []
    list(et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=6, eos_token_id=None))
    assert calls == ["logsumexp"] * 6  # the check can see them

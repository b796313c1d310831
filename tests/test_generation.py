"""generate(): transformers' semantics, token for token, on the fp32 tiny Llama export."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

import tiny


@pytest.fixture(scope="module")
def batch():
    tok = tiny.make_tokenizer()
    tok.padding_side = "left"
    return tok, tok(tiny.PROMPTS, return_tensors="pt", padding=True)


def eager_generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(**kwargs)


def test_batch_greedy_matches_transformers(et, tiny_llama_model, batch):
    tok, enc = batch
    expected = eager_generate(tiny_llama_model, **enc, max_new_tokens=24, do_sample=False)
    assert torch.equal(et.generate(**enc, max_new_tokens=24, do_sample=False), expected)


def test_batch_greedy_with_eos_in_range_pads_like_transformers(et, tiny_llama_model, batch):
    tok, enc = batch
    free = eager_generate(tiny_llama_model, **enc, max_new_tokens=24, do_sample=False)
    prompt_len = enc.input_ids.shape[1]
    eos = [int(free[0, prompt_len + 4]), int(free[2, prompt_len + 9])]  # rows 0 and 2 stop early
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = eager_generate(tiny_llama_model, **enc, **kwargs)
    got = et.generate(**enc, **kwargs)
    assert torch.equal(got, expected)
    assert got.shape[1] < prompt_len + 24 or (got[0, prompt_len + 5:] == 0).all()


def test_attention_mask_inferred_from_pad_token(et, tiny_llama_model, batch):
    _, enc = batch
    expected = eager_generate(tiny_llama_model, **enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(et.generate(enc.input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


def test_processors_are_transformers_own_and_transform_scores_identically(et, tiny_llama_model):
    ids = torch.tensor([[5, 9, 100, 33, 100]])
    options = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                   min_new_tokens=3, max_new_tokens=10)
    plan = et._generator.prepare(et.generation_config, ids, **options)
    gc, _ = tiny_llama_model._prepare_generation_config(None, **options)  # transformers' own path
    tiny_llama_model._prepare_special_tokens(gc, False, device="cpu")
    gc = tiny_llama_model._prepare_generated_length(gc, False, True, "input_ids", ids.shape[1], ids)
    reference = tiny_llama_model._get_logits_processor(
        gc, input_ids_seq_length=ids.shape[1], logits_processor=LogitsProcessorList(), device="cpu",
        model_kwargs={"attention_mask": torch.ones_like(ids)},
    )
    (processors,) = plan.logits_processors
    assert [type(p) for p in processors] == [type(p) for p in reference]
    scores = torch.randn(1, tiny.VOCAB_SIZE, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(processors(ids, scores.clone()), reference(ids, scores.clone()))


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "tiny_top_p"])
def test_degenerate_sampling_equals_greedy(et, batch, options):
    _, enc = batch
    greedy = et.generate(**enc, max_new_tokens=16, do_sample=False)
    torch.manual_seed(123)
    assert torch.equal(et.generate(**enc, max_new_tokens=16, do_sample=True, **options), greedy)


def test_seeded_sampling_repeats_exactly(et, batch):
    _, enc = batch
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(et.generate(**enc, max_new_tokens=16, do_sample=True, temperature=1.5))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_min_new_tokens_and_repetition_penalty_match_transformers(et, tiny_llama_model, batch):
    _, enc = batch
    free = eager_generate(tiny_llama_model, **enc, max_new_tokens=12, do_sample=False)
    eos = int(free[0, enc.input_ids.shape[1] + 1])
    kwargs = dict(max_new_tokens=12, min_new_tokens=6, eos_token_id=eos, repetition_penalty=1.5, do_sample=False)
    assert torch.equal(et.generate(**enc, **kwargs), eager_generate(tiny_llama_model, **enc, **kwargs))


def test_max_length_counts_the_prompt(et, tiny_llama_model, batch):
    _, enc = batch
    kwargs = dict(max_length=enc.input_ids.shape[1] + 5, do_sample=False)
    out = et.generate(**enc, **kwargs)
    assert torch.equal(out, eager_generate(tiny_llama_model, **enc, **kwargs))
    assert out.shape[1] == enc.input_ids.shape[1] + 5


def test_stop_strings_match_transformers(et, tiny_llama_model):
    tok = tiny.make_tokenizer()
    ids = tok("Paris is the capital", return_tensors="pt").input_ids
    free = eager_generate(tiny_llama_model, input_ids=ids, max_new_tokens=20, do_sample=False)
    stop = tok.decode(free[0, ids.shape[1] + 6 : ids.shape[1] + 8])
    kwargs = dict(max_new_tokens=20, do_sample=False, stop_strings=[stop])
    expected = eager_generate(tiny_llama_model, input_ids=ids, tokenizer=tok, **kwargs)
    assert torch.equal(et.generate(ids, tokenizer=tok, **kwargs), expected)
    assert expected.shape[1] < ids.shape[1] + 20


def test_max_time_stops_after_the_first_token(et):
    out = et.generate(torch.tensor([[5, 9, 100]]), max_new_tokens=50, max_time=1e-9, do_sample=False)
    assert out.shape[1] == 4


def test_custom_processor_and_criteria_are_called(et):
    calls = {"proc": 0, "stop": 0}

    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            calls["proc"] += 1
            scores[:, 50] = -float("inf")
            return scores

    class StopAfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            calls["stop"] += 1
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 6, dtype=torch.bool)

    out = et.generate(
        torch.tensor([[5, 9, 100]]), max_new_tokens=20, do_sample=False,
        logits_processor=LogitsProcessorList([BanToken()]), stopping_criteria=StoppingCriteriaList([StopAfterThree()]),
    )
    assert out.shape[1] == 6 and 50 not in out[0, 3:].tolist()
    assert calls == {"proc": 3, "stop": 3}


def test_logits_a_custom_processor_keeps_stay_valid(et):
    """The decode loop reads the program's logits in place only when nothing can keep them; a
    user's processor that stores every step's scores gets tensors that stay what they were."""

    class Keep(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(scores)
            return scores

    keep, prompt = Keep(), torch.tensor([[5, 9, 100, 33]])
    out = et.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                      logits_processor=LogitsProcessorList([keep]))
    seen = [scores.clone() for scores in keep.seen]  # before the program runs again
    assert len(seen) == 6
    for i, scores in enumerate(seen):  # step i's logits, recomputed by a fresh prefill
        expected = et.program.forward(out[:, : prompt.shape[1] + i], 0)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_decode_without_copy_reads_the_programs_own_output(et):
    et.program.forward(torch.tensor([[5, 9, 100]]), 0)
    first = et.program.decode(7, 3, copy=False)
    kept = first.clone()
    second = et.program.decode(8, 4, copy=False)
    assert first.data_ptr() == second.data_ptr() and not torch.equal(first, kept)  # overwritten
    assert torch.equal(et.program.decode(7, 3), kept)  # copy=True: a tensor of its own


def test_iterator_streamer_yields_the_generated_text(et):
    tok = tiny.make_tokenizer()
    ids = tok("Paris is", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(out=et.generate(ids, streamer=streamer, max_new_tokens=12, do_sample=False))
    )
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == tok.decode(result["out"][0, ids.shape[1]:])


def test_model_generation_config_gives_the_defaults(et, tiny_llama_model):
    ids = torch.tensor([[5, 9, 100]])
    et.generation_config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert et.generate(ids).shape[1] == 8
    # Explicit keywords override the model's defaults, as in transformers.
    assert et.generate(ids, max_new_tokens=2).shape[1] == 5


def test_stats_are_measured(et, batch):
    _, enc = batch
    et.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=None)
    s = et.stats
    assert s.prompt_tokens == int(enc.attention_mask.sum()) and s.generated_tokens == 30
    assert s.time_to_first_token > 0 and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert s.load_time > 0 and s.peak_rss_bytes > 0


# -- bad input: ValueError naming the value and the limit, before the program runs ----------------


@pytest.fixture()
def no_runtime(et, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the program must not run for bad input")

    monkeypatch.setattr(et.program, "forward", forbidden)
    return et


@pytest.mark.parametrize(
    "ids, kwargs, fragment",
    [
        (torch.randint(3, 200, (1, 130)), {}, "130 tokens"),
        (torch.tensor([[5, 999]]), {}, "token id 999"),
        (torch.tensor([[5, -1]]), {}, "token id -1"),
        (torch.zeros(1, 0, dtype=torch.long), {}, "empty"),
        (torch.tensor([[5, 9]]), dict(do_sample=True, temperature=0.0), "temperature=0.0"),
        (torch.tensor([[5, 9]]), dict(do_sample=True, temperature=-1.0), "temperature=-1.0"),
        (torch.tensor([[5, 9]]), dict(do_sample=True, top_p=1.5), "top_p=1.5"),
        (torch.tensor([[5, 9]]), dict(do_sample=True, top_p=0.0), "top_p=0.0"),
        (torch.tensor([[5, 9]]), dict(max_new_tokens=500), "max_new_tokens=500"),
        (torch.tensor([[5, 9]]), dict(max_new_tokens=5, tempreature=0.5), "tempreature"),
        (torch.tensor([[5, 9]]), dict(num_beams=4), "num_beams=4"),
    ],
)
def test_bad_input_raises_before_running(no_runtime, ids, kwargs, fragment):
    with pytest.raises(ValueError) as err:
        no_runtime.generate(ids, **kwargs)
    assert fragment in str(err.value)


def test_overflow_message_names_the_limit(no_runtime):
    with pytest.raises(ValueError, match=r"at most 126 new tokens fit"):
        no_runtime.generate(torch.tensor([[5, 9]]), max_new_tokens=500)


def test_right_padding_is_refused(no_runtime):
    with pytest.raises(ValueError, match="left padding"):
        no_runtime.generate(torch.tensor([[5, 9, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_reaching_the_end_of_the_context_stops_with_a_warning(et):
    et.generation_config = GenerationConfig(max_length=1000, do_sample=False, eos_token_id=None)
    prompt = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="end of the program's context"):
        out = et.generate(prompt)
    assert out.shape[1] == 128


# -- return_dict_in_generate: scores and logits as eager transformers fills them -------------------


def assert_same_steps(got, expected):
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape and g.dtype == e.dtype, step
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=False, repetition_penalty=1.5, min_new_tokens=4, suppress_tokens=[7])],
    ids=["plain", "processors"],
)
def test_scores_and_logits_match_eager_transformers(et, tiny_llama_model, options):
    ids = torch.tensor([[5, 9, 100, 33, 100]])
    kwargs = dict(max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, **options)
    expected = eager_generate(tiny_llama_model, input_ids=ids, **kwargs)
    got = et.generate(ids, **kwargs)
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences)
    assert_same_steps(got.scores, expected.scores)
    assert_same_steps(got.logits, expected.logits)
    if options.get("repetition_penalty"):
        assert not torch.equal(got.scores[0], got.logits[0])  # the processors ran on the scores


def test_batch_scores_of_stopped_rows_match_eager_transformers(et, tiny_llama_model, batch):
    """Rows that stop early keep running with pad fed back in transformers; their steps match too."""
    _, enc = batch
    free = eager_generate(tiny_llama_model, **enc, max_new_tokens=12, do_sample=False)
    prompt_len = enc.input_ids.shape[1]
    eos = [int(free[0, prompt_len + 3]), int(free[2, prompt_len + 6])]
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected = eager_generate(tiny_llama_model, **enc, **kwargs)
    got = et.generate(**enc, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert (got.sequences[:, -1] == 0).any()  # some row did stop early
    assert_same_steps(got.scores, expected.scores)
    assert_same_steps(got.logits, expected.logits)


def test_return_dict_without_scores(et):
    out = et.generate(torch.tensor([[5, 9]]), max_new_tokens=3, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 5) and out.scores is None and out.logits is None


def test_without_an_eos_criterion_a_stopped_row_goes_on_as_in_transformers(et, tiny_llama_model, batch):
    """transformers pads a stopped row only when an EOS criterion exists; else the row keeps choosing."""
    _, enc = batch
    free = eager_generate(tiny_llama_model, **enc, max_new_tokens=10, do_sample=False, eos_token_id=None)
    stop_token = int(free[1, enc.input_ids.shape[1] + 2])

    class StopAfter(StoppingCriteria):  # per row: done once the row has produced stop_token
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, enc.input_ids.shape[1]:] == stop_token).any(dim=-1)

    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                  output_scores=True)
    criteria = lambda: StoppingCriteriaList([StopAfter()])  # noqa: E731
    expected = eager_generate(tiny_llama_model, **enc, stopping_criteria=criteria(), **kwargs)
    got = et.generate(**enc, stopping_criteria=criteria(), **kwargs)
    # Row 1 stopped at its third token, the batch went on, and transformers did not pad row 1.
    assert expected.sequences.shape[1] > enc.input_ids.shape[1] + 3
    assert torch.equal(expected.sequences, free[:, : expected.sequences.shape[1]])
    assert torch.equal(got.sequences, expected.sequences)
    assert_same_steps(got.scores, expected.scores)
    plain = et.generate(**enc, stopping_criteria=criteria(), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(plain, expected.sequences)

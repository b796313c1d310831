"""Assisted generation: prompt lookup and draft models, verified in one program call per draft.

Greedy output must be plain greedy output, and sampled output the target's distribution, whatever
the draft: perfect, always wrong, or absent. Stops inside an accepted draft stop there.
"""

from __future__ import annotations

import collections

import pytest
import torch

from et_transformers import ETModelForCausalLM, ExportConfig, InvalidConfigError
from et_transformers.config import recipe
from et_transformers import assisted

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]])


@pytest.fixture(scope="module")
def verifying_export(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama exported (fp32) with ``verify_tokens=8``."""
    from et_transformers.export import Exporter

    out = tmp_path_factory.mktemp("verify8")
    Exporter.from_pretrained(tiny_llama_dir, ExportConfig(max_seq_len=128, verify_tokens=8), progress=False).run(out)
    return out


@pytest.fixture(scope="module")
def et(verifying_export):
    """The target: the tiny Llama's verifying program."""
    return ETModelForCausalLM.from_pretrained(verifying_export)


@pytest.fixture(scope="module")
def draft(verifying_export):
    """A second load of the target's program: its own KV cache, the target's weights."""
    return ETModelForCausalLM.from_pretrained(verifying_export)


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """A tiny Llama with other random weights (same tokenizer): a draft that is often wrong."""
    import tiny

    from et_transformers.export import Exporter

    folder = tmp_path_factory.mktemp("other-draft")
    source = tiny.make_model_dir(folder / "source", seed=1)
    Exporter.from_pretrained(source, ExportConfig(max_seq_len=128), progress=False).run(folder / "program")
    return ETModelForCausalLM.from_pretrained(folder / "program")


def test_program_verifies_drafts(et):
    meta = et.program.metadata
    assert meta.verify_tokens == 8 and not meta.all_logits
    ids = PROMPT[0].tolist()
    prefill_rows = et.program._run(PROMPT, 0)[0]  # the last 8 positions
    assert prefill_rows.shape == (8, meta.vocab_size)
    rows = et.program.verify(ids[-3:], len(ids) - 3)  # the same positions again, three at a time
    torch.testing.assert_close(rows, prefill_rows[-3:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="verify_tokens=8"):
        et.program.verify(list(range(9)), 0)


def test_prompt_lookup_greedy_equals_plain(et):
    plain = et.generate(PROMPT, max_new_tokens=40, do_sample=False)
    got = et.generate(PROMPT, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=5)
    assert torch.equal(got, plain)
    assert et.stats.drafted_tokens > 0
    assert "drafted" in et.stats.summary()


def test_draft_model_greedy_equals_plain(et, draft):
    plain = et.generate(PROMPT, max_new_tokens=40, do_sample=False)
    got = et.generate(PROMPT, max_new_tokens=40, do_sample=False, assistant_model=draft)
    assert torch.equal(got, plain)
    # the draft has the target's weights: nearly everything it drafts is kept
    assert et.stats.accepted_tokens >= 0.9 * et.stats.drafted_tokens > 0
    assert et.stats.acceptance_rate == et.stats.accepted_tokens / et.stats.drafted_tokens


def test_heuristic_schedule_and_draft_lengths(et, draft):
    plain = et.generate(PROMPT, max_new_tokens=30, do_sample=False)
    for num, schedule in ((1, "constant"), (3, "heuristic"), (7, "heuristic_transient")):
        got = et.generate(PROMPT, max_new_tokens=30, do_sample=False, assistant_model=draft,
                          num_assistant_tokens=num, num_assistant_tokens_schedule=schedule)
        assert torch.equal(got, plain), (num, schedule)


def test_always_wrong_drafts_are_all_rejected_and_overwritten(et, monkeypatch):
    """Every drafted token is wrong: each verify call writes them into the KV cache, and the next
    call (at the position of the first rejected one) writes over them. Output stays plain greedy."""
    plain = et.generate(PROMPT, max_new_tokens=30, do_sample=False)[0].tolist()
    vocab = et.program.metadata.vocab_size

    def wrong(self, ids, limit):
        n = min(self.num_tokens, limit)
        return [(plain[len(ids) + i] + 1) % vocab for i in range(n) if len(ids) + i < len(plain)]

    monkeypatch.setattr(assisted.PromptLookup, "propose", wrong)
    got = et.generate(PROMPT, max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=7)
    assert got[0].tolist() == plain
    assert et.stats.drafted_tokens > 20 and et.stats.accepted_tokens == 0


def test_prompt_lookup_sampling_is_token_identical_with_a_seed(et):
    """Prompt lookup draws no random numbers: a seeded sampled call gives the unassisted tokens."""
    torch.manual_seed(3)
    plain = et.generate(PROMPT, max_new_tokens=30, do_sample=True, top_k=8, temperature=0.9)
    torch.manual_seed(3)
    got = et.generate(PROMPT, max_new_tokens=30, do_sample=True, top_k=8, temperature=0.9,
                      prompt_lookup_num_tokens=4)
    assert torch.equal(got, plain)


def _second_tokens(et, prompt, runs, **kwargs):
    """Counts of the second new token over ``runs`` sampled calls (full support: no top-k, so a
    draft from another model overlaps the target's distribution)."""
    counts, drafted, accepted = collections.Counter(), 0, 0
    for _ in range(runs):
        counts[int(et.generate(prompt, max_new_tokens=2, do_sample=True, top_k=0, temperature=2.0,
                               **kwargs)[0, -1])] += 1
        drafted += et.stats.drafted_tokens
        accepted += et.stats.accepted_tokens
    return counts, drafted, accepted


def test_draft_sampling_follows_the_target_distribution(et, other_draft):
    """The second new token is decided by speculative sampling's test on a draft from another
    model (q != p): it must still have the target's distribution."""
    prompt = PROMPT[:, :5]
    torch.manual_seed(0)
    runs = 500
    plain, _, _ = _second_tokens(et, prompt, runs)
    got, drafted, accepted = _second_tokens(et, prompt, runs, assistant_model=other_draft, num_assistant_tokens=1)
    assert drafted >= 0.95 * runs  # fewer only when the first token was an end of sequence
    assert 0.05 * drafted < accepted < 0.95 * drafted  # both outcomes of the test happen
    # total variation over the 8 commonest tokens and the rest (sampling noise ~0.05 at 500 runs)
    top = [k for k, _ in plain.most_common(8)]
    buckets = [(plain[k], got[k]) for k in top] + [
        (runs - sum(plain[k] for k in top), runs - sum(got[k] for k in top))]
    tv = sum(abs(a - b) for a, b in buckets) / (2 * runs)
    assert tv < 0.12, f"total variation {tv:.3f} between assisted and plain samples"


def test_sampled_draft_with_the_targets_weights_is_almost_always_kept(et, draft):
    """p == q: speculative sampling accepts every draft (comparing two samples would keep far fewer)."""
    _, drafted, accepted = _second_tokens(et, PROMPT[:, :5], 100, assistant_model=draft, num_assistant_tokens=1)
    assert drafted >= 95 and accepted >= 0.97 * drafted


def test_speculative_choice_rule():
    """Against the exact distribution: P(token) = p for a fixed draft distribution q."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.7, 0.1])
    scores = p.log().unsqueeze(0)
    torch.manual_seed(0)
    n = 20000
    counts = collections.Counter()
    for _ in range(n):
        d = int(torch.multinomial(q, 1))
        counts[assisted.speculative_choice(scores, d, q)] += 1
    for token in range(3):
        assert abs(counts[token] / n - float(p[token])) < 0.015, (token, counts)


@pytest.mark.parametrize("cut", [3, 4, 5, 6])
def test_a_stop_inside_an_accepted_draft_stops_there(et, draft, cut):
    plain = et.generate(PROMPT, max_new_tokens=cut, do_sample=False)
    got = et.generate(PROMPT, max_new_tokens=cut, do_sample=False, assistant_model=draft, num_assistant_tokens=7)
    assert torch.equal(got, plain)
    # an EOS criterion on a token inside the draft stops there too
    eos = int(plain[0, -1])
    plain_eos = et.generate(PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    got_eos = et.generate(PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=eos, assistant_model=draft)
    assert torch.equal(got_eos, plain_eos)


def test_streaming_with_prompt_lookup_equals_generate(et):
    plain = et.generate(PROMPT, max_new_tokens=25, do_sample=False)[0, PROMPT.shape[-1]:].tolist()
    tokens = [r.token for r in et.stream_generate(PROMPT, max_new_tokens=25, do_sample=False, prompt_lookup_num_tokens=5)]
    assert tokens == plain


def test_bad_assistance_options_raise_before_running(et, draft):
    with pytest.raises(ValueError, match=r"prompt_lookup_num_tokens=9 .* at most 7"):
        et.generate(PROMPT, max_new_tokens=3, prompt_lookup_num_tokens=9)
    with pytest.raises(ValueError, match="num_assistant_tokens=12"):
        et.generate(PROMPT, max_new_tokens=3, assistant_model=draft, num_assistant_tokens=12)
    with pytest.raises(ValueError, match="not both"):
        et.generate(PROMPT, max_new_tokens=3, assistant_model=draft, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="itself"):
        et.generate(PROMPT, max_new_tokens=3, assistant_model=et)
    with pytest.raises(ValueError, match="ETModelForCausalLM"):
        et.generate(PROMPT, max_new_tokens=3, assistant_model=object())
    with pytest.raises(ValueError, match="one prompt at a time"):
        et.generate(torch.cat([PROMPT, PROMPT]), max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        et.generate(PROMPT, max_new_tokens=3, assistant_model=draft, num_assistant_tokens_schedule="fast")


def test_program_without_verify_rows_refuses_assistance(tiny_llama_et):
    assert tiny_llama_et.program.metadata.verify_tokens == 1  # the default export
    with pytest.raises(ValueError, match=r"verify_tokens=8"):
        tiny_llama_et.generate(PROMPT, max_new_tokens=3, prompt_lookup_num_tokens=2)


def test_short_prompts_verify_and_prefill(et):
    """Prompts shorter than verify_tokens: the padding rows never reach generation."""
    for n in (1, 2, 5):
        prompt = PROMPT[:, :n]
        plain = et.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(et.generate(prompt, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3), plain)


def test_verify_tokens_config():
    assert ExportConfig().verify_tokens == 1
    assert ExportConfig(verify_tokens=8).verify_tokens == 8
    assert ExportConfig(logits="all").verify_tokens is None
    with pytest.raises(InvalidConfigError, match="verify_tokens=0"):
        ExportConfig(verify_tokens=0)
    with pytest.raises(InvalidConfigError, match="no effect with logits='all'"):
        ExportConfig(logits="all", verify_tokens=4)
    # a manifest written before verify_tokens existed describes a last-position-only program
    old = ExportConfig().to_dict()
    del old["verify_tokens"]
    assert ExportConfig.from_dict(old).verify_tokens == 1
    old_q4 = recipe("xnnpack-q4_0").to_dict()
    del old_q4["verify_tokens"]
    assert ExportConfig.from_dict(old_q4).verify_tokens == 1


def test_a_head_on_our_kernel_verifies_drafts_by_default():
    """Its head returns min(S, k) rows, so k = 8 costs plain decoding nothing: the default there."""
    for name in ("xnnpack-q4_0", "xnnpack-8da4w-own"):
        assert recipe(name).verify_tokens == 8, name
        assert recipe(name, verify_tokens=1).verify_tokens == 1, name  # still the caller's to choose
    assert ExportConfig(qlinear="q4_0").verify_tokens == 8
    # an XNNPACK head computes k rows on every decode step: one row unless asked
    for name in ("xnnpack-q4_0-head8", "xnnpack-8da4w", "xnnpack-8da4w-pure", "xnnpack-fp32"):
        assert recipe(name).verify_tokens == 1, name
    assert ExportConfig(qlinear="q4_0", qhead="8da8w").verify_tokens == 1
    # replace() resolves the default again from what the caller asked for
    assert recipe("xnnpack-q4_0").replace(qhead="8da8w").verify_tokens == 1


def test_chat_session_takes_assistance(et, draft):
    from et_transformers import ChatSession

    plain = ChatSession(et, max_new_tokens=12, do_sample=False)
    assisted_chat = ChatSession(et, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    drafted_chat = ChatSession(et, max_new_tokens=12, do_sample=False, assistant_model=draft)
    for text in ("Paris is the capital of", "And Rome?"):
        expected = plain.send(text)
        assert assisted_chat.send(text) == expected
        assert drafted_chat.send(text) == expected


def test_prompt_lookup_adapts_its_draft_length():
    """Drafts shrink to one more token than the last draft kept, grow by two (up to
    ``prompt_lookup_num_tokens``) after a fully kept one, and after a first-token miss a one-token
    match no longer drafts (only a two-token one does)."""
    lookup = assisted.PromptLookup(num_tokens=6, max_ngram=2)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]  # "1 2" seen before: the draft is what followed it
    assert lookup.propose(ids, limit=10) == [3, 4, 5, 6, 7, 8]
    lookup.feedback(drafted=6, accepted=2)
    assert lookup.propose(ids, limit=10) == [3, 4, 5]
    lookup.feedback(drafted=3, accepted=3)
    assert lookup.length == 5
    lookup.feedback(drafted=5, accepted=5)
    assert lookup.length == 6  # capped
    lookup.feedback(drafted=6, accepted=0)
    assert lookup.propose(ids, limit=10) == [3]  # a two-token match still drafts, one token long
    assert lookup.propose([1, 2, 3, 4, 9, 3], limit=10) == []  # only "3" matches: not enough now
    lookup.feedback(drafted=1, accepted=1)
    assert lookup.propose([1, 2, 3, 4, 9, 3], limit=10) == [4, 9, 3]


def test_stop_strings_processors_criteria_and_max_time_behave_as_without_assistance(et, draft):
    """Each verified row sees what a plain decode step would: stop strings end inside a kept draft
    (the draft is the target's own program, so every draft is kept), history-dependent processors
    see the tokens up to their row, a custom criterion stops at its token, max_time after the first."""
    import tiny
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok = tiny.make_tokenizer()
    n = PROMPT.shape[-1]
    assists = [dict(assistant_model=draft, num_assistant_tokens=7), dict(prompt_lookup_num_tokens=5)]

    free = et.generate(PROMPT, max_new_tokens=24, do_sample=False)
    stop = tok.decode(free[0, n + 9 : n + 11])
    plain = et.generate(PROMPT, max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert n < plain.shape[1] < n + 24  # the stop string ended it early
    for assist in assists:
        got = et.generate(PROMPT, max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tok, **assist)
        assert torch.equal(got, plain), assist
    stats = et.stats
    assert stats.drafted_tokens > 0

    for processing in (dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=1)):
        plain = et.generate(PROMPT, max_new_tokens=24, do_sample=False, **processing)
        assert not torch.equal(plain, free), processing  # the processor changed the output
        for assist in assists:
            got = et.generate(PROMPT, max_new_tokens=24, do_sample=False, **processing, **assist)
            assert torch.equal(got, plain), (processing, assist)

    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length, self.calls = length, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.length, dtype=torch.bool)

    for assist in assists:
        criterion = StopAfter(n + 6)
        got = et.generate(PROMPT, max_new_tokens=24, do_sample=False, stopping_criteria=StoppingCriteriaList([criterion]),
                          **assist)
        assert torch.equal(got, free[:, : n + 6]), assist
        assert criterion.calls == 6, assist  # once per token, as without assistance
        timed = et.generate(PROMPT, max_new_tokens=24, do_sample=False, max_time=1e-9, **assist)
        assert timed.shape[1] == n + 1, assist

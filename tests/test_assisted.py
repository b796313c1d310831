"""Assisted generation: prompt lookup and draft models, verified in one program call per draft.

Greedy output must be plain greedy output, and sampled output the target's distribution, whatever
the draft: perfect, always wrong, or absent. Stops inside an accepted draft stop there.
"""

from __future__ import annotations

import collections

import pytest
import torch

from et_transformers import ETModelForCausalLM, ExportConfig, InvalidConfigError
from et_transformers import assisted

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]])


@pytest.fixture(scope="module")
def draft(tiny_llama_export):
    """A second load of the tiny Llama's program: its own KV cache, the target's weights."""
    return ETModelForCausalLM.from_pretrained(tiny_llama_export.output_dir)


def test_program_verifies_drafts(et):
    meta = et.program.metadata
    assert meta.verify_tokens == 8 and not meta.all_logits
    ids = PROMPT[0].tolist()
    prefill_rows = et.program._run(PROMPT, 0)[0]  # the last min(S, 8) positions
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


def test_draft_sampling_follows_the_target_distribution(et, draft):
    """The second new token (decided by verifying a draft) has the target's distribution."""
    kwargs = dict(max_new_tokens=2, do_sample=True, top_k=6, temperature=1.5)
    prompt = PROMPT[:, :5]
    torch.manual_seed(0)
    runs = 400
    plain = collections.Counter(tuple(et.generate(prompt, **kwargs)[0, -2:].tolist()) for _ in range(runs))
    accepted = drafted = 0
    assisted_counts = collections.Counter()
    for _ in range(runs):
        assisted_counts[tuple(et.generate(prompt, assistant_model=draft, num_assistant_tokens=1, **kwargs)[0, -2:].tolist())] += 1
        accepted += et.stats.accepted_tokens
        drafted += et.stats.drafted_tokens
    assert drafted == runs and 0 < accepted < runs  # both outcomes of the acceptance test happen
    keys = set(plain) | set(assisted_counts)
    tv = sum(abs(plain[k] - assisted_counts[k]) for k in keys) / (2 * runs)
    assert tv < 0.15, f"total variation {tv:.3f} between assisted and plain samples"


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


def test_verify_tokens_config():
    assert ExportConfig().verify_tokens == 8
    assert ExportConfig(verify_tokens=1).verify_tokens == 1
    assert ExportConfig(logits="all").verify_tokens is None
    with pytest.raises(InvalidConfigError, match="verify_tokens=0"):
        ExportConfig(verify_tokens=0)
    with pytest.raises(InvalidConfigError, match="no effect with logits='all'"):
        ExportConfig(logits="all", verify_tokens=4)
    # a manifest written before verify_tokens existed describes a last-position-only program
    old = ExportConfig().to_dict()
    del old["verify_tokens"]
    assert ExportConfig.from_dict(old).verify_tokens == 1


def test_chat_session_takes_assistance(et, draft):
    from et_transformers import ChatSession

    plain = ChatSession(et, max_new_tokens=12, do_sample=False)
    assisted_chat = ChatSession(et, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    drafted_chat = ChatSession(et, max_new_tokens=12, do_sample=False, assistant_model=draft)
    for text in ("Paris is the capital of", "And Rome?"):
        expected = plain.send(text)
        assert assisted_chat.send(text) == expected
        assert drafted_chat.send(text) == expected

"""Architecture coverage: one golden test per family (tiny random weights, fp32 XNNPACK export,
greedy tokens identical to eager transformers), proof that the prompts exercise each family's
distinctive parts, and the table's refusals.

The golden prompts: 12 tokens (the 24 new tokens carry the sequence past the sliding window and
past the rope-scaled configs' original context during generation) and 40 tokens (the prompt
itself is past both). ``benchmarks/support_table.py`` turns this file's results into the README's
support table.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tiny
from et_transformers import ETModelForCausalLM, InvalidConfigError, UnsupportedModelError
from et_transformers.architectures import (
    MODEL_TYPE_ALIASES,
    SUPPORTED_MODEL_TYPES,
    resolve_architecture,
)
from et_transformers.config import recipe
from et_transformers.export import Exporter, export_to_pte

MAX_SEQ_LEN = 64
NEW_TOKENS = 24
PROMPT_LENGTHS = (12, 40)  # 40 + 24 = MAX_SEQ_LEN


def prompt_of(length: int) -> torch.Tensor:
    """The golden prompt of ``length`` random ids (seeded by the length)."""
    torch.manual_seed(length)
    return torch.randint(3, tiny.VOCAB_SIZE, (1, length))


def eager_greedy(model, prompt: torch.Tensor) -> list[int]:
    """Transformers' greedy continuation of ``prompt`` (EOS ignored, so always ``NEW_TOKENS``)."""
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return out[0, prompt.shape[-1]:].tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(case)``: the tiny model of ``case`` eager, and exported (fp32, XNNPACK) then
    loaded from its .pte; each case is exported once per module."""
    done: dict[str, tuple[torch.nn.Module, ETModelForCausalLM]] = {}

    def export(case: str):
        if case not in done:
            folder = tmp_path_factory.mktemp(case)
            source = tiny.make_model_dir(folder / "source", tiny.FAMILY_CASES[case]())
            # verify_tokens: the head computes the last 8 positions (prompt lookup verifies drafts)
            export_config = recipe("xnnpack-fp32", max_seq_len=MAX_SEQ_LEN, verify_tokens=8)
            Exporter.from_pretrained(source, export_config, progress=False).run(folder / "program")
            model = tiny.make_model(tiny.FAMILY_CASES[case]())
            done[case] = model, ETModelForCausalLM.from_pretrained(folder / "program")
        return done[case]

    return export


@pytest.mark.parametrize("case", list(tiny.FAMILY_CASES))
def test_prompt_lookup_greedy_matches_transformers(case, exported):
    """Assisted by prompt lookup (drafts verified in one call), greedy output is eager greedy's."""
    model, et_model = exported(case)
    prompt = prompt_of(10).repeat(1, 3)  # repeats: the lookup finds drafts
    expected = eager_greedy(model, prompt)
    got = et_model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, prompt_lookup_num_tokens=4
    )
    assert got[0, prompt.shape[-1]:].tolist() == expected, case
    assert et_model.stats.drafted_tokens > 0, f"{case}: nothing was drafted; the test proves nothing"


@pytest.fixture(scope="module")
def wrong_draft(tmp_path_factory):
    """A tiny Llama with other random weights (the families' vocabulary): a draft that is mostly
    wrong for every family's target."""
    folder = tmp_path_factory.mktemp("draft")
    source = tiny.make_model_dir(folder / "source", seed=7)
    Exporter.from_pretrained(source, recipe("xnnpack-fp32", max_seq_len=MAX_SEQ_LEN), progress=False).run(
        folder / "program")
    return ETModelForCausalLM.from_pretrained(folder / "program")


@pytest.mark.parametrize("case", list(tiny.FAMILY_CASES))
def test_draft_model_greedy_matches_transformers(case, exported, wrong_draft):
    """Assisted by a draft model of another family and weights, greedy output is eager greedy's:
    rejected drafts are written over, accepted ones are the target's own argmax."""
    model, et_model = exported(case)
    prompt = prompt_of(12)
    expected = eager_greedy(model, prompt)
    got = et_model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, assistant_model=wrong_draft,
        num_assistant_tokens=4,
    )
    assert got[0, prompt.shape[-1]:].tolist() == expected, case
    stats = et_model.stats
    assert stats.drafted_tokens > 0, f"{case}: nothing was drafted; the test proves nothing"
    assert stats.accepted_tokens < stats.drafted_tokens, f"{case}: every draft was kept; no rejection was tested"


@pytest.mark.parametrize("case", list(tiny.FAMILY_CASES))
def test_greedy_matches_transformers(case, exported):
    model, et_model = exported(case)
    for length in PROMPT_LENGTHS:
        prompt = prompt_of(length)
        with torch.no_grad():
            eager_logits = model(prompt).logits[:, -1]  # what greedy cannot see (e.g. final softcapping)
        # fp32 on both sides; XNNPACK's GELU/tanh kernels differ from ATen's by up to ~2e-4 of the
        # logits' range (Gemma family), everything else by far less.
        scale = float(eager_logits.abs().max())
        torch.testing.assert_close(et_model.program.forward(prompt, 0), eager_logits,
                                   atol=5e-4 * scale, rtol=0)
        expected = eager_greedy(model, prompt)
        assert len(set(expected)) >= 8, f"{case}: degenerate tiny model, the comparison would prove little"
        got = et_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert got[0, length:].tolist() == expected, f"{case}, prompt of {length} tokens"


# -- the prompts exercise what they claim (eager only: cheap) ----------------------------------


def _without(case: str, **changes):
    config = tiny.FAMILY_CASES[case]()
    for key, value in changes.items():
        setattr(config, key, value)
    return tiny.make_model(config)


FEATURE_OFF = [
    # (case, config changes that remove one distinctive part)
    ("mistral", {"sliding_window": None}),
    ("gemma2", {"sliding_window": 10_000}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma3_text", {"sliding_window": 10_000}),
    ("qwen3", {"sliding_window": 10_000}),
    ("phi3-longrope", {"sliding_window": None}),
]


@pytest.mark.parametrize("case, changes", FEATURE_OFF, ids=[f"{c}-{next(iter(ch))}" for c, ch in FEATURE_OFF])
def test_window_and_softcap_change_the_long_prompt_output(case, changes):
    prompt = prompt_of(PROMPT_LENGTHS[1])
    assert eager_greedy(tiny.make_model(tiny.FAMILY_CASES[case]()), prompt) != eager_greedy(
        _without(case, **changes), prompt
    )


@pytest.mark.parametrize("case", ["llama-llama3rope", "llama-dynamicrope", "qwen2-yarn", "phi3-longrope"])
def test_rope_scaling_changes_the_output(case):
    config = tiny.FAMILY_CASES[case]()
    plain = dict(config.rope_parameters)
    plain = {"rope_type": "default", "rope_theta": plain["rope_theta"],
             **({"partial_rotary_factor": plain["partial_rotary_factor"]} if "partial_rotary_factor" in plain else {})}
    prompt = prompt_of(PROMPT_LENGTHS[1])  # past the original context from the first position
    assert eager_greedy(tiny.make_model(config), prompt) != eager_greedy(_without(case, rope_parameters=plain), prompt)


def test_phi3_rebuilds_the_cache_when_longrope_switches(exported):
    """Crossing the original context mid-generation needs transformers' cache rebuild: without it
    the tokens differ; with it (the default) they are the eager ones."""
    model, et_model = exported("phi3-longrope")
    program = et_model.program
    assert program.metadata.cache_rebuild_len == tiny.ORIGINAL_CONTEXT
    prompt = prompt_of(20)  # 20 + 24 tokens cross 32
    expected = eager_greedy(model, prompt)
    assert et_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[0, 20:].tolist() == expected
    metadata = program.metadata
    program.metadata = dataclasses.replace(metadata, cache_rebuild_len=None)
    without = et_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    program.metadata = metadata
    assert without[0, 20:].tolist() != expected
    # Per-position logits past the switch cannot come from one-token calls: refused, not approximated.
    with pytest.raises(ValueError, match="cache_rebuild_len=32"):
        program.forward_all(prompt_of(40), 0)


def test_phi3_cached_prefix_that_crosses_the_switch_is_prefilled_again(exported):
    """A chat turn whose prompt crosses the original context cannot reuse keys cached with the
    short factors: the generator prefills everything again, so it equals a full prefill."""
    model, et_model = exported("phi3-longrope")
    prompt = prompt_of(40)
    history = prompt[:, :20]
    et_model.generate(history, max_new_tokens=1, do_sample=False, eos_token_id=None)  # cache: 20 short-factor keys
    out, stats = et_model._generator.generate(
        et_model.generation_config, prompt, cached_prefix=20, max_new_tokens=8, do_sample=False, eos_token_id=None
    )
    assert stats.prompt_tokens == 40
    assert out[0, 40:].tolist() == eager_greedy(model, prompt)[:8]


# -- int8 KV cache on the special attention paths (eager wrapper: no export needed) -------------


@pytest.mark.parametrize("case", ["mistral", "gemma2"])
def test_int8_kv_cache_keeps_windows_and_softcapping(case):
    from et_transformers.export.wrapper import ExportableCausalLM

    reference = tiny.make_model(tiny.FAMILY_CASES[case]())
    wrapped = ExportableCausalLM(tiny.make_model(tiny.FAMILY_CASES[case]()), MAX_SEQ_LEN, kv_cache_dtype="int8").eval()
    prompt = prompt_of(PROMPT_LENGTHS[1])
    with torch.no_grad():
        expected = reference(prompt).logits[0, -1]
        got = wrapped(prompt, torch.arange(prompt.shape[-1]))[0]
    # int8 keys/values: close, not equal; a missing window or cap would be far off
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.999


# -- the table -----------------------------------------------------------------------------------


def test_every_supported_type_has_a_golden_case():
    tested = {tiny.FAMILY_CASES[case]().model_type for case in tiny.FAMILY_CASES}
    assert tested == set(SUPPORTED_MODEL_TYPES)
    for alias, target in MODEL_TYPE_ALIASES.items():
        assert resolve_architecture(alias) is SUPPORTED_MODEL_TYPES[target]


def test_unsupported_type_lists_what_is_supported():
    with pytest.raises(UnsupportedModelError) as err:
        resolve_architecture("mamba")
    message = str(err.value)
    assert "model_type='mamba'" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES) and "gpt-sw3" in message


def _config_dir(tmp_path, config_dict):
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    return tmp_path


def test_remote_code_is_refused_unless_trusted(tmp_path):
    config = tiny.llama_config().to_dict()
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    with pytest.raises(UnsupportedModelError, match="trust_remote_code=True"):
        export_to_pte(_config_dir(tmp_path, config), recipe("xnnpack-fp32"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_context_is_capped_by_its_position_table(tmp_path):
    config = tiny.gpt2_config().to_dict()  # n_positions=128
    with pytest.raises(InvalidConfigError, match=r"max_seq_len=256 exceeds .* Use max_seq_len<=128"):
        export_to_pte(_config_dir(tmp_path, config), recipe("xnnpack-fp32", max_seq_len=256), tmp_path / "out")


def test_bidirectional_variant_is_refused(tmp_path):
    config = tiny.gemma3_text_config(use_bidirectional_attention=True).to_dict()
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        export_to_pte(_config_dir(tmp_path, config), recipe("xnnpack-fp32"), tmp_path / "out")


def test_cpp_text_llm_runner_runs_window_and_softcap_programs(exported):
    """ExecuTorch's C++ runner reads the same program: Gemma2's masked and softcapped attention
    included, with a prompt past the window."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from et_transformers.runtime import load_kernel_libraries

    model, et_model = exported("gemma2")
    folder = et_model.pte_path.parent
    load_kernel_libraries()
    tok = tiny.make_tokenizer()
    prompt = "Paris is the capital of France. Rome is the capital of Italy. Berlin is the capital of"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[-1] > tiny.WINDOW
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
    pieces: list[str] = []
    runner.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, echo=False), pieces.append)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert expected.shape[-1] - ids.shape[-1] >= 8  # not an immediate EOS
    assert "".join(pieces) == tok.decode(expected[0, ids.shape[-1]:])


def test_dynamic_rope_gives_a_verified_draft_each_rows_own_frequencies(caplog):
    """Past the original context, a multi-token call from position p > 0 computes row i's cos/sin
    as a one-token call at p + i does (what plain decoding wrote to the cache), while a call from
    position 0 (a prefill) keeps transformers' frequencies for its whole length."""
    from et_transformers.export.transforms import traceable_dynamic_rope

    model = tiny.make_model(tiny.dynamic_rope_config())
    rope = model.model.rotary_emb
    eager_prefill = rope(torch.zeros(1, 1, 8), torch.arange(40)[None])
    with caplog.at_level("WARNING"):
        assert traceable_dynamic_rope(model) == 1
    assert "frequency vector" not in caplog.text  # llama's forward takes per-row frequencies
    x = torch.zeros(1, 1, 8)
    start = int(rope.original_max_seq_len) + 3
    together = rope(x, torch.arange(start, start + 6)[None])
    for i in range(6):
        alone = rope(x, torch.tensor([[start + i]]))
        assert all(torch.equal(t[:, i], a[:, 0]) for t, a in zip(together, alone)), i
    prefill = rope(x, torch.arange(40)[None])
    assert all(torch.equal(p, e) for p, e in zip(prefill, eager_prefill))

"""Structured output on the tiny model: grammar masks through the one generation loop.

The tiny model's random weights make no sense, so every check here is about the mask: greedy
constrained output equals eager transformers with llguidance's own mask helpers token for token,
sampled output always matches, and the mask composes with stop strings, lengths, streams, chats,
batches and assisted generation. The model object gets a tokenizer that can spell JSON
(``tiny.make_json_tokenizer``, same size as the model's vocabulary); the tiny model's own one,
which cannot spell ``{``, shows that unspellable formats are refused before the program runs.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import tiny
from et_transformers import ChatSession, ConstraintError
from et_transformers.constraints import GrammarLogitsProcessor, grammar_for

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
          "maximum": 99}, "tag": {"enum": ["a", "b"]}}, "required": ["ok", "n", "tag"], "additionalProperties": False}
#: (response_format, check of the decoded output) pairs for the parity and sampling tests.
FORMATS = {
    "json_schema": ({"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}},
                    lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    "regex": ({"type": "regex", "pattern": r"(one|two) [0-9]{2}"},
              lambda text: re.fullmatch(r"(one|two) [0-9]{2}", text) or pytest.fail(text)),
    "choice": ({"type": "choice", "choices": ["Paris", "Rome", "Berlin"]},
               lambda text: text in ("Paris", "Rome", "Berlin") or pytest.fail(text)),
    "lark": ({"type": "grammar", "grammar": 'start: "The answer is " ("yes" | "no") "."'},
             lambda text: text in ("The answer is yes.", "The answer is no.") or pytest.fail(text)),
    "gbnf": ({"type": "grammar", "syntax": "gbnf", "grammar": 'root ::= "x=" [0-9] [0-9]? ";"'},
             lambda text: re.fullmatch(r"x=[0-9]{1,2};", text) or pytest.fail(text)),
}
PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def json_tok():
    return tiny.make_json_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_llama_et, json_tok):
    """A second object on the tiny fp32 program, with the JSON-capable tokenizer."""
    m = tiny_llama_et.replica(warmup=False)
    m.tokenizer = json_tok
    return m


def ids_of(tok, text: str = PROMPT) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids


def new_text(model, out, ids) -> str:
    return model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class _Reference:
    """llguidance's documented mask path (``llguidance.numpy``) as a transformers processor, for eager
    transformers' own loop: the same library, none of our masking code."""

    def __init__(self, grammar: str, tok):
        import llguidance
        import llguidance.hf

        self.np = __import__("llguidance.numpy", fromlist=["x"])
        self.matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tok, n_vocab=tiny.VOCAB_SIZE), grammar)
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            assert self.matcher.consume_token(int(input_ids[0, -1]))
        self.started = True
        mask = self.np.allocate_token_bitmask(1, tiny.VOCAB_SIZE)
        self.np.fill_next_token_bitmask(self.matcher, mask)
        out = scores.detach().numpy().copy()
        self.np.apply_token_bitmask_inplace(out, mask)
        return torch.from_numpy(out)


@pytest.mark.parametrize("name", list(FORMATS))
def test_greedy_constrained_output_equals_eager_transformers_with_llguidance(model, tiny_llama_model, json_tok, name):
    from transformers import LogitsProcessorList

    rf, check = FORMATS[name]
    ids = ids_of(json_tok)
    out = model.generate(ids, response_format=rf, max_new_tokens=24, do_sample=False)
    ours = out[0, ids.shape[1]:].tolist()
    eager = tiny_llama_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                      logits_processor=LogitsProcessorList([_Reference(grammar_for(rf), json_tok)]),
                                      eos_token_id=2, pad_token_id=0)[0, ids.shape[1]:].tolist()
    # We stop when the grammar is complete; eager transformers goes on to the end-of-sequence the mask forces.
    assert ours == eager[: len(ours)] and eager[len(ours):] in ([], [2]), (ours, eager)
    check(new_text(model, out, ids))


def test_sampled_outputs_always_match_and_follow_the_seed(model, json_tok):
    ids = ids_of(json_tok)
    for name in ("json_schema", "regex", "choice"):
        rf, check = FORMATS[name]
        texts = []
        for seed in range(4):
            out = model.generate(ids, response_format=rf, max_new_tokens=24, do_sample=True, temperature=1.5,
                                 top_k=50, rng=torch.Generator().manual_seed(seed))
            texts.append(new_text(model, out, ids))
            check(texts[-1])
        again = model.generate(ids, response_format=rf, max_new_tokens=24, do_sample=True, temperature=1.5, top_k=50,
                               rng=torch.Generator().manual_seed(0))
        assert new_text(model, again, ids) == texts[0]


def test_stream_ends_with_finish_reason_grammar_and_composes_with_length_and_stop_strings(model, json_tok):
    ids = ids_of(json_tok)
    rf = FORMATS["lark"][0]
    records = list(model.stream_generate(ids, response_format=rf, max_new_tokens=24, do_sample=False))
    text = "".join(r.text for r in records)
    assert text in ("The answer is yes.", "The answer is no.") and records[-1].finish_reason == "grammar"
    short = list(model.stream_generate(ids, response_format=rf, max_new_tokens=3, do_sample=False))
    assert len(short) == 3 and short[-1].finish_reason == "length" and text.startswith("".join(r.text for r in short))
    cut = list(model.stream_generate(ids, response_format=rf, max_new_tokens=24, do_sample=False,
                                     stop_strings=["answer"], tokenizer=json_tok))
    assert cut[-1].finish_reason == "stop_string" and "".join(r.text for r in cut) == "The "


def test_chat_session_batches_and_a_processor_built_by_hand(model, json_tok):
    rf, check = FORMATS["json_schema"]
    chat = ChatSession(model, max_new_tokens=32, do_sample=False)
    first = chat.send("Say it as JSON.", response_format=rf)
    check(first)
    check(chat.send("Again.", response_format=rf))
    assert chat.stats.extra["cached_tokens"] > 0  # the second turn reused the first's cache
    json_tok.padding_side = "left"
    batch = json_tok([PROMPT, "one two three four five"], return_tensors="pt", padding=True)
    out = model.generate(**batch, response_format=FORMATS["regex"][0], max_new_tokens=12, do_sample=False)
    for b in range(2):
        row = model.generate(batch.input_ids[b:b + 1, batch.attention_mask[b].argmax():],
                             response_format=FORMATS["regex"][0], max_new_tokens=12, do_sample=False)
        assert json_tok.decode(out[b, batch.input_ids.shape[1]:], skip_special_tokens=True) == \
            new_text(model, row, row[:, : batch.attention_mask[b].sum()])
    # A row stopped early is run on with padding while the batch goes on (kept scores need those
    # steps, as in transformers): the padding is past the row's text, not a token the grammar refuses.
    from transformers import StoppingCriteria

    class StopFirstRowAfterOne(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            first = input_ids[0, : batch.input_ids.shape[1]].tolist() == batch.input_ids[0].tolist()
            return torch.tensor([first and input_ids.shape[1] > batch.input_ids.shape[1]])

    cut = model.generate(**batch, response_format=FORMATS["regex"][0], max_new_tokens=12, do_sample=False,
                         stopping_criteria=[StopFirstRowAfterOne()], return_dict_in_generate=True, output_scores=True)
    new = batch.input_ids.shape[1]
    steps = cut.sequences.shape[1] - new
    assert steps > 2 and len(cut.scores) == steps and cut.sequences[0, new + 1:].eq(json_tok.pad_token_id).all()
    assert cut.sequences[1].tolist() == out[1, : new + steps].tolist()
    # Built by hand and passed as a plain processor: no completion criterion, so the mask forces the end.
    processor = GrammarLogitsProcessor(FORMATS["choice"][0], json_tok, vocab_size=tiny.VOCAB_SIZE)
    ids = ids_of(json_tok)
    out = model.generate(ids, logits_processor=[processor], max_new_tokens=12, do_sample=False)
    assert out[0, -1] == 2 and new_text(model, out, ids) in ("Paris", "Rome", "Berlin")


def test_assisted_generation_gives_the_constrained_output(cli_model, json_tok):
    """Prompt lookup (drafts from the text) and a draft model (whose proposals the mask sees, then
    rolls back): the same tokens as plain constrained decoding."""
    target, draft = cli_model.replica(warmup=False), cli_model.replica(warmup=False)
    target.tokenizer = draft.tokenizer = json_tok
    ids = ids_of(json_tok, "one two one two one two one")
    rf = {"type": "regex", "pattern": "( ?(one|two|three))+"}
    plain = target.generate(ids, response_format=rf, max_new_tokens=20, do_sample=False)
    lookup = target.generate(ids, response_format=rf, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4)
    drafted = target.generate(ids, response_format=rf, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert lookup.tolist() == plain.tolist() == drafted.tolist()
    assert target.stats.drafted_tokens > 0
    # 20 tokens may end inside a word: the text is in the pattern's language, or a prefix of it.
    assert re.fullmatch(r"( ?(one|two|three))*( ?(o|on|t|tw|th|thr|thre))?", new_text(target, plain, ids))


BAD = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": "low"}}}}}, "properties/n/minimum"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "Unimplemented keys"),
    ({"type": "regex", "pattern": "[a-"}, "unclosed character class"),
    ({"type": "grammar", "grammar": "start: missing_rule"}, "unknown name"),
    ({"type": "grammar", "grammar": "root ::= ", "syntax": "ebnf"}, "syntax='ebnf'"),
    ({"type": "choice", "choices": []}, "non-empty list"),
    ({"type": "json_schema", "schema": {}}, "unknown key(s) ['schema']"),
    ({"type": "xml"}, "type 'xml' is not valid"),
    ({"type": "regex", "pattern": "one two Z"}, "cannot spell 'Z'"),
]


@pytest.mark.parametrize("rf,message", BAD, ids=[m for _, m in BAD])
def test_bad_formats_raise_before_the_program_runs(et, rf, message):
    ids = et.tokenizer(PROMPT, return_tensors="pt").input_ids
    before = et.program.executions
    with pytest.raises(ConstraintError, match=re.escape(message)):
        et.generate(ids, response_format=rf, max_new_tokens=4)
    assert et.program.executions == before


def test_a_format_the_vocabulary_cannot_spell_is_refused(et):
    """The tiny model's own tokenizer has no '{': JSON cannot be written with it."""
    ids = et.tokenizer(PROMPT, return_tensors="pt").input_ids
    with pytest.raises(ConstraintError, match=re.escape("cannot spell '{'")):
        et.generate(ids, response_format={"type": "json_object"}, max_new_tokens=4)


def test_cli_generate_with_regex_and_a_schema_the_vocabulary_cannot_spell(cli_export, tmp_path):
    from conftest import run_cli

    pattern = "(one|two|three)( (one|two|three)){2}"
    ok = run_cli("generate", cli_export[0], "one two", "--regex", pattern, "--max-new-tokens", "16")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert re.fullmatch(pattern, ok.stdout.strip()), ok.stdout
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA))
    bad = run_cli("generate", cli_export[0], "one two", "--json-schema", schema, "--max-new-tokens", "8")
    assert bad.returncode == 2 and "cannot spell '{'" in bad.stderr, bad.stderr[-2000:]

"""The real demo model, SmolLM2-135M-Instruct (GGUF from PyPI): one export shared by every test here."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

import tiny
from conftest import ROOT, run_python
from et_transformers import ETModelForCausalLM
from et_transformers.config import DEFAULT_RECIPE, recipe
from et_transformers.evaluation import Evaluation, evaluate_eager, evaluate_program

# verify_tokens=8: the real-model tests of assisted generation share this export too
DEMO_CONFIG = recipe(DEFAULT_RECIPE, max_seq_len=1024, verify_tokens=8)
EVAL_TOKENS = 512  # of benchmarks/data/eval_text.txt (benchmarks/quality.py scores all of it)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def demo_model(demo_gguf, demo_cache) -> ETModelForCausalLM:
    """The demo model exported once with the default recipe (1024 context)."""
    return ETModelForCausalLM.from_pretrained(demo_gguf, export_config=DEMO_CONFIG, cache_dir=demo_cache)


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def test_export_happened_and_answers_a_chat_question(demo_model):
    assert demo_model.stats.export_time is not None
    tok = demo_model.tokenizer
    ids = chat_ids(tok, "What is the capital of France?")
    out = demo_model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_load_in_a_fresh_process_is_fast_and_does_not_export(demo_model, demo_gguf, demo_cache):
    # Timed from after `import torch` (a fixed cost of any PyTorch program, 1.5-2.5 s on this machine)
    # to the model being ready: our imports, cache lookup and check, program load, tokenizer, warm-up.
    code = f"""
import time, json
import torch
t0 = time.perf_counter()
from et_transformers import ETModelForCausalLM, ExportConfig
m = ETModelForCausalLM.from_pretrained({str(demo_gguf)!r}, cache_dir={str(demo_cache)!r},
    export_config=ExportConfig(**{DEMO_CONFIG.to_dict()!r}))
ready = time.perf_counter() - t0
print(json.dumps({{"ready": ready, "exported": m.stats.export_time is not None, "load": m.stats.load_time}}))
"""
    if demo_model.export_config.uses_own_kernels:
        # Our kernel library is built once per cache root; the session fixture loaded it before this
        # test's isolated cache root was set, so build it here too, as a user's first load would have.
        from et_transformers import kernels

        kernels.library_path()
    start = time.perf_counter()
    proc = run_python(code)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["exported"]
    # A sanity bound, not a speed goal (those live in benchmarks/): about 2 s when the machine is
    # quiet, up to 3.2 s measured while the suite's other worker exports a model on the second core.
    assert result["ready"] < 4.0, result
    print(f"fresh-process load: ready in {result['ready']:.2f} s (wall {wall:.2f} s incl. interpreter start)")


def test_save_pretrained_then_from_pretrained_of_the_folder_is_fast_and_does_not_export(demo_model, tmp_path):
    folder = demo_model.save_pretrained(tmp_path / "SmolLM2-135M-Instruct-et",
                                        card={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    ids = chat_ids(demo_model.tokenizer, "What is the capital of France?")
    expected = demo_model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()
    # Timed: the from_pretrained call in a fresh process (hash check, tokenizer, program, warm-up).
    code = f"""
import json, time
import torch
from et_transformers import ETModelForCausalLM
t0 = time.perf_counter()
m = ETModelForCausalLM.from_pretrained({str(folder)!r})
seconds = time.perf_counter() - t0
out = m.generate(torch.tensor([{ids[0].tolist()!r}]), max_new_tokens=8, do_sample=False)
print(json.dumps({{"seconds": seconds, "exported": m.stats.export_time is not None, "tokens": out[0].tolist()}}))
"""
    runs = []
    for _ in range(3):  # best of 3: the two cores are shared, one noisy run must not decide
        proc = run_python(code, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if runs[-1]["seconds"] < 3.0:
            break
    assert not any(r["exported"] for r in runs) and all(r["tokens"] == expected for r in runs)
    assert min(r["seconds"] for r in runs) < 3.0, runs
    print(f"save_pretrained -> from_pretrained(folder): {[round(r['seconds'], 2) for r in runs]} s")


def test_cpp_runner_generates_the_same_greedy_tokens(demo_model):
    tok = demo_model.tokenizer
    prompt = "The capital of France is"
    text = tiny.cpp_runner_text(demo_model.pte_path.parent, prompt, 20)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = demo_model.generate(ids, max_new_tokens=20, do_sample=False)
    assert text == tok.decode(out[0, ids.shape[1]:])


def test_prompt_lookup_on_the_default_program_is_plain_greedy_token_for_token(demo_model):
    """The default recipe's program verifies drafts (our kernels compute each row alike in one- and
    multi-row calls), so assisted greedy output is plain greedy output, on a quantized program."""
    if not demo_model.export_config.uses_own_kernels:
        pytest.skip("the default recipe here is an XNNPACK one (our kernels cannot run on this machine)")
    tok = demo_model.tokenizer
    passage = ("The library opens at nine, closes at six, and lends up to five books for three weeks. "
               "Members may renew a loan twice online.")
    ids = tok.apply_chat_template([{"role": "user", "content": f"Repeat this text exactly: {passage}"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    plain = demo_model.generate(ids, max_new_tokens=48, do_sample=False)
    looked_up = demo_model.generate(ids, max_new_tokens=48, do_sample=False, prompt_lookup_num_tokens=7)
    assert torch.equal(looked_up, plain)
    assert demo_model.stats.accepted_tokens > 0


def test_draft_models_on_the_default_program_give_plain_greedy_token_for_token(demo_model, tmp_path):
    """Two drafts for the demo model's quantized program: a random tiny Llama with its tokenizer
    (almost every draft rejected) and its own program loaded again (every draft kept): both give
    plain greedy output."""
    from et_transformers.export import Exporter

    if not demo_model.export_config.uses_own_kernels:
        pytest.skip("the default recipe here is an XNNPACK one (our kernels cannot run on this machine)")
    tok = demo_model.tokenizer
    config = tiny.llama_config(vocab_size=demo_model.program.metadata.vocab_size, tie_word_embeddings=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, max_position_embeddings=1024)
    source = tiny.make_model_dir(tmp_path / "source", config, seed=3)
    tok.save_pretrained(source)
    Exporter.from_pretrained(source, recipe("xnnpack-fp32", max_seq_len=1024), progress=False).run(tmp_path / "draft")
    wrong = ETModelForCausalLM.from_pretrained(tmp_path / "draft")
    itself = ETModelForCausalLM.from_pte(demo_model.program.path, tokenizer=tok)
    ids = chat_ids(tok, "Name three colours of the rainbow.")
    mask = torch.ones_like(ids)  # the template's end-of-turn token is also the pad token
    plain = demo_model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None)
    for draft, kept in ((wrong, "few"), (itself, "all")):
        drafted = demo_model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, assistant_model=draft)
        assert torch.equal(drafted, plain), kept
        stats = demo_model.stats
        assert stats.drafted_tokens > 0, kept
        if kept == "all":
            assert stats.accepted_tokens == stats.drafted_tokens
        else:
            assert stats.accepted_tokens < stats.drafted_tokens


def test_served_over_the_openai_api_it_answers_as_generate_does_and_caches_the_first_turn(demo_model):
    """The demo model behind ``et-transformers serve``'s app (one slot: this model object), driven by
    the official openai client: greedy replies equal generate()'s, whole and streamed; a second
    turn re-sending the history prefills only the new turn."""
    openai = pytest.importorskip("openai")
    from et_transformers.serving import create_app, running

    tok = demo_model.tokenizer

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True)["input_ids"]

    first = [{"role": "user", "content": "What is the capital of France?"}]
    ids = render(first)
    expected = tok.decode(demo_model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
    with running(create_app([demo_model], model_id="smollm2")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model="smollm2", max_tokens=24, temperature=0)
        whole = client.chat.completions.create(messages=first, **ask)
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(messages=first, stream=True, **ask) if c.choices)
        history = first + [{"role": "assistant", "content": whole.choices[0].message.content},
                           {"role": "user", "content": "And of Italy?"}]
        second = client.chat.completions.create(messages=history, **ask)
    assert whole.choices[0].message.content == streamed == expected and "Paris" in expected
    assert second.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens + whole.usage.completion_tokens - 1
    ids2 = render(history)
    out2 = demo_model.generate(ids2, max_new_tokens=24, do_sample=False)
    assert second.choices[0].message.content == tok.decode(out2[0, ids2.shape[1]:], skip_special_tokens=True)


# -- quality of the recipes (issue: quantization recipes with measured quality) ----------------------


@pytest.fixture(scope="session")
def eval_ids(demo_gguf) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    text = (ROOT / "benchmarks" / "data" / "eval_text.txt").read_text()
    return tokenizer(text, return_tensors="pt").input_ids[:, :EVAL_TOKENS]


@pytest.fixture(scope="session")
def eager_model(demo_gguf):
    """Eager fp32 transformers on the GGUF's (dequantized) weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def eager_reference(eager_model, eval_ids) -> Evaluation:
    return evaluate_eager(eager_model, eval_ids, EVAL_TOKENS)


def _evaluate(demo_gguf, demo_cache, eval_ids, **fields) -> Evaluation:
    model = ETModelForCausalLM.from_pretrained(demo_gguf, cache_dir=demo_cache, **fields)
    return evaluate_program(model.program, eval_ids, EVAL_TOKENS)


@pytest.fixture(scope="session")
def default_run(demo_model, eval_ids) -> Evaluation:
    return evaluate_program(demo_model.program, eval_ids, EVAL_TOKENS)


def test_8da8w_keeps_90_percent_top1_agreement(demo_gguf, demo_cache, eval_ids, eager_reference):
    run = _evaluate(demo_gguf, demo_cache, eval_ids, recipe="xnnpack-8da8w", max_seq_len=EVAL_TOKENS)
    agreement = run.agreement(eager_reference)
    print(f"8da8w: top-1 agreement {agreement:.3f}, ppl {run.perplexity:.2f} vs fp32 {eager_reference.perplexity:.2f}")
    assert agreement >= 0.90


def test_default_recipe_perplexity_rise_is_bounded(default_run, eager_reference):
    rise = default_run.perplexity / eager_reference.perplexity - 1
    print(f"{DEFAULT_RECIPE}: ppl {default_run.perplexity:.2f} vs fp32 {eager_reference.perplexity:.2f} "
          f"({rise:+.1%}), agreement {default_run.agreement(eager_reference):.3f}")
    assert rise <= 0.25


# The int8 KV cache is measured on the eager wrapper, which runs the very ExecuTorch kernels the
# program runs (tests/test_quantization.py proves the int8-KV program equals it to 1e-4), so no extra
# real-model export is needed.


def _wrapper_run(model, ids, kv_cache_dtype) -> Evaluation:
    from types import SimpleNamespace

    from et_transformers.export.wrapper import ExportableCausalLM

    wrapper = ExportableCausalLM(model, EVAL_TOKENS, kv_cache_dtype=kv_cache_dtype, logits="all").eval()

    def run(window_ids):  # each window starts at position 0, as evaluate_program's do
        return SimpleNamespace(logits=wrapper(window_ids, torch.arange(window_ids.shape[1])))

    return evaluate_eager(run, ids, EVAL_TOKENS)


def test_int8_kv_cache_keeps_95_percent_agreement_on_float_weights(eager_model, eval_ids):
    float_cache = _wrapper_run(copy.deepcopy(eager_model), eval_ids, None)
    int8_cache = _wrapper_run(copy.deepcopy(eager_model), eval_ids, "int8")
    agreement = int8_cache.agreement(float_cache)
    print(f"fp32 weights + int8 KV cache: agreement with the float cache {agreement:.3f}, "
          f"ppl {int8_cache.perplexity:.2f} vs {float_cache.perplexity:.2f}")
    assert agreement >= 0.95


def test_int8_kv_cache_adds_little_to_the_default_recipe(eager_model, eval_ids, eager_reference):
    """On 8da4w weights, any perturbation flips ~10% of top-1s (dynamic 8-bit activation rounding
    amplifies it: a 1e-4 relative nudge of the query alone gives ~89% self-agreement), so the int8
    cache is judged by what it changes against fp32: agreement and perplexity move by at most 2%."""
    from et_transformers.export.quantize import quantize_model

    quantized = copy.deepcopy(eager_model)
    quantize_model(quantized, DEMO_CONFIG)
    without = _wrapper_run(copy.deepcopy(quantized), eval_ids, None)
    with_int8 = _wrapper_run(quantized, eval_ids, "int8")
    a0, a1 = without.agreement(eager_reference), with_int8.agreement(eager_reference)
    p0, p1 = without.perplexity, with_int8.perplexity
    print(f"{DEFAULT_RECIPE}: agreement with fp32 {a0:.3f} -> {a1:.3f} with int8 KV; ppl {p0:.2f} -> {p1:.2f}; "
          f"self-agreement {with_int8.agreement(without):.3f}")
    assert a1 >= a0 - 0.02
    assert p1 <= p0 * 1.02


# -- structured output and tool calling on the demo model (issue: structured output) ----------------

#: 13 schemas: nested objects, arrays with bounds, enums, ranges, required/optional, patterns, lengths.
STRUCTURED_SCHEMAS = {
    "required": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
                 "required": ["name", "age"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 12}, "year": {"type": "integer"},
                 "draft": {"type": "boolean"}}, "required": ["title"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer",
               "maximum": 9999}, "admin": {"type": "boolean"}}, "required": ["id", "admin"], "additionalProperties": False}},
               "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer",
                     "maximum": 99}, "minItems": 2, "maxItems": 4}}, "required": ["items"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "int_range": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}},
                  "required": ["n"], "additionalProperties": False},
    "number_range": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
                     "required": ["x"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"], "additionalProperties": False},
    "length": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}},
               "required": ["s"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"], "additionalProperties": False}}}, "required": ["people"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "maximum": 999}, {"type": "null"}]}},
               "required": ["v"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"kind": {"const": "point"}, "visible": {"type": "boolean"}},
              "required": ["kind", "visible"], "additionalProperties": False},
    "top_array": {"type": "array", "items": {"enum": ["yes", "no"]}, "minItems": 1, "maxItems": 3},
}


def test_every_constrained_output_parses_and_validates(demo_model):
    import re

    import jsonschema

    tok = demo_model.tokenizer
    ids = chat_ids(tok, "Reply with a short JSON example.")
    for name, schema in STRUCTURED_SCHEMAS.items():
        out = demo_model.generate(ids, response_format=schema, max_new_tokens=48, do_sample=False)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), schema)  # raises, naming the schema's rule, if not
    sampled = demo_model.generate(ids, response_format=STRUCTURED_SCHEMAS["array_of_objects"], max_new_tokens=48,
                                  do_sample=True, temperature=1.0, rng=torch.Generator().manual_seed(0))
    jsonschema.validate(json.loads(tok.decode(sampled[0, ids.shape[1]:], skip_special_tokens=True)),
                        STRUCTURED_SCHEMAS["array_of_objects"])
    question = chat_ids(tok, "What is the capital of France?")
    for rf, check in [({"type": "regex", "pattern": r"The capital is [A-Z][a-z]+\."}, r"The capital is [A-Z][a-z]+\."),
                      ({"type": "choice", "choices": ["Paris", "London", "Madrid"]}, "Paris|London|Madrid")]:
        out = demo_model.generate(question, response_format=rf, max_new_tokens=12, do_sample=False)
        assert re.fullmatch(check, tok.decode(out[0, question.shape[1]:], skip_special_tokens=True))
        assert demo_model.stats.generated_tokens < 12  # ended by the grammar's completion
    assert tok.decode(out[0, question.shape[1]:], skip_special_tokens=True) == "Paris"


def test_demo_model_calls_a_tool_and_answers_with_its_result_over_the_openai_api(demo_model):
    """SmolLM2's template does not render tools: they are explained to it in Hermes' format, the call
    is forced (tool_choice=required) and parsed, and the tool's result yields a final answer."""
    openai = pytest.importorskip("openai")
    import jsonschema

    from et_transformers.serving import create_app, running

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                              "required": ["city"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
             "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                            "required": ["zone"], "additionalProperties": False}}}
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    with running(create_app([demo_model], model_id="smollm2")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        first = client.chat.completions.create(model="smollm2", messages=messages, tools=[weather, clock],
                                               tool_choice="required", parallel_tool_calls=False, temperature=0,
                                               max_tokens=40)
        call = first.choices[0].message.tool_calls[0]
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
        final = client.chat.completions.create(model="smollm2", messages=messages, tools=[weather, clock],
                                               temperature=0, max_tokens=32)
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "Paris" in json.loads(call.function.arguments)["city"]
    jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
    answer = final.choices[0].message
    print(f"tool call {call.function.name}({call.function.arguments}); final answer: {answer.content!r}")
    assert answer.tool_calls is None and answer.content
    assert "21" in answer.content or "sunny" in answer.content.lower()

"""Tool calling: rendering, parsing each family's format, and calls forced through the server.

Parsers are checked on hand-written model outputs of each format; the server on the tiny model
(with the JSON-capable tiny tokenizer), where a call comes from constrained decoding since random
weights would never write one.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import tiny
from conftest import running
from et_transformers import tools
from et_transformers.serving import create_app

HERMES, LLAMA3 = tools.TOOL_FORMATS["hermes"], tools.TOOL_FORMATS["llama3_json"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

PARSED = [
    ("hermes, one call (Qwen2.5/3)", HERMES,
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris", "unit": "C"})]),
    ("hermes, text then two calls", HERMES,
     'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "F"}}\n</tool_call>',
     "Let me check.", [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome", "unit": "F"})]),
    ("hermes, unclosed last call", HERMES, '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}',
     "", [("get_time", {"zone": "CET"})]),
    ("hermes, broken JSON stays text", HERMES, '<tool_call>\n{"name": "get_time", "arguments": {',
     '<tool_call>\n{"name": "get_time", "arguments": {', []),
    ("hermes, plain answer", HERMES, "It is sunny.", "It is sunny.", []),
    ("llama 3.x JSON", LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}',
     "", [("get_weather", {"city": "Oslo", "unit": "C"})]),
    ("llama 3.x, two calls separated by ;", LLAMA3,
     '{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_time", "parameters": {"zone": "CET"}}',
     "", [("get_time", {"zone": "UTC"}), ("get_time", {"zone": "CET"})]),
    ("llama 3.x, 'arguments' also read", LLAMA3, '{"name": "get_time", "arguments": {"zone": "UTC"}}',
     "", [("get_time", {"zone": "UTC"})]),
    ("llama 3.x, an answer", LLAMA3, "The time is noon.", "The time is noon.", []),
]


@pytest.mark.parametrize("case", PARSED, ids=[c[0] for c in PARSED])
def test_parsers_on_hand_written_outputs_whole_and_streamed(case):
    _, fmt, text, content, calls = case
    got_content, got = tools.parse(text, fmt)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)
    stream = tools.ToolCallStream(fmt)
    events = [e for i in range(0, len(text), 3) for e in stream.feed(text[i:i + 3])] + stream.finish()
    streamed = [(e.name, json.loads(e.arguments)) for kind, e in events if kind == "call"]
    assert streamed == calls
    assert "".join(e for kind, e in events if kind == "content").strip() == content


QWEN_LIKE_TEMPLATE = (  # the parts of Qwen2.5's template that render tools, calls and tool results
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
    "<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]


def test_render_uses_a_template_that_renders_tools_and_explains_them_to_one_that_does_not():
    native, plain = tiny.make_json_tokenizer(), tiny.make_json_tokenizer()
    native.chat_template = QWEN_LIKE_TEMPLATE
    ours = native.decode(tools.render(native, CONVERSATION, TOOLS, model_type="qwen2"))
    assert '"name": "get_time"' in ours and "<tool_response>\n21 C, sunny\n</tool_response>" in ours
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}' in ours
    assert tools.tool_format_for(native, "qwen2") is HERMES and tools.tool_format_for(native, "llama") is LLAMA3
    assert "You may call one or more functions" not in ours  # the template's own wording, not ours
    explained = plain.decode(tools.render(plain, CONVERSATION, TOOLS, model_type="qwen2"))
    assert explained.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert '{"type": "function", "function": {"name": "get_weather"' in explained
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}' \
        in explained and "<|im_start|>user\nThe get_weather tool returned: 21 C, sunny<|im_end|>" in explained
    assert tools.tool_format_for(plain, "qwen2") is HERMES  # it was told the hermes format
    # A result whose call is not in the conversation is named by its message's ``name``.
    orphan = [{"role": "user", "content": "Time?"}, {"role": "tool", "tool_call_id": "c9", "name": "get_time",
                                                     "content": "noon"}]
    assert "The get_time tool returned: noon" in plain.decode(tools.render(plain, orphan, TOOLS))


#: A Llama-3-like template that renders tools in few tokens: the tiny program's context is 128.
COMPACT_LLAMA_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{\"name\": \"{{ c.function.name }}\", \"parameters\": {{ c.function.arguments | tojson }}}{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def client(tiny_llama_et):
    """The server on a second object of the tiny (model_type llama) program with the JSON-capable
    tokenizer, whose template renders tools: calls are written in the Llama 3.x JSON format."""
    model = tiny_llama_et.replica(warmup=False)
    model.tokenizer = tiny.make_json_tokenizer()
    model.tokenizer.chat_template = COMPACT_LLAMA_TEMPLATE
    with running(create_app([model], model_id="tiny", defaults={"max_new_tokens": 48})) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _check_call(call, name=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_two_tool_conversation_through_the_openai_client(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _check_call(call)
    messages += [choice.message.model_dump(),  # as the SDK returns it: refusal, annotations... null
                 {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"}]
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=16)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_named_tool_choice_streamed_as_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Time?"}], tools=TOOLS, stream=True, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=64)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_time"
    assert all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_time"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_response_format_whole_and_streamed(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer",
              "minimum": 0, "maximum": 9}}, "required": ["answer", "score"], "additionalProperties": False}
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Rate it."}], temperature=0, max_tokens=32,
               response_format={"type": "json_schema", "json_schema": {"name": "rating", "schema": schema, "strict": True}})
    whole = client.chat.completions.create(**ask)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                       if c.choices)
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    assert streamed == whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    mode = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON!"}], temperature=0,
                                          max_tokens=48, response_format={"type": "json_object"})
    # A random model stays inside a string at 48 tokens (finish "length"), so the check is the start
    # the mask forces; a complete reply must parse.
    content = mode.choices[0].message.content
    assert content.startswith('{"') and mode.choices[0].finish_reason in ("stop", "length")
    if mode.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_streamed_tool_call_deltas_leave_out_what_they_do_not_add():
    """OpenAI's shape: the first delta of a call has id, type and name; the next ones only arguments."""
    from et_transformers.serving.tool_schemas import ToolCallDelta

    first = ToolCallDelta(index=1, id="call_x", type="function", function={"name": "get_time", "arguments": ""})
    more = ToolCallDelta(index=1, function={"arguments": '{"zone": "UTC"}'})
    assert json.loads(first.model_dump_json()) == {"index": 1, "id": "call_x", "type": "function",
                                                   "function": {"name": "get_time", "arguments": ""}}
    assert json.loads(more.model_dump_json()) == {"index": 1, "function": {"arguments": '{"zone": "UTC"}'}}


def test_tool_choice_semantics():
    """none: nothing parsed or forced; auto: parsed, forced only to a call or the response_format;
    required: a call of any tool; a named function: that one only; an unknown name: a 400 naming it."""
    from et_transformers.serving.schemas import APIError, ChatCompletionRequest
    from et_transformers.serving.translation import tool_plan

    tok = tiny.make_json_tokenizer()
    tok.chat_template = COMPACT_LLAMA_TEMPLATE

    def plan(**fields):
        request = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], **fields)
        return tool_plan(request, tok, "llama", tiny.VOCAB_SIZE, eos_token_id=2)

    json_mode = {"type": "json_object"}
    assert plan(tools=TOOLS, tool_choice="none") == (None, None)
    assert plan(tools=TOOLS, tool_choice="none", response_format=json_mode) == (None, json_mode)
    assert plan(tools=TOOLS) == (LLAMA3, None) and plan(tools=TOOLS, tool_choice="auto") == (LLAMA3, None)
    fmt, either = plan(tools=TOOLS, response_format=json_mode)
    assert fmt is LLAMA3 and "answer" in either["grammar"] and "get_time" in either["grammar"]
    fmt, required = plan(tools=TOOLS, tool_choice="required", response_format=json_mode)
    assert fmt is LLAMA3 and "answer" not in required["grammar"]
    assert '"get_weather"' in required["grammar"] and '"get_time"' in required["grammar"]
    _, named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert '"get_time"' in named["grammar"] and '"get_weather"' not in named["grammar"]
    with pytest.raises(APIError) as e:
        plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_date"}})
    assert e.value.status == 400 and e.value.body.error.param == "tool_choice" and "'get_date'" in str(e.value)

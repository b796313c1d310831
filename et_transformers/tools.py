"""Tool calling: tools into the prompt, the model's tool-call text back into OpenAI-style calls, and
the grammar that forces a valid call.

A :class:`ToolFormat` is how one chat-template family writes a call (:data:`TOOL_FORMATS`):
``hermes`` (Qwen2.5/3, SmolLM3, Hermes: ``<tool_call>{"name", "arguments"}</tool_call>`` blocks)
and ``llama3_json`` (Llama 3.x: the reply is ``{"name", "parameters"}``). :func:`tool_format_for`
picks it from an explicit ``model_type`` table when the tokenizer's own chat template renders
tools (checked by rendering, not by reading the template); other templates get the ``hermes``
instructions from us (:func:`render`), as a system message, with past calls written in that
format and tool results as user messages. :func:`parse` and :class:`ToolCallStream` turn a reply (whole or
token by token) into content and :class:`ToolCall` s; :func:`call_format` is the
``response_format`` (a Lark grammar whose arguments are each tool's JSON schema) that makes a call
certain when ``tool_choice`` requires one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .constraints import JSON_OPTIONS, check_json_schema
from .errors import ConstraintError

__all__ = ["TOOL_FORMATS", "ToolCall", "ToolCallStream", "ToolFormat", "call_format", "check_tools", "parse",
           "render", "tool_format_for"]


@dataclass(frozen=True)
class ToolFormat:
    """How a chat-template family writes a tool call.

    Attributes:
        name: the key in :data:`TOOL_FORMATS`.
        arguments_key: the key holding the arguments in the call's JSON object.
        open_tag: what opens each call (``None``: the whole reply is the call).
        close_tag: what closes each call.
    """

    name: str
    arguments_key: str
    open_tag: str | None = None
    close_tag: str | None = None


TOOL_FORMATS = {
    "hermes": ToolFormat("hermes", "arguments", "<tool_call>", "</tool_call>"),
    "llama3_json": ToolFormat("llama3_json", "parameters"),
}
#: The format of each family whose own chat template renders tools (others get ours: hermes).
FAMILY_TOOL_FORMATS = {"qwen2": "hermes", "qwen3": "hermes", "smollm3": "hermes", "llama": "llama3_json"}
#: What we tell a model whose template does not render tools (Qwen2.5's own wording).
HERMES_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_xyz", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_NATIVE: dict[str, bool] = {}  # chat template -> whether it renders tools


@dataclass(frozen=True)
class ToolCall:
    """One call the model made, as OpenAI returns it.

    Attributes:
        name: the function's name.
        arguments: the arguments as a JSON string.
        id: a fresh ``call_...`` id.
    """

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools) -> list[dict]:
    """OpenAI ``tools`` checked: each ``{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}``, names unique and of 1-64 letters, digits, ``_`` or ``-``,
    parameters a valid JSON schema. ``strict`` is accepted; a forced call's arguments follow the
    schema whatever it says (``false`` too).

    Raises:
        ConstraintError: naming the tool and what is wrong with it.
    """
    if not isinstance(tools, list) or not tools:
        raise ConstraintError(f"tools must be a non-empty list of function tools; got {tools!r:.80}.")
    seen = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ConstraintError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}; got {tool!r:.80}.')
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        name = fn.get("name")
        if unknown or not isinstance(name, str) or not _NAME.fullmatch(name) or name in seen:
            why = f"unknown key(s) {unknown}" if unknown else "a duplicate name" if name in seen else \
                "a name of 1-64 letters, digits, '_' or '-' is required"
            raise ConstraintError(f"tools[{i}].function ({name!r}): {why}.")
        seen.add(name)
        if "parameters" in fn:
            check_json_schema(fn["parameters"], f"tools[{i}].function.parameters ({name})")
    return tools


def _renders_tools(tokenizer) -> bool:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
    if template not in _NATIVE:
        probe = [{"role": "user", "content": "hi"}]
        try:
            with_tools = tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL], tokenize=False)
        except Exception:  # jinja errors of every kind: a template that cannot take tools
            with_tools = None
        _NATIVE[template] = with_tools is not None and with_tools != tokenizer.apply_chat_template(probe, tokenize=False)
    return _NATIVE[template]


def tool_format_for(tokenizer, model_type: str | None) -> ToolFormat:
    """The format a model writes calls in: its family's (:data:`FAMILY_TOOL_FORMATS`) when its own
    chat template renders tools, else ``hermes``, which :func:`render` then explains to it."""
    if model_type in FAMILY_TOOL_FORMATS and _renders_tools(tokenizer):
        return TOOL_FORMATS[FAMILY_TOOL_FORMATS[model_type]]
    return TOOL_FORMATS["hermes"]


def _arguments(call: dict) -> tuple[str, dict | str]:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass  # kept as the text the client sent
    return fn.get("name", ""), args


def _call_text(fmt: ToolFormat, name: str, args) -> str:
    body = json.dumps({"name": name, fmt.arguments_key: args}, ensure_ascii=False)
    return f"{fmt.open_tag}\n{body}\n{fmt.close_tag}" if fmt.open_tag else body


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, *, model_type: str | None = None) -> list[int]:
    """Token ids of an OpenAI-style conversation (``tool_calls`` on assistant messages, ``tool``
    messages) with ``tools``, ready for the assistant's reply.

    The model's own chat template renders tools when it can (see :func:`tool_format_for`);
    otherwise the tools are described in a system message and past calls and results are written
    as ``<tool_call>`` / ``<tool_response>`` text, so any chat template renders them.

    Raises:
        ConstraintError: invalid ``tools`` (see :func:`check_tools`).
    """
    if tools:
        check_tools(tools)
    native = bool(tools) and model_type in FAMILY_TOOL_FORMATS and _renders_tools(tokenizer)
    fmt = tool_format_for(tokenizer, model_type) if native else TOOL_FORMATS["hermes"]
    out: list[dict] = []
    names: dict = {}  # tool_call_id -> function name, for the results that answer them
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [_arguments(c) for c in m["tool_calls"]]
            names.update((c.get("id"), n) for c, (n, _) in zip(m["tool_calls"], calls))
            if native:  # ids kept: some templates (Mistral's) write them
                m["tool_calls"] = [{**({"id": c["id"]} if c.get("id") else {}), "type": "function",
                                    "function": {"name": n, "arguments": a}} for c, (n, a) in zip(m["tool_calls"], calls)]
                m["content"] = m.get("content") or ""
            else:
                m["content"] = "\n".join(filter(None, [m.get("content")] + [_call_text(fmt, n, a) for n, a in calls]))
                del m["tool_calls"]
        elif m.get("role") == "tool" and not native:
            # Plain words, not Hermes' <tool_response> tags: a model that was never taught tools
            # answers from "X returned: ..." and tends to echo the tags back (SmolLM2-135M does).
            name = names.get(m.get("tool_call_id")) or m.get("name") or "the"
            m = {"role": "user", "content": f"The {name} tool returned: {m.get('content') or ''}"}
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if tools and not native:
        described = HERMES_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    extra = {"tools": tools} if native else {}
    encoded = tokenizer.apply_chat_template(out, add_generation_prompt=True, tokenize=True, return_dict=True, **extra)
    return list(encoded["input_ids"])


def _as_call(fmt: ToolFormat, obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _parse_objects(fmt: ToolFormat, text: str) -> list[ToolCall] | None:
    """The calls in ``text`` (JSON objects, separated by whitespace or ``;``), or None if it holds anything else."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        try:
            obj, end = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = _as_call(fmt, obj)
        if call is None:
            return None
        calls.append(call)
        at = end
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
    return calls or None


def parse(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a whole reply; text that does not parse as a call stays content."""
    stream = ToolCallStream(fmt)
    events = stream.feed(text) + stream.finish()
    content = "".join(e for kind, e in events if kind == "content")
    return content.strip() if any(kind == "call" for kind, _ in events) else content, \
        [e for kind, e in events if kind == "call"]


class ToolCallStream:
    """Splits a reply, piece by piece, into ``("content", text)`` and ``("call", ToolCall)`` events.

    Content is passed on at once, except a tail that may still open a call. A call is passed on
    once it is complete (its closing tag, or the end of the reply), so its arguments arrive whole.

    Args:
        fmt: the model's :class:`ToolFormat`.
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._buffer = ""
        self._in_call = False
        self._whole = fmt.open_tag is None  # llama3_json: the reply is a call iff it starts with "{"
        self._decided = not self._whole

    def feed(self, text: str) -> list[tuple[str, object]]:
        """The events ``text`` completes."""
        self._buffer += text
        if not self._decided:
            head = self._buffer.lstrip()
            if not head:
                return []
            self._decided, self._in_call = True, head.startswith("{")
        if self._whole:
            if self._in_call:
                return []  # held to the end: the whole reply is the call
            out, self._buffer = self._buffer, ""
            return [("content", out)] if out else []
        return self._split()

    def _split(self) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        open_tag, close_tag = self.fmt.open_tag, self.fmt.close_tag
        while True:
            if self._in_call:
                end = self._buffer.find(close_tag)
                if end < 0:
                    return events
                events += self._call(self._buffer[:end], raw=open_tag + self._buffer[: end + len(close_tag)])
                self._buffer, self._in_call = self._buffer[end + len(close_tag):], False
                continue
            start = self._buffer.find(open_tag)
            if start >= 0:
                if start:
                    events.append(("content", self._buffer[:start]))
                self._buffer, self._in_call = self._buffer[start + len(open_tag):], True
                continue
            hold = next((k for k in range(min(len(open_tag) - 1, len(self._buffer)), 0, -1)
                         if self._buffer.endswith(open_tag[:k])), 0)
            shown = self._buffer[: len(self._buffer) - hold]
            if shown:
                events.append(("content", shown))
            self._buffer = self._buffer[len(shown):]
            return events

    def _call(self, body: str, raw: str) -> list[tuple[str, object]]:
        calls = _parse_objects(self.fmt, body)
        return [("call", c) for c in calls] if calls else [("content", raw)]

    def finish(self) -> list[tuple[str, object]]:
        """The events of what is still held, at the end of the reply (an unclosed call is parsed as is)."""
        rest, self._buffer = self._buffer, ""
        if not rest:
            return []
        if self._in_call:
            return self._call(rest, raw=rest if self._whole else self.fmt.open_tag + rest)
        return [("content", rest)]


def _answer_schema(response_format: dict) -> dict:
    """The JSON schema a ``json_object`` / ``json_schema`` response format asks for."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if kind == "json_schema" and isinstance(spec, dict) and "schema" in spec:
        return check_json_schema(spec["schema"], "response_format.json_schema.schema")
    raise ConstraintError(f"with tools and tool_choice 'auto', response_format must be json_object or json_schema "
                          f"(the reply is a tool call or that JSON); got type {kind!r}.")


def call_format(tools: list[dict], fmt: ToolFormat, *, name: str | None = None, parallel: bool = True,
                or_response_format: dict | None = None) -> dict:
    """The ``response_format`` (a Lark grammar) whose every output is a valid call of one of
    ``tools`` (or of the tool named ``name``), arguments matching its ``parameters`` schema.

    Args:
        tools: OpenAI tools (checked).
        fmt: the model's :class:`ToolFormat`.
        name: only this tool may be called.
        parallel: allow several calls in a row (tag formats only; ``llama3_json`` writes one).
        or_response_format: a ``json_object`` / ``json_schema`` response format the reply may
            follow instead of calling a tool.

    Raises:
        ConstraintError: invalid tools, ``name`` is not one of them, or an alternative that is not JSON.
    """
    check_tools(tools)
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not fns:
        raise ConstraintError(f"tool_choice names {name!r}, which is not one of the tools "
                              f"{[t['function']['name'] for t in tools]}.")
    shapes = [{"type": "object", "properties": {
        "name": {"const": fn["name"]},
        fmt.arguments_key: fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False},
    }, "required": ["name", fmt.arguments_key], "additionalProperties": False} for fn in fns]
    rules = [f"body: %json {json.dumps({'anyOf': shapes, 'x-guidance': JSON_OPTIONS})}"]
    if fmt.open_tag is None:
        calls = "body"
    else:
        more = ' ("\\n" call)*' if parallel else ""  # Lark: a newline between calls
        calls = f"call{more}"
        rules.append(f"call: {json.dumps(fmt.open_tag + chr(10))} body {json.dumps(chr(10) + fmt.close_tag)}")
    start = f"start: {calls}"
    if or_response_format is not None:
        start += " | answer"
        rules.append(f"answer: %json {json.dumps({**_answer_schema(or_response_format), 'x-guidance': JSON_OPTIONS})}")
    return {"type": "grammar", "syntax": "lark", "grammar": "\n".join([start, *rules])}

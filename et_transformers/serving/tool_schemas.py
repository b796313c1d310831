"""The tool-call parts of the server's wire format (:mod:`.schemas` has the rest): the tools a
request offers, the calls a conversation carries, and the calls a reply makes, whole and as
streamed deltas, in OpenAI's shapes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

# -- requests ------------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    """A function call in an assistant message: the name and the arguments as a JSON string."""

    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCallParam(BaseModel):
    """A tool call the assistant made earlier in the conversation."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    """A function the model may call: its name, description and parameters' JSON schema."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """An entry of ``tools``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    """The function a named ``tool_choice`` forces."""

    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


# -- responses -----------------------------------------------------------------------------------


class FunctionCallOut(BaseModel):
    """The function a reply calls, with its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """A tool call of a reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _OmitNone(BaseModel):
    """Serialized without its unset (None) fields: OpenAI's tool-call deltas leave out what a chunk
    does not add (``{"index": 0, "function": {"arguments": "..."}}``), and clients that append each
    delta's ``name`` to the call's would append ``null``."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_OmitNone):
    """What a chunk adds to a streamed tool call's function."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_OmitNone):
    """What a chunk adds to the reply's ``index``-th tool call (its first chunk carries id and name)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

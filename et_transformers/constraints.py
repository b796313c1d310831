"""Structured output: a ``response_format`` becomes a grammar mask on the logits, and ends generation
when the grammar is complete.

:func:`grammar_for` turns every accepted form (a JSON schema dict or pydantic class, OpenAI's
``json_schema`` / ``json_object``, ``regex``, ``choice``, a Lark or GBNF ``grammar``) into one
llguidance grammar; :class:`GrammarLogitsProcessor` compiles it against the tokenizer's vocabulary
(llguidance, the only importer of it) and, each step, sets every token the grammar does not allow to
``-inf``; its :attr:`~GrammarLogitsProcessor.stopping_criteria` ends generation once nothing but
end-of-sequence can follow. The processor is a plain transformers ``LogitsProcessor`` (it works in
eager transformers' ``generate()`` too) whose state is a function of the ids it is shown: it
rolls back when they do not extend what it consumed (a draft model's proposals, the next row of a
batch), so assisted generation and batches need nothing special. Everything that can be checked
before the program runs is: the format's keys, the schema against its metaschema, the grammar's
compilation, and whether the vocabulary can spell the text the grammar forces at the start.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from copy import copy
from typing import Any

import numpy as np
import torch
from transformers.generation.logits_process import LogitsProcessor
from transformers.generation.stopping_criteria import StoppingCriteria

from .errors import ConstraintError

logger = logging.getLogger(__name__)

#: ``response_format`` types and the keys each takes besides ``type`` (required ones first).
FORMAT_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": ((), ()),
    "json_object": ((), ()),
    "json_schema": (("json_schema",), ()),
    "regex": (("pattern",), ()),
    "choice": (("choices",), ()),
    "grammar": (("grammar",), ("syntax",)),
}
#: Keys of OpenAI's ``json_schema`` object.
JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
#: Grammar syntaxes llguidance takes: Lark (its native one) and llama.cpp's GBNF (converted to Lark).
GRAMMAR_SYNTAXES = ("lark", "gbnf")
#: How JSON is written under a schema: one canonical form, as ``json.dumps`` writes it. Free
#: whitespace would let a small model loop on newlines forever; this keeps every output parseable.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: JSON Schema's type names (a dict whose ``type`` is one of them is a schema, not a response_format).
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_NEG_INF_BITS = np.float32(-np.inf).view(np.int32)
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> {key: LLTokenizer}
_LOCK = threading.Lock()  # the caches below are shared by the server's worker threads


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(
            "structured output (response_format, tool calls) needs llguidance: "
            "pip install 'et-transformers[structured]'"
        ) from e
    return llguidance


def json_schema_of(value) -> dict | None:
    """``value`` as a JSON schema dict when it is one (a dict that is not a ``response_format``, or a
    pydantic model class); else None."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.model_json_schema()
    if not isinstance(value, dict) or value.get("type") in FORMAT_KEYS:
        return None
    kind = value.get("type")
    if isinstance(kind, str) and kind not in JSON_TYPES:
        raise ConstraintError(
            f"response_format type {kind!r} is not valid: use one of {list(FORMAT_KEYS)}, or pass a JSON schema "
            f"(whose type is one of {list(JSON_TYPES)})."
        )
    return value


def check_json_schema(schema: Any, where: str = "the JSON schema") -> dict:
    """``schema`` checked against its JSON Schema metaschema (draft from ``$schema``, else 2020-12).

    Raises:
        ConstraintError: not a dict, or not a valid schema (the message names the failing part).
    """
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where} must be a JSON object (a dict); got {type(schema).__name__} {schema!r:.80}.")
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError as e:
        raise ImportError("JSON schemas need jsonschema: pip install 'et-transformers[structured]'") from e
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        path = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise ConstraintError(f"{where} is not a valid JSON schema at {path}: {e.message}.") from e
    return schema


def _json_grammar(schema: dict) -> str:
    return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _check_keys(rf: dict, kind: str) -> None:
    required, optional = FORMAT_KEYS[kind]
    missing = [k for k in required if k not in rf]
    unknown = sorted(set(rf) - {"type", *required, *optional})
    if missing or unknown:
        what = " and ".join(([f"misses {missing}"] if missing else []) + ([f"has unknown key(s) {unknown}"] if unknown else []))
        takes = ", ".join(["type", *required, *(f"{k} (optional)" for k in optional)])
        raise ConstraintError(f"response_format of type {kind!r} {what}; it takes {takes}.")


def grammar_for(response_format) -> str | None:
    """The llguidance grammar (a JSON string) of ``response_format``; None for ``{"type": "text"}``.

    Args:
        response_format: a JSON schema (dict, or a pydantic model class); or a dict with ``type``:
            ``"json_schema"`` (OpenAI's: ``{"json_schema": {"name", "schema", "strict"}}``; the
            schema is enforced whatever ``strict`` says: ``false`` too),
            ``"json_object"`` (any JSON object), ``"regex"`` (``pattern``), ``"choice"``
            (``choices``: strings), ``"grammar"`` (``grammar`` text, ``syntax`` ``"lark"``
            (default) or ``"gbnf"``), ``"text"`` (no constraint).

    Raises:
        ConstraintError: an unknown type or key, a missing key, a value of the wrong kind, or an
            invalid JSON schema.
    """
    ll = _llguidance()
    schema = json_schema_of(response_format)
    if schema is not None:
        return _json_grammar(check_json_schema(schema))
    if not isinstance(response_format, dict):
        raise ConstraintError(
            f"response_format={response_format!r:.80} is not valid: pass a JSON schema (dict or pydantic model "
            f"class) or a dict with type in {list(FORMAT_KEYS)}."
        )
    kind = response_format.get("type")
    _check_keys(response_format, kind)
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format["json_schema"]
        if not isinstance(spec, dict) or "schema" not in spec or set(spec) - JSON_SCHEMA_KEYS:
            raise ConstraintError(
                f"response_format.json_schema must be an object with 'schema' (and optionally 'name', 'strict', "
                f"'description'); got {spec!r:.120}."
            )
        if "strict" in spec and not isinstance(spec["strict"], bool):
            raise ConstraintError(f"response_format.json_schema.strict must be true or false; got {spec['strict']!r}.")
        return _json_grammar(check_json_schema(spec["schema"], "response_format.json_schema.schema"))
    if kind == "regex":
        pattern = response_format["pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError(f"response_format.pattern must be a non-empty regular expression; got {pattern!r}.")
        return ll.LLMatcher.grammar_from_regex(pattern)
    if kind == "choice":
        choices = response_format["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError(f"response_format.choices must be a non-empty list of non-empty strings; got {choices!r:.120}.")
        return ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    text, syntax = response_format["grammar"], response_format.get("syntax", "lark")
    if syntax not in GRAMMAR_SYNTAXES:
        raise ConstraintError(f"response_format.syntax={syntax!r} is not supported; use one of {list(GRAMMAR_SYNTAXES)}.")
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(f"response_format.grammar must be the grammar's text; got {text!r:.80}.")
    if syntax == "gbnf":
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            text = any_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions of several kinds
            raise ConstraintError(f"response_format.grammar is not valid GBNF: {e}") from e
    return ll.LLMatcher.grammar_from_lark(text)


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of ``tokenizer`` (its vocabulary as bytes), built once per tokenizer,
    vocabulary size and end-of-sequence ids (building one takes about 0.7 s for 49k tokens).

    Raises:
        ConstraintError: the tokenizer is not a fast (``tokenizers``-backed) one.
    """
    key = (vocab_size, eos_ids)
    with _LOCK:
        return _ll_tokenizer(tokenizer, key)


def _ll_tokenizer(tokenizer, key):
    per = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in per:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ConstraintError(
                f"structured output needs a fast tokenizer (with a tokenizer.json); {type(tokenizer).__name__} has none."
            )
        backend = copy(backend)  # to_str() would serialize padding/truncation settings: drop them
        backend.no_padding()
        backend.no_truncation()
        per[key] = _llguidance().LLTokenizer(backend.to_str(), n_vocab=key[0], eos_token=list(key[1]))
    return per[key]


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next (a transformers ``LogitsProcessor``).

    Args:
        response_format: anything :func:`grammar_for` takes (not ``{"type": "text"}``).
        tokenizer: the model's (fast) tokenizer.
        vocab_size: width of the logits (default: the tokenizer's length).
        eos_token_id: id(s) that end a sequence; allowed where the grammar may end (default: the
            tokenizer's).
        prompt_length: tokens of ``input_ids`` before the generated ones (default: the length of
            the first call's ``input_ids``, as transformers' first processor call shows the prompt).
        pad_token_id: what a batch feeds a row after it stopped (default: the tokenizer's); a run
            of it the grammar does not allow at the end of the ids is taken as that padding, not
            as a token to consume.

    Attributes:
        stopping_criteria: a ``StoppingCriteria`` that ends generation when the grammar is complete.

    Raises:
        ConstraintError: see :func:`grammar_for`; the grammar does not compile (the library's
            message); or the vocabulary cannot spell the text the grammar starts with.
    """

    def __init__(self, response_format, tokenizer, *, vocab_size: int | None = None, eos_token_id=None,
                 prompt_length: int | None = None, pad_token_id: int | None = None):
        grammar = grammar_for(response_format)
        if grammar is None:
            raise ConstraintError('response_format {"type": "text"} puts no constraint: pass none instead.')
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        if not eos_ids:
            raise ConstraintError("structured output needs an end-of-sequence token: pass eos_token_id.")
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.tokenizer = tokenizer
        self.ll_tokenizer = ll_tokenizer(tokenizer, self.vocab_size, eos_ids)
        self.matcher = _compile(self.ll_tokenizer, grammar)
        self.eos_ids = eos_ids
        self.prompt_length = prompt_length
        self.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else int(pad_token_id)
        self._prompt: list[int] | None = None  # the prompt the consumed tokens follow
        self._consumed: list[int] = []
        self._mask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        self._check_spelling()
        self.stopping_criteria = _GrammarComplete(self)

    def _check_spelling(self) -> None:
        """Raise unless the vocabulary can spell the bytes the grammar forces at the start."""
        forced = self.matcher.compute_ff_bytes()
        spelled = self.ll_tokenizer.decode_bytes(self.ll_tokenizer.tokenize_bytes(forced)) if forced else b""
        if spelled != forced:
            at = next((i for i, (a, b) in enumerate(zip(forced, spelled)) if a != b), min(len(forced), len(spelled)))
            raise ConstraintError(
                f"the output must start with {forced.decode(errors='replace')!r}, but this tokenizer's vocabulary "
                f"cannot spell {forced[at:at + 1].decode(errors='replace')!r} (byte {at}). Change the format, or "
                f"use a tokenizer whose vocabulary has that character."
            )
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        self._fill(self._mask)

    def _fill(self, mask: np.ndarray) -> None:
        """Raise when ``mask`` allows nothing (or only an end the grammar does not accept)."""
        if self.matcher.is_error():
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()}")
        if not mask.any():
            text = self.ll_tokenizer.decode_str(self._consumed)
            raise ConstraintError(
                f"no token of this vocabulary can continue {text!r} under the grammar (it needs a character "
                f"the vocabulary cannot spell). Change the format, or use a tokenizer that can spell it."
            )

    @property
    def is_complete(self) -> bool:
        """True when nothing but end-of-sequence can follow the tokens consumed so far."""
        return self.matcher.is_stopped()

    def sync(self, input_ids: torch.Tensor) -> None:
        """Make the matcher's state the one after ``input_ids`` ``[1, L]``: roll back what it consumed
        beyond their common prefix, consume the rest (a new prompt starts over).

        Raises:
            ConstraintError: a token the grammar does not allow (another processor or criterion
                changed the choice), or a batch of several rows.
        """
        if input_ids.shape[0] != 1:
            raise ConstraintError(f"GrammarLogitsProcessor follows one sequence; got a batch of {input_ids.shape[0]}.")
        ids = input_ids[0].tolist()
        if self.prompt_length is None:
            self.prompt_length = len(ids)
        prompt, new = ids[: self.prompt_length], ids[self.prompt_length :]
        if prompt != self._prompt:  # another row, or another call: start over
            self._prompt, self._consumed = prompt, []
            self.matcher.reset()
        done = self._consumed
        keep = 0
        for a, b in zip(done, new):
            if a != b:
                break
            keep += 1
        if keep < len(done):
            self.matcher.rollback(len(done) - keep)
            del done[keep:]
        for i, token in enumerate(new[keep:], start=keep):
            if self.matcher.is_stopped():
                break  # complete: whatever follows (end-of-sequence, padding) is past the grammar
            if token == self.pad_token_id and all(t == token for t in new[i:]) and not self.matcher.validate_tokens([token]):
                # A row stopped early (a stop string, a length) that its batch runs on with padding,
                # as transformers does: the padding is past the row's text, not a choice to check.
                break
            if not self.matcher.consume_token(token):
                raise ConstraintError(
                    f"token {token} ({self.tokenizer.decode([token])!r}) after {self.ll_tokenizer.decode_str(done)!r} "
                    f"is not allowed by the grammar: another logits processor put it back (e.g. min_new_tokens "
                    f"against a complete grammar). {self.matcher.get_error()}"
                )
            done.append(token)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores`` ``[1, V]`` with every token the grammar does not allow after ``input_ids`` at ``-inf``
        (a new tensor)."""
        self.sync(input_ids)
        mask = self._mask  # when the grammar is complete, llguidance allows the end-of-sequence ids only
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        self._fill(mask)
        allowed = np.unpackbits(mask.view(np.uint8), count=scores.shape[-1], bitorder="little")  # [V] 0/1
        # -inf where a bit is 0, 0.0 where it is 1, by bit pattern: one branch-free pass (a boolean
        # fill costs ~8x more on 49k tokens, as the mispredicted branches add up).
        penalty = allowed.astype(np.int32)
        penalty -= 1
        penalty &= _NEG_INF_BITS
        return scores + torch.from_numpy(penalty.view(np.float32)).to(scores.dtype)


class _GrammarComplete(StoppingCriteria):
    """Ends generation when the grammar is complete (finish reason ``"grammar"``)."""

    finish_reason = "grammar"

    def __init__(self, processor: GrammarLogitsProcessor):
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.processor.sync(input_ids)
        return torch.tensor([self.processor.is_complete])


_COMPILED: dict[tuple[int, str], tuple[Any, Any]] = {}  # (id of LLTokenizer, grammar) -> (LLTokenizer, matcher)
_MAX_COMPILED = 64


def _compile(lltok, grammar: str):
    """A fresh matcher of ``grammar`` (compiled once per tokenizer, then copied).

    Raises:
        ConstraintError: the grammar does not compile (llguidance's message: the rule or schema part).
    """
    key = (id(lltok), grammar)
    with _LOCK:
        return _compiled(key, lltok, grammar).deep_copy()


def _compiled(key, lltok, grammar: str):
    if key not in _COMPILED:
        ll = _llguidance()
        matcher = ll.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            message = re.sub(r"\s+", " ", matcher.get_error()).strip()
            raise ConstraintError(f"the response format does not compile: {message}")
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = (lltok, matcher)  # holding lltok keeps its id from being reused
    return _COMPILED[key][1]

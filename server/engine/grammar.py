"""Structured output: a request's grammar, compiled once per distinct spec, matched per sequence.

The engine is llguidance. bench/grammar.py measured it beside xgrammar on this workload: it compiles a
schema about ten times faster, fills masks about as fast (both are far below the forward pass and the
mask's own application), and, unlike xgrammar, it refuses a JSON schema keyword it does not enforce
("uniqueItems", "not", an unknown format, an overlapping oneOf, ...) instead of dropping it; xgrammar
silently ignores some of those and some combinations (maxLength beside pattern or format, multipleOf
beside a range). So an output here never ignores part of its schema: what cannot be enforced is a 400
naming it.

Compiling (building a first matcher, which checks the grammar against the vocabulary, and its first mask,
where llguidance's complexity limits would otherwise first fail after the 200 went out) runs once per
distinct grammar text on the caller's thread, the HTTP preparation pool, never in a step: the result, or
the refusal, is cached by the text's hash, and identical requests arriving together wait for one compile.
Each sequence gets a copy of that matcher.
Per step, each constrained row fills its row of a packed bitmask (logit_adjust applies it to the logits
in one op) and consumes the token it got.

JSON is generated compact (no optional whitespace), and an object schema with `properties` that says
nothing of additionalProperties gets none: the output stays valid for the schema and has no invented keys.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from quiver.server.engine.sampling import InvalidParam

JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to follow. kind: "json" (text: a schema, or None for any JSON
    value), "regex", "choice" (text: a JSON list of strings) or "grammar" (Lark, or GBNF as llama.cpp and
    xgrammar write it); param: the request field it came from, named in errors."""
    kind: str
    text: str | None
    param: str


def refuse(param: str, message: str) -> InvalidParam:
    """The error for a constraint at `param` (a path such as response_format.json_schema.schema): it names
    the request's top-level field, and the message the whole path."""
    return InvalidParam(re.split(r"[.\[]", param)[0], f"{param} {message}")


def json_spec(schema, param: str) -> GrammarSpec:
    if schema is None:
        return GrammarSpec("json", None, param)
    if not isinstance(schema, (dict, bool)):
        raise refuse(param, "must be a JSON schema (an object)")
    return GrammarSpec("json", json.dumps(no_invented_keys(schema)), param)


SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
SUBSCHEMAS = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
              "not", "if", "then", "else", "contains", "propertyNames")


def no_invented_keys(schema):
    """A copy of `schema` where objects with `properties` and no word on other keys allow no others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if "properties" in node and not {"additionalProperties", "patternProperties",
                                         "unevaluatedProperties"} & node.keys():
            node["additionalProperties"] = False
        for key in SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                for sub in node[key].values():
                    walk(sub)
        for key in SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                for sub in node[key]:
                    walk(sub)
        for key in SUBSCHEMAS:
            walk(node.get(key))
    walk(schema)
    return schema


class Grammars:
    """Compiles request grammars for one tokenizer; thread-safe, built on first use (reading the
    vocabulary takes a fraction of a second)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None):
        self._args = tokenizer, vocab_size, eos_token_id
        self._tokenizer = None
        self._cache: OrderedDict[bytes, Future] = OrderedDict()  # by the text's hash: a grammar or a refusal
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                tokenizer, vocab_size, eos = self._args
                self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> "CompiledGrammar":
        """The spec's compiled grammar; raises InvalidParam naming spec.param for one that cannot be used."""
        key = hashlib.sha256(f"{spec.kind}\0{spec.text}".encode()).digest()
        with self._lock:
            future, owner = self._cache.get(key), False
            if future is None:
                future, owner = Future(), True
                self._cache[key] = future
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        if owner:
            try:
                future.set_result(self._compile(spec))
            except InvalidParam as exc:  # kept: every request with this text gets the same refusal
                future.set_result(exc)
            except BaseException as exc:  # not kept: the next request tries again
                with self._lock:
                    self._cache.pop(key, None)
                future.set_exception(exc)
        result = future.result()
        if isinstance(result, InvalidParam):  # named for this request's field
            raise refuse(spec.param, str(result)) from None
        return result

    def _compile(self, spec: GrammarSpec) -> "CompiledGrammar":
        """One compile: the matcher, then its first mask (a complexity limit would fail there)."""
        import llguidance.torch
        from llguidance import LLMatcher

        try:
            grammar = self._grammar(spec)
        except (ValueError, RuntimeError) as exc:  # a grammar the engine cannot read is the request's error
            raise InvalidParam("", f"cannot be used for structured output: {first_line(str(exc))}") from None
        tokenizer = self._llg_tokenizer()
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            probe = matcher.deep_copy()
            llguidance.torch.fill_next_token_bitmask(probe, llguidance.torch.allocate_token_bitmask(
                1, tokenizer.vocab_size), 0)
            matcher = probe if probe.is_error() else matcher
        if matcher.is_error():
            raise InvalidParam("", f"cannot be used for structured output: {first_line(matcher.get_error())}")
        return CompiledGrammar(matcher)

    @staticmethod
    def _grammar(spec: GrammarSpec) -> str:
        import llguidance
        from llguidance import LLMatcher

        if spec.kind == "json":
            # no schema: json_object, which OpenAI defines as a JSON object
            return LLMatcher.grammar_from_json_schema(spec.text or '{"type": "object"}', defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "choice":
            alternatives = " | ".join(json.dumps(c) for c in json.loads(spec.text))
            return llguidance.grammar_from("lark", f"start: {alternatives}")
        text = spec.text
        if "::=" in text:  # GBNF
            from llguidance.gbnf_to_lark import gbnf_to_lark
            try:
                text = gbnf_to_lark(text)
            except Exception as exc:  # noqa: BLE001 - the converter's own errors are of several kinds
                raise ValueError(f"not a valid GBNF grammar: {exc}") from None
        return llguidance.grammar_from("lark", text)


def first_line(message: str) -> str:
    return (message.strip().splitlines() or ["invalid grammar"])[0][:300]


class CompiledGrammar:
    """A checked grammar, as a matcher at its start that every sequence copies."""

    def __init__(self, start):
        self._start = start

    def matcher(self) -> "Matcher":
        return Matcher(self._start.deep_copy())


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher):
        self._m = matcher

    def fill_bitmask(self, bitmask, row: int) -> None:
        """Write into row `row` of the [G, ceil(V / 32)] int32 bitmask the tokens allowed next."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)

    def accept(self, token: int) -> bool:
        return self._m.consume_token(token) and not self._m.is_error()

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but a stop token may follow."""
        return self._m.is_stopped()

"""Structured output: a request's grammar, compiled once per distinct spec, matched per sequence.

The engine is xgrammar (bench/grammar.py measured it against llguidance on this workload: it fills
masks faster, and its strict JSON keeps outputs valid for schemas that leave additionalProperties
open). Compiling runs on the caller's thread (the HTTP preparation pool), never in a step, and the
compiler caches by grammar text. Per step, each constrained row fills its row of a packed bitmask
(logit_adjust applies it to the logits in one op) and accepts the token it got.

A JSON schema keyword the engine would not enforce is refused by name (SUPPORTED_KEYWORDS), so an
output never silently ignores part of its schema.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from quiver.server.engine.sampling import InvalidParam

# JSON Schema keywords the grammar enforces (each checked to change the compiled grammar:
# tests/test_structured.py); annotations, which constrain nothing, are accepted as well. oneOf is
# enforced as anyOf: exact for disjoint branches (pydantic's discriminated unions).
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "unevaluatedProperties", "items", "prefixItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
    "pattern", "format", "minProperties", "maxProperties", "patternProperties", "propertyNames",
})
FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                     "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "discriminator"})
SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")  # name -> subschema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames")


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to follow. kind: "json" (text: a schema, or None for any JSON
    value), "regex", "choice" (text: a JSON list of strings) or "ebnf"; param: the request field it came
    from, named in errors."""
    kind: str
    text: str | None
    param: str


def json_spec(schema, param: str) -> GrammarSpec:
    if schema is not None:
        if not isinstance(schema, dict):
            raise InvalidParam(param, f"{param} must be a JSON object (a JSON schema)")
        check_schema(schema, param)
        schema = json.dumps(schema, sort_keys=True)
    return GrammarSpec("json", schema, param)


def check_schema(schema, param: str) -> None:
    """Refuse, by name, a keyword the grammar engine would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidParam(param, f"{param}: a schema must be an object or a boolean")
    for key, value in schema.items():
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key not in SUPPORTED_KEYWORDS:
            raise InvalidParam(param, f"{param}: the JSON schema keyword {key!r} is not supported for structured "
                                      "output")
        if key == "format" and value not in FORMATS:
            raise InvalidParam(param, f"{param}: the string format {value!r} is not supported for structured output "
                                      f"(supported: {', '.join(sorted(FORMATS))})")
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise InvalidParam(param, f"{param}: only references within the schema ('#/...') are supported")
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{param}.{key}.{name}")
        elif key in SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{param}.{key}[{i}]")
        elif key in SCHEMA_VALUES and isinstance(value, (dict, bool)):
            check_schema(value, f"{param}.{key}")


class Grammars:
    """The compiler for one tokenizer; thread-safe, built on first use (reading the vocabulary takes
    a fraction of a second)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self._args = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tokenizer, vocab_size, stop_ids = self._args
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> "CompiledGrammar":
        compiler = self._get()
        try:
            if spec.kind == "json":
                if spec.text is None:
                    return CompiledGrammar(compiler.compile_builtin_json_grammar())
                return CompiledGrammar(compiler.compile_json_schema(spec.text, any_whitespace=False, strict_mode=True))
            if spec.kind == "regex":
                return CompiledGrammar(compiler.compile_regex(spec.text))
            if spec.kind == "choice":
                choices = json.loads(spec.text)
                ebnf = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
                return CompiledGrammar(compiler.compile_grammar(ebnf))
            return CompiledGrammar(compiler.compile_grammar(spec.text))
        except (RuntimeError, ValueError) as exc:
            raise InvalidParam(spec.param, f"{spec.param} cannot be compiled: {first_line(exc)}") from None


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class CompiledGrammar:
    def __init__(self, compiled):
        self.compiled = compiled

    def matcher(self) -> "Matcher":
        return Matcher(self.compiled)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask, row: int) -> None:
        """Write into row `row` of the [G, ceil(V / 32)] int32 bitmask the tokens allowed next."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self._m.accept_token(token)

    @property
    def finished(self) -> bool:
        return self._m.is_terminated()

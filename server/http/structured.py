"""The request fields that constrain an output to a grammar, as one GrammarSpec (or none).

OpenAI's response_format (json_object, json_schema), vLLM's structured_outputs and its older guided_json,
guided_regex, guided_choice and guided_grammar all mean the same thing here: at most one of them per
request; a second is a 400 naming it. Tool calls with tool_choice "required" or a named function are
constrained the same way (tools.py builds their schema). Each text is bounded (--max-grammar-chars) before
anything reads it further: compiling takes superlinear time in it.
"""
from __future__ import annotations

import json

from quiver.server.engine.public import GrammarSpec, InvalidParam, json_spec, refuse


def _bounded(text: str, param: str, max_chars: int | None) -> str:
    if max_chars is not None and len(text) > max_chars:
        raise refuse(param, f"is {len(text)} characters long; at most {max_chars} (--max-grammar-chars)")
    return text


def _schema(value, param: str, max_chars: int | None):
    _bounded(value if isinstance(value, str) else json.dumps(value), param, max_chars)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise refuse(param, f"is not valid JSON: {exc}") from None
    return json_spec(value, param)


def _choice(values: list[str], param: str, max_chars: int | None) -> GrammarSpec:
    if not values or any(not v for v in values):
        raise refuse(param, "must list at least one non-empty string")
    return GrammarSpec("choice", _bounded(json.dumps(values), param, max_chars), param)


def _text(kind: str, value: str, param: str, max_chars: int | None) -> GrammarSpec:
    if not value:
        raise refuse(param, "must not be empty")
    return GrammarSpec(kind, _bounded(value, param, max_chars), param)


def _structured_outputs(so, max_chars: int | None) -> list[GrammarSpec]:
    found = []
    if so.json_ is not None:
        found.append(_schema(so.json_, "structured_outputs.json", max_chars))
    if so.regex is not None:
        found.append(_text("regex", so.regex, "structured_outputs.regex", max_chars))
    if so.choice is not None:
        found.append(_choice(so.choice, "structured_outputs.choice", max_chars))
    if so.grammar is not None:
        found.append(_text("ebnf", so.grammar, "structured_outputs.grammar", max_chars))
    if so.json_object:
        found.append(json_spec(None, "structured_outputs.json_object"))
    if not found:
        raise InvalidParam("structured_outputs", "structured_outputs names none of json, regex, choice, grammar, "
                                                 "json_object")
    return found


def grammar_spec(req, tool_spec: GrammarSpec | None = None, max_chars: int | None = None) -> GrammarSpec | None:
    """The one grammar the request's output must follow, or None; each text at most max_chars long."""
    found = [tool_spec] if tool_spec is not None else []
    if tool_spec is not None and tool_spec.text is not None:
        _bounded(tool_spec.text, "tools", max_chars)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(json_spec(None, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidParam("response_format", "response_format json_schema needs json_schema.schema")
        found.append(_schema(rf.json_schema.schema_, "response_format.json_schema.schema", max_chars))
    if req.structured_outputs is not None:
        found += _structured_outputs(req.structured_outputs, max_chars)
    if req.guided_json is not None:
        found.append(_schema(req.guided_json, "guided_json", max_chars))
    if req.guided_regex is not None:
        found.append(_text("regex", req.guided_regex, "guided_regex", max_chars))
    if req.guided_choice is not None:
        found.append(_choice(req.guided_choice, "guided_choice", max_chars))
    if req.guided_grammar is not None:
        found.append(_text("ebnf", req.guided_grammar, "guided_grammar", max_chars))
    if len(found) > 1:
        first = "tool_choice" if tool_spec is not None else found[0].param
        raise refuse(found[1].param, f"and {first} both constrain the output; a request may use one")
    return found[0] if found else None

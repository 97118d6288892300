"""The request fields that constrain an output to a grammar, as one GrammarSpec (or none).

OpenAI's response_format (json_object, json_schema), vLLM's structured_outputs and its older guided_json,
guided_regex, guided_choice and guided_grammar all mean the same thing here: at most one of them per
request; a second is a 400 naming it. Tool calls with tool_choice "required" or a named function are
constrained the same way (tools.py builds their schema).
"""
from __future__ import annotations

import json

from quiver.server.engine.public import GrammarSpec, InvalidParam, json_spec, refuse


def _schema(value, param: str):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise refuse(param, f"is not valid JSON: {exc}") from None
    return json_spec(value, param)


def _choice(values: list[str], param: str) -> GrammarSpec:
    if not values or any(not v for v in values):
        raise refuse(param, "must list at least one non-empty string")
    return GrammarSpec("choice", json.dumps(values), param)


def _text(kind: str, value: str, param: str) -> GrammarSpec:
    if not value:
        raise refuse(param, "must not be empty")
    return GrammarSpec(kind, value, param)


def _structured_outputs(so) -> list[GrammarSpec]:
    found = []
    if so.json_ is not None:
        found.append(_schema(so.json_, "structured_outputs.json"))
    if so.regex is not None:
        found.append(_text("regex", so.regex, "structured_outputs.regex"))
    if so.choice is not None:
        found.append(_choice(so.choice, "structured_outputs.choice"))
    if so.grammar is not None:
        found.append(_text("ebnf", so.grammar, "structured_outputs.grammar"))
    if so.json_object:
        found.append(json_spec(None, "structured_outputs.json_object"))
    if not found:
        raise InvalidParam("structured_outputs", "structured_outputs names none of json, regex, choice, grammar, "
                                                 "json_object")
    return found


def grammar_spec(req, tool_spec: GrammarSpec | None = None) -> GrammarSpec | None:
    """The one grammar the request's output must follow, or None."""
    found = [tool_spec] if tool_spec is not None else []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(json_spec(None, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidParam("response_format", "response_format json_schema needs json_schema.schema")
        found.append(_schema(rf.json_schema.schema_, "response_format.json_schema.schema"))
    if req.structured_outputs is not None:
        found += _structured_outputs(req.structured_outputs)
    if req.guided_json is not None:
        found.append(_schema(req.guided_json, "guided_json"))
    if req.guided_regex is not None:
        found.append(_text("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        found.append(_choice(req.guided_choice, "guided_choice"))
    if req.guided_grammar is not None:
        found.append(_text("ebnf", req.guided_grammar, "guided_grammar"))
    if len(found) > 1:
        first = "tool_choice" if tool_spec is not None else found[0].param
        raise refuse(found[1].param, f"and {first} both constrain the output; a request may use one")
    return found[0] if found else None

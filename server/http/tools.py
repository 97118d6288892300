"""Tool calls for chat: what the request's tools and tool_choice ask for, and the model's output read
back as OpenAI tool_calls, whole or as streamed deltas.

  none      the tools go to the chat template; the output is a plain message
  required  the output is constrained to a JSON array of {"name", "parameters"} objects, one schema per
            tool (one object at most with parallel_tool_calls false); each becomes a tool call
  named     the output is constrained to that function's parameters schema: it is the arguments
  auto      free text, read with the tool-call format of the model's chat template (Hermes'
            <tool_call>{"name": ..., "arguments": ...}</tool_call>, or --tool-call-parser)

Required or named output cut short (max_tokens, a stop string) is unfinished JSON: all of it comes back as
content, beside the calls that finished before it (a stream has already sent a named call's arguments so far).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from quiver.server.engine.public import GrammarSpec, InvalidParam, json_spec

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PARSERS = ("hermes",)


def template_parser(chat_template: str | None) -> str | None:
    """The tool-call format a chat template writes, when it writes a known one."""
    return "hermes" if chat_template and HERMES_OPEN in chat_template else None


@dataclass
class ToolPlan:
    mode: str  # none, auto, required, named
    tools: list[dict]  # as the chat template takes them
    name: str | None = None  # the named function
    grammar: GrammarSpec | None = None
    parser: str | None = None  # auto's format


def plan_tools(req, parser: str | None) -> ToolPlan | None:
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise InvalidParam("tool_choice", "tool_choice needs tools")
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    params = {t.function.name: t.function.parameters or {"type": "object", "properties": {}} for t in req.tools}
    if len(params) != len(tools):
        raise InvalidParam("tools", "tools has two functions of the same name")
    for i, (name, schema) in enumerate(params.items()):
        json_spec(schema, f"tools[{i}].function.parameters")  # refused here, by name, if not servable
    choice = req.tool_choice or "auto"
    if choice == "none":
        return ToolPlan("none", tools)
    if choice == "auto":
        if parser is None:
            raise InvalidParam("tool_choice", "tool_choice auto needs a tool-call format: this model's chat template "
                                              "defines none (start the server with --tool-call-parser), or use "
                                              "tool_choice required or a named function")
        return ToolPlan("auto", tools, parser=parser)
    if choice == "required":
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
             "required": ["name", "parameters"]} for name, schema in params.items()]}}
        if not req.parallel_tool_calls:
            calls["maxItems"] = 1
        return ToolPlan("required", tools, grammar=json_spec(calls, "tools"))
    name = choice.function.name
    if name not in params:
        raise InvalidParam("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
    return ToolPlan("named", tools, name=name, grammar=json_spec(params[name], "tools"))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolOutput:
    """One choice's output read as content and tool calls. feed() takes new text and returns the deltas
    it completes (for streaming); finish() the rest; content and calls hold the whole message."""
    plan: ToolPlan
    content: str = ""
    calls: list[dict] = field(default_factory=list)
    _pending: str = ""
    _in_call: bool = False
    _scan: tuple = (0, 0, False, False, -1)  # required: position, depth, in string, escaped, element start

    def feed(self, text: str) -> list[dict]:
        self._pending += text
        if self.plan.mode == "named":
            return self._named()
        if self.plan.mode == "required":
            return self._required()
        if self.plan.mode == "auto":
            return self._hermes(final=False)
        return self._content(self._take())

    def finish(self) -> list[dict]:
        if self.plan.mode == "auto":
            return self._hermes(final=True)
        if self.plan.mode == "none":
            return self._content(self._take())
        return self._unfinished()

    @property
    def finish_reason(self) -> str | None:
        return "tool_calls" if self.calls and self.plan.mode in ("auto", "required") else None

    # ---- the modes -------------------------------------------------------------------------
    def _take(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _content(self, text: str) -> list[dict]:
        self.content += text
        return [{"content": text}] if text else []

    def _announce(self, name: str, arguments: str) -> list[dict]:
        self.calls.append(call(name, arguments))
        first = {"index": len(self.calls) - 1, **call(name, arguments), "id": self.calls[-1]["id"]}
        return [{"tool_calls": [first]}]  # its own dicts: the call's arguments may still grow

    def _named(self) -> list[dict]:
        text = self._take()
        if not self.calls:
            return self._announce(self.plan.name, text)
        if not text:
            return []
        self.calls[0]["function"]["arguments"] += text
        return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]

    def _unfinished(self) -> list[dict]:
        """Required or named output that the grammar had not finished: the whole text, as content."""
        if self.plan.mode == "required":
            depth = self._scan[1]
            return self._content(self._pending) if depth or not self.calls else []
        arguments = self.calls[0]["function"]["arguments"] if self.calls else ""
        try:
            json.loads(arguments)
            return []
        except json.JSONDecodeError:
            self.calls.clear()  # never a call with broken arguments
            return self._content(arguments)

    def _required(self) -> list[dict]:
        """The output is a JSON array (the grammar sees to it): each object that closes is a call."""
        buf, out = self._pending, []
        pos, depth, in_str, esc, start = self._scan
        for i in range(pos, len(buf)):
            c = buf[i]
            if in_str:
                esc, in_str = (False, True) if esc else (c == "\\", c != '"')
            elif c == '"':
                in_str = True
            elif c in "[{":
                depth += 1
                start = i if depth == 2 else start
            elif c in "]}":
                depth -= 1
                if depth == 1 and c == "}":
                    item = json.loads(buf[start:i + 1])
                    out += self._announce(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
        self._scan = len(buf), depth, in_str, esc, start
        return out

    def _hermes(self, final: bool) -> list[dict]:
        out = []
        while True:
            if self._in_call:
                end = self._pending.find(HERMES_CLOSE)
                if end == -1 and not final:
                    return out
                body = self._pending if end == -1 else self._pending[:end]
                self._pending = "" if end == -1 else self._pending[end + len(HERMES_CLOSE):]
                self._in_call = False
                parsed = _hermes_call(body)
                out += self._announce(*parsed) if parsed else self._content(HERMES_OPEN + body)
                if end == -1:
                    return out
                continue
            start = self._pending.find(HERMES_OPEN)
            if start == -1:
                keep = 0 if final else _partial_suffix(self._pending, HERMES_OPEN)
                text = self._pending[:len(self._pending) - keep]
                self._pending = self._pending[len(text):]
                return out + self._content(text)
            out += self._content(self._pending[:start])
            self._pending = self._pending[start + len(HERMES_OPEN):]
            self._in_call = True


def _hermes_call(body: str) -> tuple[str, str] | None:
    try:
        item = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    return item["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

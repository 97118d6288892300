"""The two grammar engines side by side on this workload: llguidance (what Quiver uses) and xgrammar.

For the embedded model's tokenizer (49,152 tokens) it measures, for each engine:
  - compile: a new JSON schema to a ready matcher (median over distinct schemas, so no cache helps);
  - fill: one step's token bitmasks for B = 1, 16 and 64 rows, each row walking through a valid output
    of its schema (mean per step);
  - schema coverage: of a list of JSON Schema features and combinations, which each engine enforces,
    refuses, or silently ignores (an output that ignores part of its schema is what Quiver must not give).
Applying the mask (server/engine/logit_adjust.py, the same for both) is timed once per batch size.

    quiver bench grammar [--schemas 20] [--steps 24] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from quiver.bench.common import add_out_arg, machine, write_json

BATCHES = (1, 16, 64)


def schema(i: int) -> dict:
    return {"type": "object", "properties": {
        f"name{i}": {"type": "string", "maxLength": 12}, f"age{i}": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", f"c{i}"]}, "maxItems": 4},
        "ok": {"type": "boolean"}}, "required": [f"name{i}", f"age{i}", "tags", "ok"], "additionalProperties": False}


def instance(i: int) -> str:
    return json.dumps({f"name{i}": "Ada Lovelace", f"age{i}": 36, "tags": ["a", f"c{i}"], "ok": True},
                      separators=(",", ":"))


# (feature, schema, a value the schema forbids): enforced if the engine's grammar rejects the value
COVERAGE = [
    ("maxLength", {"type": "string", "maxLength": 3}, '"abcd"'),
    ("pattern", {"type": "string", "pattern": "^[a-z]+$"}, '"A1"'),
    ("format email", {"type": "string", "format": "email"}, '"nope"'),
    ("minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 5}, "9"),
    ("multipleOf", {"type": "integer", "multipleOf": 3}, "4"),
    ("enum", {"enum": ["a", "b"]}, '"c"'),
    ("minItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]"),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    ("not", {"not": {"type": "integer"}}, "1"),
    ("if/then", {"if": {"type": "integer"}, "then": {"minimum": 5}}, "1"),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "[2]"),
    ("dependentRequired", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a":1}'),
    ("pattern + maxLength", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, '"abcd"'),
    ("format + maxLength", {"type": "string", "format": "email", "maxLength": 6}, '"ab@cd.ef"'),
    ("multipleOf + range", {"type": "integer", "minimum": 0, "maximum": 20, "multipleOf": 3}, "4"),
    ("enum + type", {"enum": ["a", 1], "type": "string"}, "1"),
    ("$ref + sibling", {"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 2}, '"abc"'),
    ("anyOf + sibling", {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}],
                         "required": ["a"]}, "{}"),
    ("unknown format", {"type": "string", "format": "idn-hostname"}, None),
]


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab):
        import llguidance.hf
        import llguidance.torch
        from llguidance import LLMatcher
        self.M, self.fill_fn = LLMatcher, llguidance.torch.fill_next_token_bitmask
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)

    def compile(self, s: dict):
        grammar = self.M.grammar_from_json_schema(s, defaults={"whitespace_flexible": False})
        failed, messages = self.M.validate_grammar_with_warnings(grammar, self.tok)
        if failed:
            raise ValueError(messages[0])
        return self.M(self.tok, grammar, log_level=0)

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, bitmask, row):
        self.fill_fn(m, bitmask, row)

    def accept(self, m, token) -> bool:
        return m.consume_token(token) and not m.is_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, s: dict):
        return self.compiler.compile_json_schema(json.dumps(s), any_whitespace=False, strict_mode=True,
                                                 separators=(",", ":"))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask, row):
        m.fill_next_token_bitmask(bitmask, row)

    def accept(self, m, token) -> bool:
        return m.accept_token(token)


def enforced(engine, tok, s: dict, bad: str | None) -> str:
    try:
        m = engine.matcher(engine.compile(s))
    except Exception:  # noqa: BLE001 - a refusal is the answer
        return "refused"
    if bad is None:
        return "ignored"
    ok = all(engine.accept(m, t) for t in tok.encode(bad, add_special_tokens=False) + [tok.eos_token_id])
    return "ignored" if ok else "enforced"  # the value and then the end of the output were both accepted


def measure(engine, tok, vocab: int, n_schemas: int, steps: int) -> dict:
    compile_ms = []
    for i in range(n_schemas):
        t0 = time.perf_counter()
        engine.matcher(engine.compile(schema(i)))
        compile_ms.append((time.perf_counter() - t0) * 1000)
    out = {"compile_ms_median": statistics.median(compile_ms)}
    for b in BATCHES:
        compiled = [engine.compile(schema(i)) for i in range(min(b, 8))]
        rows = [(engine.matcher(compiled[r % len(compiled)]), tok.encode(instance(r % len(compiled)),
                                                                         add_special_tokens=False))
                for r in range(b)]
        bitmask = torch.full((b, -(-vocab // 32)), -1, dtype=torch.int32)
        times = []
        for step in range(steps):
            t0 = time.perf_counter()
            for r, (m, _) in enumerate(rows):
                engine.fill(m, bitmask, r)
            times.append((time.perf_counter() - t0) * 1000)
            for m, ids in rows:
                if step < len(ids):
                    engine.accept(m, ids[step])
        out[f"fill_ms_b{b}"] = statistics.mean(times[1:])
    out["coverage"] = {name: enforced(engine, tok, s, bad) for name, s, bad in COVERAGE}
    return out


def apply_ms(vocab: int) -> dict:
    from quiver.server.engine.logit_adjust import Adjustments, apply
    out = {}
    for b in BATCHES:
        logits = torch.randn(b, vocab)
        adj = Adjustments(grammar_rows=torch.arange(b), bitmask=torch.randint(-2**31, 2**31 - 1, (b, -(-vocab // 32)),
                                                                              dtype=torch.int32))
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            apply(logits, adj)
            times.append((time.perf_counter() - t0) * 1000)
        out[f"apply_ms_b{b}"] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from quiver.server.model.checkpoint import resolve_model

    ap = argparse.ArgumentParser(prog="quiver bench grammar")
    ap.add_argument("--schemas", type=int, default=20)
    ap.add_argument("--steps", type=int, default=24)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(resolve_model(None)[0])
    vocab = 49152
    result = {"machine": machine(), "vocab": vocab, **apply_ms(vocab)}
    for cls in (Llguidance, Xgrammar):
        engine = cls(tok, vocab)
        result[engine.name] = measure(engine, tok, vocab, args.schemas, args.steps)
        r = result[engine.name]
        print(f"{engine.name:11s} compile {r['compile_ms_median']:6.2f} ms   fill "
              + "  ".join(f"B={b}: {r[f'fill_ms_b{b}']:.2f} ms" for b in BATCHES))
    print("apply (both)          " + "  ".join(f"B={b}: {result[f'apply_ms_b{b}']:.2f} ms" for b in BATCHES))
    print(f"{'feature':22s} {'llguidance':11s} xgrammar")
    for name, _, _ in COVERAGE:
        print(f"{name:22s} {result['llguidance']['coverage'][name]:11s} {result['xgrammar']['coverage'][name]}")
    path = write_json("grammar", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

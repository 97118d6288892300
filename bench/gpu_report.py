"""The GPU check's one table (gpu-check.md), from its JSON: each step's outcome, the CUDA tests' counts and
failures, kernel µs and GB/s against the device's copy bandwidth, decode tokens/s against the base and
PEFT, TTFT/TPOT merged against unmerged, NF4 against bf16. Whatever a cut run left out is left out here."""
from __future__ import annotations

import re


def table(result: dict) -> str:
    steps = result.get("steps", {})
    env = result.get("environment", {})
    lines = [f"# GPU check{' (dry run)' if result.get('dry') else ''}", "",
             " ".join(f"{k} {env[k]}" for k in ("gpu", "python", "torch", "triton", "transformers", "peft")
                      if env.get(k)), "",
             "| step | result | seconds | limit |", "|---|---|---|---|"]
    for name, s in steps.items():
        outcome = f"skipped: {s['skipped']}" if s.get("skipped") else f"rc {s['returncode']}"
        lines.append(f"| {name} | {outcome} | {s.get('seconds', '')} | {s.get('limit', '')} |")
    if not result.get("finished"):
        lines.append(f"| (still running; planned: {', '.join(p['step'] for p in result.get('plan', []))}) | | | |")
    for section in (tests, kernels, decode, latency, quantized):
        lines += section(steps)
    return "\n".join(lines) + "\n"


def tests(steps: dict) -> list[str]:
    step = steps.get("tests", {})
    tail, outcomes = step.get("tail", []), step.get("tests", {})
    if not tail:
        return []
    summary = next((t for t in reversed(tail) if re.search(r"\b(passed|failed|error|skipped|collected)\b", t)), None)
    counts = {o: list(outcomes.values()).count(o) for o in sorted(set(outcomes.values()))}
    bad = [f"- {o} {name}" for name, o in outcomes.items() if o in ("FAILED", "ERROR")]
    return ["", "## CUDA tests", "", summary or "(no summary line)",
            *([", ".join(f"{n} {o.lower()}" for o, n in counts.items())] if counts else []), *bad]


def kernels(steps: dict) -> list[str]:
    k = steps.get("kernels", {}).get("figures")
    if not k or not (k.get("lora") or k.get("attention")):
        return []
    copy = k.get("copy_gb_s")
    out = ["", f"## Kernels ({k.get('dtype')}; device copy {copy:.0f} GB/s)" if copy else "## Kernels", "",
           "| case | op | µs | GB/s | of copy |", "|---|---|---|---|---|"]
    for group in ("lora", "attention"):
        for case, ops in k.get(group, {}).items():
            for op, v in ops.items():
                if isinstance(v, dict):
                    share = f"{v['gb_s'] / copy:.0%}" if copy else ""
                    out.append(f"| {case} | {op} | {v['us']:.1f} | {v['gb_s']:.0f} | {share} |")
    return out


def decode(steps: dict) -> list[str]:
    rows = [(name, r) for name in ("batch1", "batch8", "batch32")
            for r in (steps.get(name, {}).get("figures") or {}).get("rows", [])]
    if not rows:
        return []
    out = ["", "## Decode tokens/s (bf16)", "", "| batch | adapters | Quiver | base only | vs base | PEFT | vs PEFT |",
           "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        peft = f"{r['peft_tokens_per_s']:.0f} | {r['quiver_vs_peft']:.2f}x" if "peft_tokens_per_s" in r else " | "
        out.append(f"| {name[5:]} | {r['distinct_adapters']} | {r['quiver_tokens_per_s']:.0f} | "
                   f"{r['quiver_base_tokens_per_s']:.0f} | {r['quiver_vs_base']:.2f}x | {peft} |")
    return out


def latency(steps: dict) -> list[str]:
    rows = (steps.get("latency", {}).get("figures") or {}).get("rows", [])
    if not rows:
        return []
    out = ["", "## Latency: TTFT / TPOT medians, ms", "", "| concurrency | base | merged | unmerged |",
           "|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[v]['ttft_median_ms']:.1f} / {r[v]['tpot_median_ms']:.2f}" if v in r else ""
                 for v in ("base", "merged", "unmerged")]
        out.append(f"| {r['concurrency']} | {' | '.join(cells)} |")
    return out


def quantized(steps: dict) -> list[str]:
    decode_runs = (steps.get("quantized", {}).get("figures") or {}).get("decode", {})
    if not decode_runs:
        return []
    return ["", "## 4-bit base against full precision: decode tokens/s", "", "| run | tok/s |", "|---|---|",
            *(f"| {k} | {v['tok_s']:.1f} |" for k, v in decode_runs.items())]

"""Incremental detokenization and stop-string handling for one sequence."""
from __future__ import annotations

from quiver.server.engine.sequence import Sequence


def append_text(tokenizer, seq: Sequence) -> None:
    """Extend seq.text with the text of its newest token(s).

    Decodes a short window before the new tokens so that multi-token characters and
    leading-space rules come out as in a full decode; waits while the window ends in an
    incomplete UTF-8 character.
    """
    ids, skip = seq.token_ids, seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.text += full[len(prefix):]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)


def find_stop(seq: Sequence, new_from: int) -> int | None:
    """Where seq.text ends at its first stop string (the string cut, or kept with include_stop_str_in_output),
    looking only where new text could complete one; None when there is none."""
    best = None
    for stop in seq.params.stop:
        idx = seq.text.find(stop, max(0, new_from - len(stop) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = idx, idx + len(stop)
    if best is None:
        return None
    return best[1] if seq.params.include_stop_str_in_output else best[0]


def releasable_text(seq: Sequence) -> str:
    """New text safe to send: all of it when finished, else all but what could start a stop string."""
    end = len(seq.text)
    if not seq.finished and seq.params.stop:
        end -= max(len(s) for s in seq.params.stop) - 1
    if end <= seq.emitted_chars:
        return ""
    out = seq.text[seq.emitted_chars:end]
    seq.emitted_chars = end
    return out


def stop_reason(tokenizer, seq: Sequence, token: int, max_model_len: int) -> str | None:
    """After `token` was appended to seq: "stop" (a stop token or string, or a complete grammar), "length"
    (max_tokens or the context), or None to go on; the text grows by the token (cut at a stop string)."""
    p = seq.params
    if token in seq.stop_ids:
        return "stop"
    before = len(seq.text)
    append_text(tokenizer, seq)
    if p.stop and len(seq.text) > before and seq.num_output_tokens >= p.min_tokens:
        end = find_stop(seq, before)
        if end is not None:
            seq.text = seq.text[:end]
            return "stop"
    if seq.grammar is not None and seq.grammar.finished:
        return "stop"  # the grammar is complete and allows nothing but a stop token
    if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def append_tokens(tokenizer, seq: Sequence, tokens: list[int], logprobs: list,
                  max_model_len: int) -> tuple[int, str | None]:
    """Append a step's tokens (several when drafts were accepted) one at a time, until one ends the row:
    (how many were appended, stop_reason's reason, or "grammar_rejected" for a token its grammar refuses)."""
    for kept, token in enumerate(tokens, 1):
        seq.token_ids.append(token)
        if logprobs:
            seq.output_logprobs.append(logprobs[kept - 1])
        if seq.grammar is not None and not seq.grammar.accept(token):
            return kept, "grammar_rejected"
        reason = stop_reason(tokenizer, seq, token, max_model_len)
        if reason is not None:
            return kept, reason
    return len(tokens), None

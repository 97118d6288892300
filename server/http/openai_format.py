"""Engine outputs -> the pieces of OpenAI response bodies: ids, usage, logprobs."""
from __future__ import annotations

import time
import uuid

from quiver.server.engine.public import TokenLogprob
from quiver.server.http.responses import ChatLogprobs, CompletionLogprobs, PromptTokensDetails, Usage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class LogprobFormatter:
    """Token strings are decoded one token at a time, as OpenAI's logprobs show them. Each body part is
    validated once, from plain lists (a chunk's cost stays one validation)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, entries: list[TokenLogprob | None], offset: int) -> tuple[CompletionLogprobs, int]:
        """Completions-API logprobs for `entries` whose text starts at `offset`; returns the new offset."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            if e is None:  # the first prompt token has no logprob
                continue
            text = self.token(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({self.token(t): lp for t, lp in e.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return CompletionLogprobs.model_validate(out), offset

    def prompt_completion(self, prompt_ids: list[int],
                          entries: list[TokenLogprob | None]) -> tuple[CompletionLogprobs, int]:
        out, offset = self.completion(entries, 0)
        if prompt_ids and (not entries or entries[0] is None):  # the first token, shown with a null logprob
            first = self.token(prompt_ids[0])
            out = CompletionLogprobs(tokens=[first, *out.tokens], token_logprobs=[None, *out.token_logprobs],
                                     top_logprobs=[None, *out.top_logprobs],
                                     text_offset=[0, *(o + len(first) for o in out.text_offset)])
            offset += len(first)
        return out, offset

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        def item(token_id, lp):
            text = self.token(token_id)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return ChatLogprobs.model_validate({"content": [dict(item(e.token_id, e.logprob),
                                                             top_logprobs=[item(t, lp) for t, lp in e.top])
                                                        for e in entries]})


def merge_completion_logprobs(first: CompletionLogprobs | None, then: CompletionLogprobs) -> CompletionLogprobs:
    """`then` after `first` (a choice's echoed prompt, then its output)."""
    if first is None:
        return then
    return CompletionLogprobs(tokens=first.tokens + then.tokens,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              top_logprobs=first.top_logprobs + then.top_logprobs,
                              text_offset=first.text_offset + then.text_offset)

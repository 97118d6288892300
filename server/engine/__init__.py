"""The engine: requests, scheduling, the paged KV cache, one forward step, sampling, and the
thread bridge that serves it to asyncio."""

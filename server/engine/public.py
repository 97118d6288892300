"""The engine as the layers above it (http/, rayserve/, the server's assembly) see it: the engine and
its async bridge, what a request is made of, what comes back, and every error a call may raise. Those
layers import this module only (tests/test_layout.py), never the engine's workings."""
from __future__ import annotations

from quiver.adapters.errors import AdapterError
from quiver.adapters.paths import InvalidName, PathNotAllowed, check_name, resolve_path
from quiver.server.engine.async_engine import AsyncEngine, EngineError, RequestTimeout
from quiver.server.engine.config import DTYPES, EngineConfig
from quiver.server.engine.grammar import GrammarSpec, json_spec, refuse
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.metrics import Metrics
from quiver.server.engine.outputs import RequestFailed, RequestOutput
from quiver.server.engine.requests import PreparedRequest
from quiver.server.engine.sampling import InvalidParam, SamplingParams
from quiver.server.engine.sequence import TokenLogprob
from quiver.server.engine.warmup import warm_up
from quiver.server.families.errors import AdapterExists, AdapterFailed, AdapterInUse, UnknownAdapter, shown

__all__ = [
    "AdapterError", "AdapterExists", "AdapterFailed", "AdapterInUse", "AsyncEngine", "DTYPES", "EngineConfig",
    "EngineError", "GrammarSpec", "InvalidName", "InvalidParam", "LLMEngine", "Metrics", "PathNotAllowed", "PreparedRequest",
    "RequestFailed", "RequestOutput", "RequestTimeout", "SamplingParams", "TokenLogprob", "UnknownAdapter",
    "check_name", "json_spec", "refuse", "resolve_path", "shown", "warm_up",
]

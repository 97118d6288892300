"""Shared fixtures: tiny random Llama-family models on disk, the embedded SmolLM2, adapter sets,
a live server. Helpers the tests call are in helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; the flag must be set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from helpers import TINY_CONFIGS, LiveServer, make_tiny_model  # noqa: E402 (after the environment is set)


@pytest.fixture(scope="session")
def smollm2_dir():
    from quiver.server.model.checkpoint import resolve_model
    return resolve_model(None)[0]


@pytest.fixture(scope="session")
def plain_tokenizer():
    """A word-level tokenizer for the tiny models' 512 tokens: no embedded model needed (GPU machines)."""
    from quiver.bench.models import plain_tokenizer
    return plain_tokenizer(512)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (dir, HF model), built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: (root / name, make_tiny_model(root / name, name)) for name in TINY_CONFIGS}


@pytest.fixture(scope="session")
def api_model(tmp_path_factory):
    """A tiny model whose vocabulary is SmolLM2's, so that text prompts work."""
    path = tmp_path_factory.mktemp("api_model")
    return path, make_tiny_model(path, "llama_gqa", vocab_size=49152)


@pytest.fixture(scope="module")
def tiny_server(api_model, tokenizer):
    from quiver.server.engine.async_engine import AsyncEngine
    from quiver.server.engine.config import EngineConfig
    from quiver.server.engine.llm_engine import LLMEngine
    from quiver.server.engine.metrics import Metrics

    engine = LLMEngine(EngineConfig(dtype="float32", model=str(api_model[0]), num_kv_blocks=96, block_size=4,
                                    max_model_len=128, served_model_name="tiny"), tokenizer=tokenizer)
    with LiveServer(AsyncEngine(engine, Metrics())) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_lora_set(tiny_models, tmp_path_factory):
    """The eight PEFT adapter variants, saved for the tiny GQA model: (base dir, HF model, name -> dir)."""
    from peft_fixtures import lora_variants, make_adapter

    base_dir, hf = tiny_models["llama_gqa"]
    root = tmp_path_factory.mktemp("loras")
    paths = {}
    for i, (name, cfg) in enumerate(lora_variants(hf.config.num_hidden_layers).items()):
        make_adapter(hf, root / name, cfg, seed=100 + i)
        paths[name] = root / name
    return base_dir, hf, paths


@pytest.fixture(scope="session")
def tiny_prompt_set(tiny_models, tmp_path_factory):
    """The five prompt-learning variants for the tiny GQA model: (base dir, HF model, name -> dir)."""
    from peft_fixtures import make_prompt_adapter, prompt_variants

    base_dir, hf = tiny_models["llama_gqa"]
    root = tmp_path_factory.mktemp("prompts")
    paths = {}
    for i, (name, cfg) in enumerate(prompt_variants().items()):
        make_prompt_adapter(hf, root / name, cfg, seed=500 + i)
        paths[name] = root / name
    return base_dir, hf, paths

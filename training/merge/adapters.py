"""Read a trained adapter directory: peft's adapter_config.json plus the run.json of its run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError


class AdapterError(UserError):
    pass


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict  # adapter_config.json
    run: dict  # run.json ({} for adapters trained elsewhere)

    @property
    def base_name(self) -> str:
        """The base model as the recipe named it (tiny://..., a hub id or a path)."""
        model = self.run.get("recipe", {}).get("model", {})
        name = model.get("name") or self.config.get("base_model_name_or_path")
        if not name:
            raise AdapterError(
                f"{self.path}: neither run.json nor adapter_config.json names the base model; set "
                "base_model_name_or_path in adapter_config.json"
            )
        return name

    @property
    def base_revision(self) -> str | None:
        return self.run.get("recipe", {}).get("model", {}).get("revision") or self.config.get("revision")

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.run.get("recipe", {}).get("model", {}).get("trust_remote_code", False))

    @property
    def scaling(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def uses_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def streaming_blockers(self) -> list[str]:
        """Why the streaming merge cannot fold this adapter (empty: it can)."""
        c = self.config
        reasons = []
        if c.get("peft_type") != "LORA":
            reasons.append(f"peft_type {c.get('peft_type')} is not LoRA")
        if c.get("modules_to_save"):
            reasons.append(f"modules_to_save {c['modules_to_save']} (fully trained modules)")
        if c.get("trainable_token_indices"):
            reasons.append("trainable token embeddings")
        for key in ("rank_pattern", "alpha_pattern"):
            if c.get(key):
                reasons.append(f"per-module {key}")
        for key in ("fan_in_fan_out", "lora_bias", "layer_replication", "target_parameters", "use_qalora"):
            if c.get(key):
                reasons.append(key)
        return reasons


def read_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(
            f"{path}: not an adapter directory (no adapter_config.json); train first (make train)"
        )
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(
            f"{path}: adapter_model.safetensors is missing (pickled .bin adapters are not loaded)"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    run_file = path / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    return Adapter(path=path, config=config, run=run)

"""Exports of a trained diffusers policy in the formats diffusers itself loads.

- `export_lora(policy, out_dir)`: the LoRA adapters of a LoRA run as `pytorch_lora_weights.safetensors`
  (diffusers' key names, "transformer." prefix, with the adapter's LoraConfig in the safetensors
  metadata so rank / alpha / targets are restored exactly), written by the pipeline's own
  `save_lora_weights`; load with `pipe.load_lora_weights(out_dir)` on the base pipeline
  (StableDiffusion3Pipeline for SD3Policy, FluxPipeline for FluxPolicy, WanPipeline for WanPolicy).
- `export_transformer(policy, out_dir)`: the transformer of a full fine-tune as the folder
  `<ModelClass>.from_pretrained(out_dir)` (or a pipeline's `transformer/` subfolder) loads.
- Two-expert Wan2.2 (`WanExpertsPolicy`): `export_lora` also writes transformer_2's adapters as
  `LORA_WEIGHT_NAME_2` in the same folder, loaded with
      pipe.load_lora_weights(out_dir)                                   # transformer (high noise)
      pipe.load_lora_weights(out_dir, weight_name=LORA_WEIGHT_NAME_2,
                             load_into_transformer_2=True)              # transformer_2 (low noise)
  (both files use diffusers' "transformer." key prefix; `load_into_transformer_2` picks the module);
  `export_transformer` writes out_dir/transformer and out_dir/transformer_2 (the pipeline's subfolders).

Both read the policy's current weights: pass the EMA copy to export the EMA. Call them on an unsharded
policy (one process, or a copy loaded from a checkpoint): `export_lora` gathers DTensors (FSDP2) itself,
`export_transformer` relies on diffusers' `save_pretrained`, which does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from torch import Tensor

from .diffusers import DiffusersPolicy, _INSTALL_HINT, require_diffusers

__all__ = ["LORA_WEIGHT_NAME", "LORA_WEIGHT_NAME_2", "PIPELINE_CLASS", "export_lora", "export_transformer",
           "pipeline_class"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name for LoRA weights
# Two-expert Wan2.2: the adapters of transformer_2 (the low-noise expert), beside LORA_WEIGHT_NAME's.
LORA_WEIGHT_NAME_2 = "pytorch_lora_weights_transformer_2.safetensors"

# The diffusers pipeline whose LoRA loader matches each adapter's transformer.
PIPELINE_CLASS = {
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "FluxTransformer2DModel": "FluxPipeline",
    "WanTransformer3DModel": "WanPipeline",
}


def pipeline_class(policy: DiffusersPolicy) -> type:
    """The diffusers pipeline class whose `load_lora_weights` reads `export_lora(policy, ...)`."""
    if not isinstance(policy, DiffusersPolicy):
        raise TypeError(f"expected a diffusers policy (SD3Policy, FluxPolicy, WanPolicy), got {type(policy).__name__}")
    name = PIPELINE_CLASS.get(policy.model_class_name)
    if name is None:
        raise ValueError(f"no diffusers pipeline known for {policy.model_class_name} (known: {sorted(PIPELINE_CLASS)})")
    return getattr(require_diffusers(), name)


def _plain(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)  # DTensor (FSDP2) -> the whole tensor
    if full is not None:
        t = full()
    return t.detach().to("cpu").contiguous()


def export_lora(policy: DiffusersPolicy, out_dir: Union[str, os.PathLike], *, adapter_name: str = "default") -> Path:
    """Writes the LoRA adapter `adapter_name` of `policy` so `pipe.load_lora_weights(out_dir)` loads it
    into the base pipeline (see the module docstring); returns the file written. The adapter's dtype is
    kept (exact round trip). A policy without LoRA is an error pointing to `export_transformer`."""
    cls = pipeline_class(policy)
    if not policy.lora_enabled:
        raise ValueError("export_lora: the run has no LoRA (enable_lora was never called on this policy): it is a "
                         "full fine-tune, export the whole transformer with export_transformer(policy, out_dir)")
    config = policy.model.peft_config.get(adapter_name)
    if config is None:
        raise ValueError(f"export_lora: the policy has no LoRA adapter {adapter_name!r} "
                         f"(it has {sorted(policy.model.peft_config)})")
    try:
        from peft.utils import get_peft_model_state_dict
    except ImportError as e:  # pragma: no cover - exercised only without peft
        raise ImportError(f"export_lora needs the `peft` package: {_INSTALL_HINT}") from e
    names = (LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2)
    if len(policy.experts) > len(names):
        raise ValueError(f"export_lora: {len(policy.experts)} experts; at most {len(names)} are known")
    files = []
    for model, name in zip(policy.experts, names):
        config = model.peft_config.get(adapter_name) if getattr(model, "peft_config", None) else None
        if config is None:
            raise ValueError(f"export_lora: an expert of the policy has no LoRA adapter {adapter_name!r}")
        layers = {k: _plain(v) for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
        if not layers:
            raise ValueError(f"export_lora: adapter {adapter_name!r} holds no tensors")
        files.append((name, layers, config.to_dict()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, layers, metadata in files:
        cls.save_lora_weights(out, transformer_lora_layers=layers, weight_name=name,
                              safe_serialization=True, transformer_lora_adapter_metadata=metadata)
    return out / LORA_WEIGHT_NAME


def export_transformer(policy: DiffusersPolicy, out_dir: Union[str, os.PathLike]) -> Path:
    """Writes the transformer of a full fine-tune (config.json + safetensors): the folder
    `<ModelClass>.from_pretrained(out_dir)` loads, e.g. as a pipeline's `transformer/` subfolder.
    A LoRA policy is an error pointing to `export_lora` (the base is unchanged: ship the adapters)."""
    if not isinstance(policy, DiffusersPolicy):
        raise TypeError(f"expected a diffusers policy (SD3Policy, FluxPolicy, WanPolicy), got {type(policy).__name__}")
    if policy.lora_enabled:
        raise ValueError("export_transformer: the run trains LoRA adapters on a frozen base; export them with "
                         "export_lora(policy, out_dir) and load them with pipe.load_lora_weights(out_dir)")
    out = Path(out_dir)
    if len(policy.experts) > 1:  # two-expert Wan2.2: the pipeline's transformer/ and transformer_2/ folders
        policy.save_pretrained(out)
        return out
    policy.model.save_pretrained(os.fspath(out), safe_serialization=True)
    return out

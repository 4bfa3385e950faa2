"""The pipeline folder's own scheduler: the levels of `[sampler] schedule = "diffusers"`.

`load_scheduler(pre)` builds the scheduler class that `scheduler/scheduler_config.json` names, with
diffusers, from the local folder only, and checks that it is a flow-matching scheduler whose levels
can be a rectified-flow chain (x_t = (1 - t) x0 + t eps) ending at the sample (t = 0).
`set_timesteps_kwargs(pre, scheduler, num_steps)` gives the arguments the kind's diffusers pipeline
passes to `scheduler.set_timesteps(num_steps, ...)`, so that `scheduler.sigmas` afterwards are the
levels the pipeline itself would step through at [model] resolution:

  sd3:  nothing; with use_dynamic_shifting, `mu` of the image sequence length
        (latent h / patch_size) x (latent w / patch_size) (StableDiffusion3Pipeline).
  flux: `sigmas` = K values evenly spaced from 1 to 1/K (unless the scheduler uses use_flow_sigmas)
        and `mu` of the packed sequence length (latent h / 2) x (latent w / 2) (FluxPipeline passes
        both always; the scheduler uses mu only with use_dynamic_shifting).
  wan:  nothing (WanPipeline calls set_timesteps(K)).

mu (`dynamic_shift_mu`) is linear in the sequence length n through two points of the scheduler
config: mu = base_shift at n = base_image_seq_len and max_shift at n = max_image_seq_len, with the
pipelines' defaults for absent keys (256, 4096, 0.5, and max_shift 1.15 for FLUX, 1.16 for SD3).

Supported: FlowMatchEulerDiscreteScheduler (SD3, SD3.5, FLUX.1) and the multistep solvers with flow
sigmas (UniPCMultistepScheduler / DPMSolverMultistepScheduler with use_flow_sigmas = True,
prediction_type = "flow_prediction" and final_sigmas_type = "zero": the Wan2.1 folders' scheduler).
The sampler steps through these levels with the rectified-flow SDE, not with the scheduler's own
update rule (a multistep solver's levels, not its solver). Anything else is an error naming the
scheduler class and `sampler.schedule`.
"""
from __future__ import annotations

import json

from .specs import Preflight

__all__ = ["dynamic_shift_mu", "image_seq_len", "load_scheduler", "set_timesteps_kwargs"]

# The pipelines' calculate_shift defaults (config keys absent): base/max image sequence length, base shift.
_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5}
_MAX_SHIFT_DEFAULT = {"flux": 1.15, "sd3": 1.16}
_FLOW_MULTISTEP = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")
_FIELD = "sampler.schedule = 'diffusers'"


def _config_file(pre: Preflight):
    return pre.path / "scheduler" / "scheduler_config.json"


def _read_config(pre: Preflight) -> dict:
    path = _config_file(pre)
    if not path.is_file():
        raise FileNotFoundError(f"{_FIELD}: {str(pre.path / 'scheduler')!r} has no scheduler_config.json (the "
                                "folder's scheduler); use sampler.schedule = 'engine' with sampler.shift / sigmas")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{_FIELD}: {path} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise ValueError(f"{_FIELD}: {path} must be a JSON object naming its scheduler class (_class_name)")
    return config


def _check_flow(name: str, config: dict, path) -> None:
    """Raises for scheduler configs whose sigmas are not flow-matching levels ending at 0."""
    why = None
    if name in _FLOW_MULTISTEP:
        if not config.get("use_flow_sigmas", False):
            why = "use_flow_sigmas is false: its sigmas are a variance-preserving chain's, not flow-matching levels"
        elif config.get("prediction_type", "epsilon") != "flow_prediction":
            why = f"prediction_type = {config.get('prediction_type')!r}, not 'flow_prediction'"
        elif config.get("final_sigmas_type", "zero") != "zero":
            why = (f"final_sigmas_type = {config.get('final_sigmas_type')!r}: its last level is not 0, and the chain "
                   "must end at the sample")
    elif name != "FlowMatchEulerDiscreteScheduler":
        why = ("only FlowMatchEulerDiscreteScheduler and the multistep solvers with flow sigmas "
               f"({', '.join(_FLOW_MULTISTEP)} with use_flow_sigmas = true) are supported")
    elif config.get("invert_sigmas", False):
        why = "invert_sigmas is true: its levels ascend"
    if why:
        raise ValueError(f"{_FIELD}: the folder's scheduler {name} ({path}) is not supported: {why}; use "
                         "sampler.schedule = 'engine' (sampler.shift or sigmas)")


def load_scheduler(pre: Preflight):
    """The folder's scheduler (the class scheduler_config.json names, from the local folder only),
    checked to be a supported flow-matching scheduler (see the module docstring)."""
    config = _read_config(pre)
    name, path = config["_class_name"], _config_file(pre)
    _check_flow(name, config, path)
    from ..models.diffusers import require_diffusers

    diffusers = require_diffusers()
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(f"{_FIELD}: {path} names {name!r}, which is not a diffusers scheduler class "
                         f"(diffusers {diffusers.__version__})")
    return cls.from_pretrained(str(pre.path), subfolder="scheduler", local_files_only=True)


def image_seq_len(pre: Preflight) -> int:
    """Transformer image tokens per sample at [model] resolution, as the pipelines count them for mu:
    FLUX packs 2x2 latent patches, SD3 cuts patch_size x patch_size ones (video: not used)."""
    if pre.spec.name == "flux":
        _, h, w = pre.latent_shape
        return (h // 2) * (w // 2)
    if pre.spec.name == "sd3":
        _, h, w = pre.latent_shape
        patch = int(pre.transformer_config.get("patch_size", 2))
        return (h // patch) * (w // patch)
    raise ValueError(f"image_seq_len: {pre.spec.name} pipelines do not shift by sequence length")


def dynamic_shift_mu(config, seq_len: int, kind: str) -> float:
    """mu of the resolution-dependent shift (see the module docstring): linear in seq_len through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), config keys or the pipeline's defaults."""
    get = config.get
    n0 = get("base_image_seq_len", _SHIFT_DEFAULTS["base_image_seq_len"])
    n1 = get("max_image_seq_len", _SHIFT_DEFAULTS["max_image_seq_len"])
    mu0 = get("base_shift", _SHIFT_DEFAULTS["base_shift"])
    mu1 = get("max_shift", _MAX_SHIFT_DEFAULT[kind])
    if n1 == n0:
        raise ValueError(f"{_FIELD}: the scheduler config has base_image_seq_len = max_image_seq_len = {n0}: "
                         "no resolution-dependent shift can be computed")
    slope = (mu1 - mu0) / (n1 - n0)
    return mu0 + slope * (seq_len - n0)


def set_timesteps_kwargs(pre: Preflight, scheduler, num_steps: int) -> dict:
    """The keyword arguments the kind's diffusers pipeline passes to scheduler.set_timesteps(num_steps, ...)
    at [model] resolution (see the module docstring)."""
    kind, config = pre.spec.name, scheduler.config
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if kind == "flux":
        kwargs = {"mu": dynamic_shift_mu(config, image_seq_len(pre), kind)}
        if not config.get("use_flow_sigmas", False):
            import numpy as np

            kwargs["sigmas"] = np.linspace(1.0, 1.0 / num_steps, num_steps)  # FluxPipeline's default sigmas
        return kwargs
    if kind == "sd3" and dynamic:
        return {"mu": dynamic_shift_mu(config, image_seq_len(pre), kind)}
    return {}

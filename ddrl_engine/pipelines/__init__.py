"""Model bundles: a model family (SD3, FLUX, Wan) loaded from a local diffusers pipeline folder.

This layer sits below the trainer and above `models/`: it turns a folder into the pieces the trainer
uses (a policy, prompt encoding, decode / encode between latents and pixels, the scheduler config).
`load_bundle` checks the folder and the resolution before reading any weight (`preflight`).
`pipelines.schedule` reads the folder's scheduler: the levels of `[sampler] schedule = "diffusers"`.
Needs the optional diffusers dependencies (`pip install ddrl-engine[diffusers]`).
"""

from .bundle import FLUX_DEFAULT_GUIDANCE, ModelBundle, load_bundle
from .specs import KINDS, KindSpec, Preflight, preflight

__all__ = ["FLUX_DEFAULT_GUIDANCE", "KINDS", "KindSpec", "ModelBundle", "Preflight", "load_bundle", "preflight"]

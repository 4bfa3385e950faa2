"""DDRL on a Wan2.1 / Wan2.2 text-to-video transformer, under torchrun with FSDP2.

    # one node, 8 GPUs (see examples/wan_video_fsdp.toml and docs/video_multi_gpu.md)
    torchrun --nproc_per_node 8 examples/wan_video_fsdp.py --config examples/wan_video_fsdp.toml
    # the same end to end on CPU with a tiny random model, fake prompts and fake latents
    python examples/wan_video_fsdp.py --config examples/wan_video_fsdp.toml --tiny /tmp/wan_tiny --parallel none --steps 2

Inputs (the [wan] table of the config; everything is local, nothing is downloaded):
  model_dir: the transformer folder of a diffusers Wan checkpoint (holding config.json), loaded in
      fp32: the fp32 weights are FSDP2's master copy, compute runs in bf16 on CUDA.
  prompts: a torch.save'd [N + 1, L, D] tensor (or {"embeds": tensor}) of umT5 prompt embeddings,
      the last row the empty prompt; prompt i is class i of the trainer.
  latents: the regularisation data, a folder of VAE latents [C, T, H, W] (ddrl_engine.data.folder),
      one subfolder per prompt id (latents/3/clip_0007.pt is a video of prompt 3), in the same
      normalised latent space the transformer denoises.
The reward in `make_rewards` is a PLACEHOLDER: replace it with your own (decode with the Wan VAE, then
score the frames).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

import torch

from ddrl_engine.models.diffusers import TextCondition, WanPolicy, require_diffusers
from ddrl_engine.rewards import BrightnessReward, WeightedReward
from ddrl_engine.trainer.builders import build_dataset, build_sampler
from ddrl_engine.trainer.config import config_from_dict
from ddrl_engine.trainer.distributed import Distributed
from ddrl_engine.trainer.loop import Trainer

WAN_KEYS = ("model_dir", "prompts", "latents")
TINY_SHAPE = (4, 3, 8, 8)  # latent C, T, H, W of the --tiny model (48 tokens)
TINY_PROMPTS, TINY_TEXT = 4, (6, 32)  # prompts; text tokens x width


def make_rewards() -> WeightedReward:
    """PLACEHOLDER reward: the mean latent value, so the example runs end to end. Replace it with a
    real video reward: an object with `name` and `__call__(samples, cond) -> [B] float32`, where
    samples are [B, C, T, H, W] latents (decode them with AutoencoderKLWan, after undoing the
    latents_mean / latents_std normalisation) and cond the prompt ids. The Trainer below is built with
    `decode=raw_latents`, so the rewards get the raw latents (its default clamps to the [-1, 1] range
    of pixel-space models)."""
    return WeightedReward([BrightnessReward()], [1.0])


def raw_latents(samples: torch.Tensor) -> torch.Tensor:
    """What the rewards see of a rollout: the latents as sampled (no clamping)."""
    return samples


def load_prompts(path: str) -> TextCondition:
    if not Path(path).is_file():
        raise FileNotFoundError(f"[wan].prompts: no prompt embedding file at {path!r}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    embeds = obj.get("embeds") if isinstance(obj, dict) else obj
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[0] < 2:
        raise ValueError(f"[wan].prompts: {path} must hold a [N + 1, L, D] tensor (N >= 1 prompts, then the empty "
                         f"prompt), got {getattr(embeds, 'shape', type(embeds).__name__)}")
    return TextCondition(embeds.float())


def make_tiny(root: Path) -> dict:
    """A tiny random Wan transformer, fake prompt embeddings and fake latents under root (seeded, so
    every rank builds the same files; each builds in a private folder and renames it into place, the
    first rename wins). Returns the [wan] table pointing at them."""
    paths = {"model_dir": str(root / "transformer"), "prompts": str(root / "prompt_embeds.pt"),
             "latents": str(root / "latents")}
    if (root / "tiny.json").is_file():
        return paths
    if root.exists():
        raise FileExistsError(f"--tiny {root}: the folder exists and is not a tiny example folder; pass a new path")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    c = TINY_SHAPE[0]
    model = require_diffusers().WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=c, out_channels=c,
        text_dim=TINY_TEXT[1], freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=32)
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    torch.save(torch.randn(TINY_PROMPTS + 1, *TINY_TEXT, generator=g), tmp / "prompt_embeds.pt")
    for prompt in range(TINY_PROMPTS):
        (tmp / "latents" / str(prompt)).mkdir(parents=True)
        for j in range(2):
            torch.save(torch.randn(*TINY_SHAPE, generator=g), tmp / "latents" / str(prompt) / f"clip_{j}.pt")
    (tmp / "tiny.json").write_text(json.dumps({"shape": TINY_SHAPE, "prompts": TINY_PROMPTS}))
    try:
        os.rename(tmp, root)
    except OSError:  # another rank got there first: its files are the same
        shutil.rmtree(tmp)
    return paths


def build_config(raw: dict, wan: dict):
    """The TrainConfig: the engine's sections of the TOML, the latents folder as the data (the Trainer
    takes the sample shape and the prompts from the policy: no [model] section)."""
    raw = dict(raw)
    raw["data"] = dict(raw.get("data", {}), dataset="folder", path=wan["latents"])
    return config_from_dict(raw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="TOML: [wan] inputs + the engine's TrainConfig sections")
    ap.add_argument("--tiny", metavar="DIR", help="create (or reuse) tiny random inputs in DIR and run on CPU")
    ap.add_argument("--steps", type=int, help="override run.steps")
    ap.add_argument("--out", help="override run.out_dir")
    ap.add_argument("--parallel", choices=("none", "ddp", "fsdp"),
                    help="override distributed.parallel ('none' also turns activation checkpointing off)")
    ap.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    args = ap.parse_args(argv)

    raw = tomllib.loads(Path(args.config).read_text())
    wan = raw.pop("wan", {})
    unknown = sorted(set(wan) - set(WAN_KEYS))
    if unknown:
        raise ValueError(f"[wan]: unknown field(s) {', '.join(unknown)} (known: {', '.join(WAN_KEYS)})")
    section = lambda name: raw.setdefault(name, {})  # noqa: E731
    if args.tiny:
        wan = make_tiny(Path(args.tiny))
        section("run").update(device="cpu", progress=False, out_dir=str(Path(args.tiny) / "run"))
    missing = [k for k in WAN_KEYS if not wan.get(k)]
    if missing:
        raise ValueError(f"[wan]: missing {', '.join(missing)} (or pass --tiny DIR)")
    if args.steps is not None:
        section("run")["steps"] = args.steps
    if args.out:
        section("run")["out_dir"] = args.out
    if args.parallel:
        section("distributed")["parallel"] = args.parallel
        if args.parallel == "none":
            section("distributed")["activation_checkpointing"] = False

    prompts = load_prompts(wan["prompts"])
    num_prompts = len(prompts) - 1
    cfg = build_config(raw, wan)
    dataset = build_dataset(cfg)
    shape = tuple(dataset.train_x.shape[1:])
    if len(shape) != 4:
        raise ValueError(f"[wan].latents: samples must be [C, T, H, W] video latents, got {shape}")
    labels = torch.cat([dataset.train_y, dataset.heldout_y])
    if int(labels.max()) >= num_prompts:
        raise ValueError(f"[wan].latents: prompt id {int(labels.max())} (a subfolder name) has no embedding: "
                         f"{wan['prompts']} holds {num_prompts} prompts")

    policy = WanPolicy.from_pretrained(wan["model_dir"], shape, prompts, torch_dtype=torch.float32)
    if policy.model.config.in_channels != shape[0]:
        raise ValueError(f"[wan].latents have {shape[0]} channels but the transformer takes "
                         f"{policy.model.config.in_channels}")
    trainer = Trainer(cfg, policy, build_sampler(cfg), make_rewards(), dataset, evaluator=None, decode=raw_latents)
    # The prompt bank is a plain attribute: put it on the device once (for the policy and its
    # reference / EMA copies) instead of copying it at every forward.
    for module in trainer.modules().values():
        module.set_prompts(prompts.to(trainer.device))
    if not args.no_resume:
        trainer.resume()
    trainer.train()
    if trainer.dist is None or trainer.dist.rank == 0:
        lines = (trainer.out / "metrics.jsonl").read_text().splitlines()
        print(json.dumps(json.loads(lines[-1]), indent=2))
    Distributed.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

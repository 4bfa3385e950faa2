"""DDRL inside your own Flow-GRPO-style loop: ddrl-engine's ops and loss terms, no Trainer.

    python examples/flow_grpo_loop.py --tiny --steps 3                # tiny random SD3 transformer, CPU
    python examples/flow_grpo_loop.py --transformer /path/to/sd3.5-medium/transformer --device cuda

Everything marked "your code" is what a Flow-GRPO user already has (sampling loop, transformer call,
reward, data); the lines marked ENGINE are the drop-ins: the fused step log-prob (`ops.step_logprob`
with `ops.transitions.rectified_flow_sde` coefficients), `group_advantages`, `clipped_policy_loss`, the
DDRL data loss (`data_loss`, the flow-matching target eps - x0) and `combine`.
`--transformer DIR` loads a diffusers `SD3Transformer2DModel` folder (local, holding config.json). The
prompt embeddings and data latents here are random PLACEHOLDERS of the right shapes: replace them with
your text encoders' outputs and your VAE-encoded images (or base-model samples), and `reward` with yours
(the loop runs in fp32: wrap the forwards in torch.autocast for bf16 on a GPU).
Measured (2-core x86_64 CPU shared with other jobs, load 5-8): `--tiny --steps 3` runs in 18-22 s wall, of
which the loop is 0.9-1.2 s (one thread) and the rest importing torch (~4 s) and diffusers (8-13 s); with
`--threads 2` on that busy machine the loop took 30 s (tiny ops: two threads wait on each other).
"""
from __future__ import annotations

import argparse
import time

import torch

from ddrl_engine import ops  # ENGINE
from ddrl_engine.algorithms import clipped_policy_loss, combine, data_loss, group_advantages  # ENGINE

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16)


def build_transformer(args):  # your code
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(args.seed)
    if args.tiny:
        return SD3Transformer2DModel(**TINY)
    return SD3Transformer2DModel.from_pretrained(args.transformer)


def velocity(model, x, t, cond):  # your code: the transformer call, t in [0, 1] (1 = noise)
    embeds, pooled = cond
    timestep = (t * 1000.0).float().expand(x.shape[0])  # SD3's convention: sigma * 1000
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                 pooled_projections=pooled, return_dict=False)[0]


def sigmas(num_steps, shift):  # your code: SD3's shifted schedule from t = 1 to t = 0
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def sde_step(v, x, t, t_next, noise_level, x_next=None, generator=None):
    """Flow-GRPO's SDE step. Returns (x_next, log_prob [B] fp32, mean, std)."""
    c = ops.transitions.rectified_flow_sde(t, t_next, noise_level)  # ENGINE: mu = x_coef x + out_coef v
    mean = c.x_coef * x + c.out_coef * v
    if x_next is None:  # sampling; in training x_next is the stored state
        x_next = mean + c.std * torch.randn(x.shape, generator=generator).to(x.device)
    lp = ops.step_logprob(x_next, x, v, x_coef=c.x_coef, out_coef=c.out_coef, std=c.std)  # ENGINE
    return x_next, lp, mean, c.std


@torch.no_grad()
def rollout(model, cond, ts, shape, noise_level, generator, device):  # your code
    x = torch.randn(shape, generator=generator).to(device)
    states, log_probs = [x], []
    for k in range(len(ts) - 1):
        x, lp, _, _ = sde_step(velocity(model, x, ts[k], cond), x, ts[k], ts[k + 1], noise_level,
                               generator=generator)
        states.append(x)
        log_probs.append(lp)
    return torch.stack(states, 1), torch.stack(log_probs, 1)  # [B, K + 1, ...], [B, K]


def reward(samples):  # your code: a toy reward (mean "brightness" of the latent); decode + score in yours
    return samples.float().mean(dim=tuple(range(1, samples.dim())))


def data_term(model, x0, eps, t, cond):
    """DDRL's regulariser: the model's flow-matching loss on data noised at level t with noise eps."""
    x_t = (1 - t) * x0 + t * eps  # your code: the rectified-flow forward process
    return data_loss(velocity(model, x_t, t, cond), x0, eps, 1.0, -1.0)  # ENGINE: target 1*eps - 1*x0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random-weight SD3 transformer (CPU, seconds)")
    p.add_argument("--transformer", help="a local diffusers SD3Transformer2DModel folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent-size", type=int, default=8, help="latent H = W (SD3.5 at 512 px: 64)")
    p.add_argument("--text-tokens", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="training steps (one rollout batch each)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4, help="G rollouts per prompt")
    p.add_argument("--sampling-steps", type=int, default=6)
    p.add_argument("--noise-level", type=float, default=0.7)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--clip-eps", type=float, default=1e-4)
    p.add_argument("--beta-data", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 with --tiny, else torch's default)")
    args = p.parse_args(argv)
    if args.tiny == bool(args.transformer):
        p.error("give exactly one of --tiny and --transformer DIR")
    return args


def main(argv=None) -> dict:
    """Runs the loop; returns the last step's metrics, with `history` (every step's) and `seconds`."""
    args = parse(argv)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.tiny else before))
    try:
        return train(args)
    finally:
        torch.set_num_threads(before)


def train(args) -> dict:
    dev, gen = torch.device(args.device), torch.Generator().manual_seed(args.seed)
    model = build_transformer(args).to(dev)
    cfg = model.config
    shape = (cfg.in_channels, args.latent_size, args.latent_size)
    # your code: PLACEHOLDER prompt embeddings and data latents (4 "images" per prompt)
    embeds = torch.randn(args.num_prompts, args.text_tokens, cfg.joint_attention_dim, generator=gen).to(dev)
    pooled = torch.randn(args.num_prompts, cfg.pooled_projection_dim, generator=gen).to(dev)
    data = torch.randn(args.num_prompts, 4, *shape, generator=gen).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ts = sigmas(args.sampling_steps, args.shift).to(dev)
    trained = list(range(0, args.sampling_steps, 2))  # every other step, as Flow-GRPO / DDRL
    G, history, t0 = args.group_size, [], time.perf_counter()
    for step in range(args.steps):
        ids = torch.randint(args.num_prompts, (args.prompts_per_step,), generator=gen).repeat_interleave(G).to(dev)
        cond = (embeds[ids], pooled[ids])  # groups contiguous: G rows per prompt
        states, old_lp = rollout(model, cond, ts, (len(ids), *shape), args.noise_level, gen, dev)
        rewards = reward(states[:, -1])
        adv = group_advantages(rewards, G)  # ENGINE: (r - mean_G) / (std_G + 1e-4), clamped to [-5, 5]
        x0 = data[ids, torch.randint(data.shape[1], (len(ids),), generator=gen).to(dev)]  # paired data
        eps = states[:, 0]  # DDRL's default: the data loss reuses the rollout's initial noise
        m = dict(step=step + 1, reward=rewards.mean().item(), ratio_dev=[])
        for _ in range(args.ppo_epochs):
            opt.zero_grad(set_to_none=True)
            pol_sum = dat_sum = 0.0
            for k in trained:
                v = velocity(model, states[:, k], ts[k], cond)  # your code, now with grad
                _, lp, _, _ = sde_step(v, states[:, k], ts[k], ts[k + 1], args.noise_level,
                                       x_next=states[:, k + 1])  # ENGINE: log-prob of the stored transition
                pol, stats = clipped_policy_loss(lp, old_lp[:, k], adv, args.clip_eps)  # ENGINE (value ~0 on-policy,
                # -mean(A); its gradient is not)
                with torch.set_grad_enabled(args.beta_data > 0):  # logged either way, trained when beta > 0
                    dat = data_term(model, x0, eps, ts[k], cond)
                loss = combine(pol, dat, None, beta_data=args.beta_data, beta_kl=0.0,
                               num_trained_steps=len(trained))  # ENGINE: (L_pol + beta L_data) / |steps|
                loss.backward()
                m["ratio_dev"].append(stats.ratio_max_dev.item())
                pol_sum, dat_sum = pol_sum + pol.item(), dat_sum + dat.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # your code (norm before clipping)
            opt.step()
        m.update(policy_loss=pol_sum / len(trained), data_loss=dat_sum / len(trained), grad_norm=grad_norm.item(),
                 ratio_dev_first=m["ratio_dev"][0])  # max |ratio - 1| at the first trained step: 0 on-policy
        history.append(m)
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in m.items() if k != "ratio_dev"})
    return dict(history[-1], history=history, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()

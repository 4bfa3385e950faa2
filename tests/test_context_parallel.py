"""Context parallelism ([distributed] context_parallel = N) on CPU / gloo.

- The DiT (image and video configs) sharded over 2 ranks gives the unsharded model's output and
  parameter gradients (Ulysses all-to-all attention, gathered output, the trainer's gradient rule).
- The trainer at context_parallel = 2 (2 processes: one data rank of two cp ranks) reproduces one
  process: advantages, log-prob ratios, losses, gradient norms and the updated weights; also under
  FSDP2 (weights sharded over the cp ranks) for the video config.
- A checkpoint written at context_parallel = 2 resumes in one process.
- Heads or tokens not divisible by N, and sequences shorter than N, are clear errors.
- cp x FSDP2 over 4 processes (2 data ranks x 2 cp ranks, weights sharded over all 4) for the video
  config reproduces one process; so does cp x HSDP (shard_size = 2) on the same 4.
- The video DiT in bf16 at cp = 2 matches the one-process bf16 run to bf16's own accuracy (gloo moves
  the bf16 tensors).
The multi-process tests (torchrun, gloo, one thread per rank) are marked slow.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddrl_engine.attention.context_parallel import check_context_parallel
from ddrl_engine.models.dit import DiT, DiTConfig
from ddrl_engine.trainer.config import DistributedConfig, config_from_dict
from tests.trainer_helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent
LOSSES = ("policy_loss", "data_loss", "grad_norm", "reward", "adv_abs", "clip_frac", "ratio_dev")

IMAGE = DiTConfig(hidden=32, depth=2, heads=4, num_classes=10)  # 8x8 digits, 2x2 patches: 16 tokens
VIDEO = DiTConfig(in_channels=2, sample_size=(4, 4, 4), patch_size=(1, 2, 2), hidden=48, depth=2, heads=4,
                  num_classes=3)  # 4 frames of 2x2 patches: 16 tokens


# ---- helpers shared with tests/cp_worker.py --------------------------------------------------------

def model_case(video: bool, seed: int):
    """(config, x, t, cond, generator) of the model-level comparison."""
    cfg = VIDEO if video else IMAGE
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *cfg.sample_shape, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (3,), generator=g)
    return cfg, x, t, y, g


class _VideoData:
    """A synthetic off-policy set of video latents (train_x [N, C, T, H, W], train_y [N])."""

    def __init__(self, cfg: DiTConfig, n: int = 32):
        g = torch.Generator().manual_seed(7)
        self.train_x = torch.randn(n, *cfg.sample_shape, generator=g).clamp(-1, 1)
        self.train_y = torch.randint(0, cfg.num_classes, (n,), generator=g)


def cp_config(out, video: bool, steps: int, parallel: str = "none", cp: int = 1, shard_size: int = 0):
    cfg = tiny_config(out, steps=steps)
    cfg = replace(cfg, model=VIDEO if video else IMAGE,
                  distributed=DistributedConfig(parallel=parallel, context_parallel=cp, shard_size=shard_size))
    return cfg


def make_cp_trainer(cfg):
    """A Trainer on cp_config's model with random weights (so attention matters from step 1)."""
    from ddrl_engine.trainer.builders import build_dataset, build_rewards, build_sampler
    from ddrl_engine.trainer.loop import Trainer

    video = len(cfg.model.sample_size) == 3
    dataset = _VideoData(cfg.model) if video else build_dataset(cfg)
    torch.manual_seed(0)
    policy = DiT(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.05, generator=g)
    return Trainer(cfg, policy, build_sampler(cfg), build_rewards(cfg), dataset, None, log=lambda *a: None)


def run_records(trainer, gather=None, save_every: int = 0) -> list[dict]:
    records = []
    while trainer.step < trainer.cfg.run.steps:
        batch = trainer.collect()
        adv = trainer.await_rewards(batch).advantages
        adv = gather(adv) if gather is not None else adv
        metrics = trainer.update(batch)
        records.append({"step": trainer.step, "advantages": adv.tolist(), "metrics": metrics})
        if save_every and trainer.step % save_every == 0:
            trainer.save()
    return records


def _torchrun(nproc: int, *args, env: dict | None = None, worker: str = "tests.cp_worker") -> subprocess.CompletedProcess:
    """The `worker` module (tests/cp_worker.py) with ARGS on `nproc` gloo ranks (one thread each; `env` added
    to the environment)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", worker, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _assert_same(records, reference, *, atol=1e-5, rtol=1e-4):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        # float tolerance: the cp all-to-all changes attention's reduction order, so rewards (and the
        # advantages normalised by a small group std) differ in the last digits
        torch.testing.assert_close(torch.tensor(got["advantages"]), torch.tensor(want["advantages"]),
                                   atol=atol, rtol=rtol)
        for k in LOSSES:
            assert got["metrics"][k] == pytest.approx(want["metrics"][k], rel=rtol, abs=atol), (got["step"], k)


# ---- fast checks (one process) -----------------------------------------------------------------

@pytest.mark.parametrize("heads, tokens, size, match", [
    (3, 16, 2, r"heads \(3\) must be divisible"),
    (4, 1, 2, r"sequence \(1 tokens\) is shorter than the cp group"),
    (4, 6, 4, r"sequence \(6 tokens\) is shorter|must be divisible"),
    (4, 10, 4, r"sequence \(10 tokens\) must be divisible"),
    (4, 16, 0, r"context_parallel must be >= 1"),
])
def test_bad_shapes_are_clear_errors(heads, tokens, size, match):
    with pytest.raises(ValueError, match="distributed.context_parallel") as e:
        check_context_parallel(heads, tokens, size, "DiT")
    assert e.match(match)


@pytest.mark.parametrize("text_tokens", [-1, 6, 7])
def test_joint_text_must_leave_image_tokens(monkeypatch, text_tokens):
    """Joint Ulysses (SD3 / FLUX) refuses a text length that leaves no image tokens, before communicating."""
    import torch.distributed as dist

    from ddrl_engine.attention.context_parallel import ulysses_attention

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match=rf"text_tokens = {text_tokens} must leave image tokens"):
        ulysses_attention(q, q, q, object(), lambda *a: None, text_tokens=text_tokens)


def test_good_shapes_pass():
    check_context_parallel(4, 16, 2)
    check_context_parallel(8, 75_000, 8)


def test_dit_refuses_a_group_it_cannot_split(monkeypatch):
    """DiT.set_context_parallel checks heads and tokens against the group size before any work."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible"):
        DiT(DiTConfig(hidden=48, heads=3, depth=1)).set_context_parallel(object())
    with pytest.raises(ValueError, match=r"sequence \(1 tokens\) is shorter"):
        DiT(DiTConfig(hidden=32, heads=2, depth=1, sample_size=(2, 2))).set_context_parallel(object())


def test_config_is_validated():
    assert config_from_dict({"distributed": {"parallel": "ddp", "context_parallel": 2}}).distributed.context_parallel == 2
    with pytest.raises(ValueError, match="distributed.context_parallel"):
        config_from_dict({"distributed": {"parallel": "ddp", "context_parallel": 0}})
    with pytest.raises(ValueError, match="distributed.context_parallel"):
        config_from_dict({"distributed": {"context_parallel": 2}})  # needs a torchrun launch


def test_default_forward_is_untouched(seed):
    """No cp group: the model runs its original path (the demo's numbers), bitwise."""
    cfg, x, t, y, g = model_case(False, seed)
    m = DiT(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2, generator=g)
    before = m(x, t, y)
    m.set_context_parallel(None)
    assert torch.equal(m(x, t, y), before)


# ---- multi-process (torchrun, gloo) ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_sharded_dit_matches_one_process(tmp_path, video, seed):
    """Output and every parameter gradient of the DiT sharded over 2 ranks equal the unsharded model's
    (float tolerance: the all-to-all moves values without arithmetic; only summation order differs)."""
    result = tmp_path / "model.pt"
    _torchrun(2, "model", tmp_path, result, *(["--video"] if video else []), "--seed", seed)
    got = torch.load(result)
    torch.testing.assert_close(got["cp"]["out"], got["plain"]["out"], atol=1e-5, rtol=1e-5)
    assert got["plain"]["out"].abs().max() > 0.1  # the case is not trivial
    # profiling: per block two all-to-all ranges (q, k, v in; output back), one gather of the output
    depth = (VIDEO if video else IMAGE).depth
    assert got["cp_ranges"] == {"ddrl/cp/all_to_all": 2 * depth, "ddrl/cp/all_gather": 1}
    assert got["plain_ranges"] == {}
    for name, want in got["plain"]["grads"].items():
        assert want.abs().max() > 0, name  # every weight gets a gradient (random init, no adaLN-Zero)
        # float32 sums in another order: the tolerance scales with the gradient's size
        atol = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got["cp"]["grads"][name], want, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_sharded_dit_bf16_matches_one_process(tmp_path, seed):
    """The video DiT in bf16 at cp = 2 (gloo all-to-alls, gather, its reduce-scatter and the gradient
    all-reduce all in bf16) gives the one-process bf16 output and gradients to bf16's own accuracy:
    against a float64 run of the same weights, each tensor's cp error is at most twice the one-process
    bf16 error plus one bf16 epsilon of the tensor's size (the split sums round at other points, and
    the gradients once more in the all-reduce). A fixed tolerance does not fit: over seeds 0-19, cp and
    one process differed by up to 3.6 % of a tensor's largest value, one process from float64 by 4.0 %."""
    result = tmp_path / "model.pt"
    _torchrun(2, "model", tmp_path, result, "--video", "--seed", seed, "--dtype", "bfloat16")
    got = torch.load(result)
    assert got["cp_ranges"] == {"ddrl/cp/all_to_all": 2 * VIDEO.depth, "ddrl/cp/all_gather": 1}
    plain, cp, ref = ({"out": got[k]["out"], **got[k]["grads"]} for k in ("plain", "cp", "ref"))
    assert plain.keys() == cp.keys() == ref.keys()
    assert torch.equal(plain["out"], plain["out"].bfloat16().float())  # a bf16 run, not an fp32 one
    eps = torch.finfo(torch.bfloat16).eps
    for name, want in ref.items():
        assert want.abs().max() > 0 and (name == "out" or plain[name].dtype == torch.bfloat16), name
        err, own = ((x.double() - want).abs().max().item() for x in (cp[name], plain[name]))
        assert err <= 2 * own + eps * want.abs().max().item(), (name, err, own)


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    plain = make_cp_trainer(cp_config(tmp / "plain", False, 4))
    records = run_records(plain)
    _torchrun(2, "train", tmp / "cp2", tmp / "cp2.json", "--steps", 4, "--cp", 2, "--parallel", "ddp")
    return {"plain": records, "plain_weights": {k: v.clone() for k, v in plain._module().state_dict().items()},
            "cp2": json.loads((tmp / "cp2.json").read_text()),
            "cp2_weights": torch.load(str(tmp / "cp2.json") + ".weights.pt"), "tmp": tmp}


def _assert_weights(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_cp2_training_reproduces_one_process(image_runs):
    run = image_runs["cp2"]
    assert run["world_size"] == 2 and run["data_size"] == 1 and run["cp_size"] == 2
    _assert_same(run["records"], image_runs["plain"])
    _assert_weights(image_runs["cp2_weights"], image_runs["plain_weights"])
    # the runs move: a regression that froze training would not pass as "equal"
    first = image_runs["plain"][0]["metrics"]
    assert first["grad_norm"] > 0 and first["policy_loss"] != 0


@pytest.mark.slow
def test_cp2_checkpoint_resumes_at_cp1(image_runs):
    ckpt = image_runs["tmp"] / "cp2" / "checkpoints" / "step_0000002"
    trainer = make_cp_trainer(cp_config(image_runs["tmp"] / "resumed", False, 4))
    assert trainer.resume(ckpt)
    _assert_same(run_records(trainer), image_runs["plain"][2:])
    _assert_weights(trainer._module().state_dict(), image_runs["plain_weights"])


@pytest.mark.slow
def test_cp2_fsdp_video_reproduces_one_process(tmp_path):
    """The video DiT under FSDP2 (weights sharded over the two cp ranks) with context_parallel = 2."""
    plain = make_cp_trainer(cp_config(tmp_path / "plain", True, 2))
    records = run_records(plain)
    _torchrun(2, "train", tmp_path / "cp2", tmp_path / "cp2.json", "--video", "--steps", 2, "--cp", 2,
              "--parallel", "fsdp")
    run = json.loads((tmp_path / "cp2.json").read_text())
    assert run["cp_size"] == 2
    _assert_same(run["records"], records)
    _assert_weights(torch.load(str(tmp_path / "cp2.json") + ".weights.pt"), plain._module().state_dict())


@pytest.mark.slow
def test_cp2_x_fsdp_over_4_processes_reproduces_one_process(tmp_path):
    """4 processes = 2 data ranks x 2 cp ranks (mesh ("dp", "cp")), FSDP2 sharding the weights over all
    4: each data rank holds half of the batch, each cp rank half of every sample's tokens; the rewards
    and metrics reduce over the data ranks, the gradients over all 4."""
    plain = make_cp_trainer(cp_config(tmp_path / "plain", True, 2))
    records = run_records(plain)
    _torchrun(4, "train", tmp_path / "cp2", tmp_path / "cp2.json", "--video", "--steps", 2, "--cp", 2,
              "--parallel", "fsdp")
    run = json.loads((tmp_path / "cp2.json").read_text())
    assert run["world_size"] == 4 and run["data_size"] == 2 and run["cp_size"] == 2
    _assert_same(run["records"], records)
    _assert_weights(torch.load(str(tmp_path / "cp2.json") + ".weights.pt"), plain._module().state_dict())


@pytest.mark.slow
def test_cp2_x_hsdp_over_4_processes_reproduces_one_process(tmp_path):
    """HSDP (shard_size = 2: FSDP2 shards over ranks {0, 1} and {2, 3}, replicates across them) with
    context_parallel = 2 on the same 4 ranks: the shard groups are the cp groups, the gradients are
    reduce-scattered inside one and all-reduced across the two, an average over all 4 as the rule needs."""
    plain = make_cp_trainer(cp_config(tmp_path / "plain", True, 2))
    records = run_records(plain)
    _torchrun(4, "train", tmp_path / "hsdp", tmp_path / "hsdp.json", "--video", "--steps", 2, "--cp", 2,
              "--parallel", "fsdp", "--shard-size", 2)
    run = json.loads((tmp_path / "hsdp.json").read_text())
    assert run["world_size"] == 4 and run["data_size"] == 2 and run["cp_size"] == 2
    assert run["fsdp_mesh"] == {"replicate": 2, "shard": 2}  # the run was HSDP, not plain FSDP2
    _assert_same(run["records"], records)
    _assert_weights(torch.load(str(tmp_path / "hsdp.json") + ".weights.pt"), plain._module().state_dict())


# ---- memory and communication estimates ---------------------------------------------------------------

@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("ckpt", [False, True])
def test_memory_estimate_splits_the_block_activations(cp, ckpt):
    from ddrl_engine.trainer.memory import PRESETS, estimate_memory, video_tokens

    shape = PRESETS["wan2.1-14b"].shape
    n = video_tokens(93, 720, 1280)
    assert n == 24 * 45 * 80  # 93 frames -> 24 latent frames; 720 x 1280 -> 90 x 160 latents -> 45 x 80 patches
    one = estimate_memory(shape, tokens=n, world_size=64, activation_checkpointing=ckpt)
    many = estimate_memory(shape, tokens=n, world_size=64, activation_checkpointing=ckpt, context_parallel=cp)
    key = next(k for k in one.parts if k.startswith("activations"))
    # own derivation: bf16 (c = 2) Wan factors (68, 4, 12) per token; the gathered output c N v on top
    h, f, L, c = 5120, 13824, 40, 2
    block = 68 * h + 4 * f
    per_token = (L * c * h + block + 12 * h) if ckpt else (L * block + 12 * h)
    assert many.parts[key] == (n // cp) * per_token + c * n * 64
    assert one.parts[key] == n * per_token
    for k in one.parts:  # everything else is unchanged: weights shard over all 64 GPUs, states stay whole
        if k != key:
            assert many.parts[k] == one.parts[k], k


def test_cp_communication_volume():
    from ddrl_engine.trainer.memory import PRESETS, cp_communication

    shape = PRESETS["wan2.1-14b"].shape
    n, cp = 86_400, 8
    got = cp_communication(shape, tokens=n, context_parallel=cp, rollout_rows=2, data_rows=1, sampler_steps=20,
                           trained_steps=10, compute_bytes=2, activation_checkpointing=True)
    # q, k, v, out all-to-alls per block: 4 * 40 * (n / 8) * 5120 * 2 bytes, 7/8 of it leaves; + the output gather
    row = 7 / 8 * (4 * 40 * (n / 8) * 5120 * 2 + n * 64 * 2)
    assert got["per forward row"] == pytest.approx(row, rel=1e-12)
    assert got["rollout"] == pytest.approx(20 * 2 * row, rel=1e-12)
    assert got["update"] == pytest.approx(10 * 3 * 3 * row, rel=1e-12)  # fwd + bwd + recomputed fwd, 3 rows
    assert cp_communication(shape, tokens=n, context_parallel=1)["step"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(context_parallel=16), r"attention heads \(40"),
    (dict(context_parallel=3, world_size=64), r"must divide 'world_size'"),
    (dict(context_parallel=0), r"'context_parallel' must be an integer >= 1"),
])
def test_memory_estimate_rejects_bad_cp(kwargs, match):
    from ddrl_engine.trainer.memory import PRESETS, estimate_memory

    kwargs = {"world_size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate_memory(PRESETS["wan2.1-14b"].shape, tokens=86_400, **kwargs)


def test_memory_cli_prints_the_cp_volume(capsys):
    from ddrl_engine.cli import main

    main(["memory", "--preset", "wan2.1-14b", "--frames", "93", "--height", "720", "--width", "1280",
          "--world-size", "64", "--context-parallel", "8", "--activation-checkpointing"])
    out = capsys.readouterr().out
    assert "context parallelism 8 (8 data ranks)" in out and "GiB sent per GPU per forward row" in out

"""Two-expert Wan2.2 (A14B: `transformer` for high noise, `transformer_2` for low noise) as one policy, on a
tiny random folder built with diffusers' save_pretrained (both experts random and distinct): routing equal
to WanPipeline's expert choice, mixed-level batches, LoRA on both experts, `ddrl-engine train` with exact
resume, export loaded back by diffusers' own LoRA loader (both calls) bit-exact, and the errors of bad
folders / options."""

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("peft", reason="peft is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("transformers", reason="transformers is an optional dependency")

from safetensors.torch import load_file  # noqa: E402

from ddrl_engine.models.diffusers import WanExpertsPolicy  # noqa: E402
from ddrl_engine.models.lora_export import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2  # noqa: E402
from ddrl_engine.pipelines import load_bundle, preflight  # noqa: E402
from ddrl_engine.trainer.config import load_config  # noqa: E402
from ddrl_engine.trainer.pipeline_run import build_pipeline_run  # noqa: E402
from tests.trainer_helpers import torchrun_train  # noqa: E402
from tests.test_pickscore import save_tiny_clip  # noqa: E402
from tests.test_pipeline_run import (EVAL_PROMPTS, TRAIN_PROMPTS, assert_same_metrics, check_run, cli,  # noqa: E402
                                     config, metrics, trained_policy, untimed, write)
from tests.tiny_pipelines import make_wan22_a14b_pipeline, make_wan_pipeline  # noqa: E402

BOUNDARY = 0.875  # the tiny folder's boundary_ratio (Wan2.2-T2V-A14B's); boundary timestep 875


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22_experts")
    a = {"root": root, "a14b": make_wan22_a14b_pipeline(root / "models"), "clip": save_tiny_clip(root / "pickscore")}
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "test.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    return a


@pytest.fixture(scope="module")
def bundle(assets):
    return load_bundle("wan", assets["a14b"], resolution=(5, 16, 16), dtype=torch.float32, device="cpu")


def _inputs(seed, t):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(t), 16, 2, 2, 2, generator=g), torch.randn(len(t), 5, 32, generator=g)


def _expert(model, x, timestep, emb):
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]


def test_the_folder_loads_as_two_distinct_experts(assets, bundle):
    policy = bundle.policy
    assert isinstance(policy, WanExpertsPolicy) and preflight("wan", assets["a14b"], (5, 16, 16)).two_experts
    assert bundle.pipeline.transformer is policy.model and bundle.pipeline.transformer_2 is policy.model_2
    assert policy.boundary_timestep == BOUNDARY * 1000
    a, b = policy.model.state_dict(), policy.model_2.state_dict()
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a if a[k].dim() == 2)
    assert len(policy.blocks) == 4 and policy.blocks[2] is policy.model_2.blocks[0]


def test_routing_is_the_pipelines_expert_choice(bundle, seed):
    """Run WanPipeline itself (4 steps; its levels fall on both sides of the boundary), record which expert
    it calls at each timestep with which input and output, and check the policy routes every call's level
    to that expert with the same output bitwise."""
    pipe, policy = bundle.pipeline, bundle.policy
    calls = []

    def hook(name):
        def record(module, args, kwargs, out):
            calls.append((name, kwargs["hidden_states"].clone(), kwargs["timestep"].clone(),
                          kwargs["encoder_hidden_states"].clone(), out[0].clone()))
        return record

    handles = [pipe.transformer.register_forward_hook(hook("transformer"), with_kwargs=True),
               pipe.transformer_2.register_forward_hook(hook("transformer_2"), with_kwargs=True)]
    try:
        with torch.no_grad():
            pipe(prompt=["a red car", "a blue bird"], height=16, width=16, num_frames=5, num_inference_steps=4,
                 guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 4
    names = [c[0] for c in calls]
    assert "transformer" in names and "transformer_2" in names  # both sides of the boundary were sampled
    for name, x, timestep, emb, out in calls:
        # float64 reference of the rule: timestep >= boundary_ratio * num_train_timesteps -> transformer
        want = "transformer" if float(timestep[0].double()) >= BOUNDARY * 1000.0 else "transformer_2"
        assert name == want
        t = (timestep.double() / 1000.0).float()
        assert torch.equal(t * 1000.0, timestep.float()), timestep  # the level round-trips to the timestep
        assert bool(policy.high_noise(t).all()) == (name == "transformer")
        with torch.no_grad():
            ours = policy(x, t, emb)
        assert torch.equal(ours, out), name


@pytest.mark.parametrize("levels", [(0.9, 0.5, 0.875, 0.8749, 0.2, 1.0), (0.3, 0.99, 0.6)])
def test_mixed_levels_route_each_row_to_its_expert(bundle, levels, seed):
    """A batch whose rows straddle the boundary (the trainer's recomputation / data loss): every row is its
    expert's output on those rows (bitwise), close to the expert's full-batch output, far from the other
    expert's."""
    policy = bundle.policy
    t = torch.tensor(levels)
    x, emb = _inputs(seed, t)
    high = torch.tensor([float(v) * 1000.0 >= BOUNDARY * 1000.0 for v in torch.tensor(levels).double()])
    assert torch.equal(policy.high_noise(t), high) and 0 < int(high.sum()) < len(levels)
    with torch.no_grad():
        out = policy(x, t, emb)
        for model, rows in ((policy.model, high.nonzero().squeeze(1)), (policy.model_2, (~high).nonzero().squeeze(1))):
            ref = _expert(model, x[rows], t[rows] * 1000.0, emb[rows])
            assert torch.equal(out[rows], ref)
            full = _expert(model, x, t * 1000.0, emb)
            torch.testing.assert_close(out[rows], full[rows], rtol=1e-5, atol=1e-5)
            other = policy.model_2 if model is policy.model else policy.model
            assert not torch.allclose(out[rows], _expert(other, x, t * 1000.0, emb)[rows], atol=1e-3)


def test_lora_on_both_experts_seeded_distinctly(assets):
    a = load_bundle("wan", assets["a14b"], resolution=(5, 16, 16), dtype=torch.float32, device="cpu").policy
    b = load_bundle("wan", assets["a14b"], resolution=(5, 16, 16), dtype=torch.float32, device="cpu").policy
    torch.manual_seed(123)
    n = a.enable_lora(4, seed=7)
    torch.manual_seed(456)  # the global RNG does not matter
    assert b.enable_lora(4, seed=7) == n
    sd_a, sd_b = a.trainable_state_dict(), b.trainable_state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    ones = {k[len("model."):]: v for k, v in sd_a.items() if k.startswith("model.")}
    twos = {k[len("model_2."):]: v for k, v in sd_a.items() if k.startswith("model_2.")}
    assert ones and ones.keys() == twos.keys() and len(ones) + len(twos) == len(sd_a)
    assert n == sum(v.numel() for v in sd_a.values())
    lora_a = [k for k in ones if "lora_A" in k]
    assert lora_a and all(not torch.equal(ones[k], twos[k]) for k in lora_a)  # distinct seeds
    # the first expert's adapter is the one-transformer policy's with the same seed (run.seed itself)
    single = load_bundle("wan", make_wan_pipeline(assets["root"] / "models"), resolution=(5, 16, 16),
                         dtype=torch.float32, device="cpu").policy
    single.enable_lora(4, seed=7)
    sd_s = single.trainable_state_dict()
    assert sd_s.keys() == {f"model.{k}" for k in ones}
    assert all(torch.equal(sd_s[f"model.{k}"], ones[k]) for k in ones)


def test_train_resume_and_export_load_into_wan_pipeline(assets, tmp_path, capsys):
    """2 steps of `ddrl-engine train` (synthetic base-model data); 1 step + resume gives the same metrics;
    both experts' adapters train; the export loads into WanPipeline with the two documented calls and
    gives both trained experts' outputs bitwise."""
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", "wan", folder="a14b", synthetic=True))
    rc, _, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    run = tmp_path / "run"
    check_run(run, ".gif")
    keys = load_file(run / "checkpoints" / "step_0000002" / "model.safetensors").keys()
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("model_2.") for k in keys)
    # resume: 1 step, then on to 2, equals the uninterrupted run
    rc, _, err = cli(capsys, "train", "--config", cfg, "--out", tmp_path / "resumed", "--steps", 1)
    assert rc == 0, err
    rc, _, err = cli(capsys, "train", "--config", cfg, "--out", tmp_path / "resumed")
    assert rc == 0, err
    assert "resumed from" in err and "at step 1" in err
    assert [untimed(m) for m in metrics(tmp_path / "resumed", "train")] == [untimed(m) for m in metrics(run, "train")]
    # export, then diffusers' own loading
    rc, out, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "lora")
    assert rc == 0, err
    assert Path(out.strip()) == tmp_path / "lora" / LORA_WEIGHT_NAME
    assert (tmp_path / "lora" / LORA_WEIGHT_NAME_2).is_file() and "load_into_transformer_2=True" in err
    _, policy = trained_policy(run)
    pipe = diffusers.WanPipeline.from_pretrained(assets["a14b"], local_files_only=True)
    base = WanExpertsPolicy(pipe.transformer, pipe.transformer_2, policy.sample_shape, boundary_ratio=BOUNDARY,
                            ddrl_attention=False).eval()
    t = torch.tensor([0.95, 0.3, 0.9, 0.6])  # both experts
    x, emb = _inputs(2, t)
    with torch.no_grad():
        before = base(x, t, emb)
        pipe.load_lora_weights(tmp_path / "lora")
        pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_WEIGHT_NAME_2, load_into_transformer_2=True)
        theirs, ours = base(x, t, emb), policy(x, t, emb)
    high = policy.high_noise(t)
    for rows in (high, ~high):  # each expert's adapters changed in training and were loaded exactly
        assert not torch.equal(before[rows], ours[rows])
        assert torch.equal(theirs[rows], ours[rows])


def test_full_fine_tune_trains_and_exports_both_experts(assets, tmp_path, capsys):
    cfg = write(tmp_path / "run.toml", config(assets, tmp_path / "run", "wan", folder="a14b", synthetic=True,
                                              model__lora_rank=0, run__steps=1, eval__heldout_loss_levels=1))
    rc, _, err = cli(capsys, "train", "--config", cfg)
    assert rc == 0, err
    rc, out, err = cli(capsys, "export", "--run", tmp_path / "run", "--out", tmp_path / "out")
    assert rc == 0, err
    _, policy = trained_policy(tmp_path / "run")
    for sub, model in (("transformer", policy.model), ("transformer_2", policy.model_2)):
        exported = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "out" / sub, local_files_only=True)
        base = diffusers.WanTransformer3DModel.from_pretrained(assets["a14b"] / sub, local_files_only=True)
        ours, trained = exported.state_dict(), model.state_dict()
        assert ours.keys() == trained.keys() and all(torch.equal(ours[k], trained[k]) for k in ours)
        assert any(not torch.equal(ours[k], v) for k, v in base.state_dict().items())  # both experts trained


# ----------------------------------------------------------------------------------------------- bad input


def _edited_folder(assets, tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(assets["a14b"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    edit(index, folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("case", ["no_boundary", "boundary_out_of_range", "boundary_without_expert",
                                  "no_expert_config", "experts_disagree"])
def test_bad_two_expert_folders_are_clear_errors_before_loading(assets, tmp_path, case, monkeypatch):
    def edit(index, folder):
        if case == "no_boundary":
            index.pop("boundary_ratio")
        elif case == "boundary_out_of_range":
            index["boundary_ratio"] = 1.5
        elif case == "boundary_without_expert":
            index["transformer_2"] = [None, None]
        elif case == "no_expert_config":
            (folder / "transformer_2" / "config.json").unlink()
        else:
            cfg = json.loads((folder / "transformer_2" / "config.json").read_text())
            cfg["text_dim"] = 64
            (folder / "transformer_2" / "config.json").write_text(json.dumps(cfg))

    needles = {"no_boundary": ["model.path", "no boundary_ratio"], "boundary_out_of_range": ["boundary_ratio", "(0, 1]"],
               "boundary_without_expert": ["boundary_ratio", "no transformer_2"],
               "no_expert_config": ["transformer_2/config.json"], "experts_disagree": ["disagree on text_dim"]}[case]
    folder = _edited_folder(assets, tmp_path, case, edit)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the folder was checked")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_bundle("wan", folder, resolution=(5, 16, 16), dtype=torch.float32, device="cpu")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_cuda_graph_rollouts_are_refused_before_loading(assets, tmp_path, monkeypatch):
    cfg = load_config(write(tmp_path / "run.toml", config(assets, tmp_path / "run", "wan", folder="a14b", synthetic=True)))
    cfg.rollout.cuda_graph = True  # (the CPU config check would refuse it first; the pipeline check is this one)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the option was checked")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError, match=r"rollout\.cuda_graph.*two-expert"):
        build_pipeline_run(cfg, log=lambda *_: None, progress=False)


def test_policy_arguments_are_checked(bundle):
    p = bundle.policy
    for bad in (0.0, 1.5, None, True):
        with pytest.raises(ValueError, match="boundary_ratio"):
            WanExpertsPolicy(p.model, p.model_2, p.sample_shape, boundary_ratio=bad)
    with pytest.raises(ValueError, match="same module"):
        WanExpertsPolicy(p.model, p.model, p.sample_shape, boundary_ratio=BOUNDARY)


def test_the_example_config_loads():
    from ddrl_engine.trainer.config import PipelineModelConfig

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "wan22_a14b_lora.toml")
    assert isinstance(cfg.model, PipelineModelConfig) and cfg.model.kind == "wan" and cfg.model.lora_rank == 32
    assert not cfg.rollout.cuda_graph


@pytest.mark.slow
def test_two_rank_fsdp_matches_one_process_and_exports(assets, tmp_path, capsys):
    """torchrun, 2 CPU ranks (gloo), FSDP2 over the blocks of both experts: the same metrics as one process
    to float rounding, and its DCP checkpoint exports the same two LoRA files. The reward is brightness:
    the tiny CLIP reward's group spreads are ~1e-4, where a reward's last bit (other batch sizes per rank)
    moves the advantages by ~1e-3 and can flip the sign of near-zero gradients, i.e. of Adam's first step."""
    bright = {"brightness": 1.0}
    one = write(tmp_path / "one.toml", config(assets, tmp_path / "one", "wan", folder="a14b", synthetic=True, rewards=bright))
    rc, _, err = cli(capsys, "train", "--config", one)
    assert rc == 0, err
    cfg = config(assets, tmp_path / "two", "wan", folder="a14b", synthetic=True, rewards=bright)
    cfg["distributed"] = {"parallel": "fsdp"}
    path = write(tmp_path / "two.toml", cfg)
    torchrun_train(path, tmp_path / "cache")
    got, want = metrics(tmp_path / "two", "train"), metrics(tmp_path / "one", "train")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2]
    for g, w in zip(got, want):
        assert_same_metrics(g, w)
    for run in ("one", "two"):
        rc, _, err = cli(capsys, "export", "--run", tmp_path / run, "--out", tmp_path / f"{run}_lora")
        assert rc == 0, err
    for name in (LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2):
        a, b = load_file(tmp_path / "one_lora" / name), load_file(tmp_path / "two_lora" / name)
        assert a.keys() == b.keys() and a
        for k in a:
            # Adam normalises each entry's gradient: an entry whose gradient is near Adam's eps moves by a
            # rounding-sensitive fraction of lr (1e-4) per step; 5% of one step (seen: 1.2e-6 on an AMD EPYC)
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-6)


@pytest.mark.parametrize("levels", [(0.9, 0.95), (0.3, 0.5)])
def test_an_expert_another_rank_needs_runs_here_without_changing_the_output(bundle, levels, seed, monkeypatch):
    """Under FSDP2 every rank must run the experts any rank needs (`_experts_needed` all-reduces the flags;
    forced here in one process): a batch of one expert's rows then also runs the other expert on one row,
    and the output stays bitwise the same, with zero (not missing) gradients for the other expert."""
    import copy

    policy = copy.deepcopy(bundle.policy)
    policy.enable_lora(4, seed=seed % 2**31)
    t = torch.tensor(levels)
    x, emb = _inputs(seed, t)
    plain = policy(x, t, emb)
    monkeypatch.setattr(WanExpertsPolicy, "_experts_needed", lambda self, high, low, device: (True, True))
    forced = policy(x, t, emb)
    assert torch.equal(plain, forced)
    forced.square().sum().backward()
    used, other = (policy.model, policy.model_2) if levels[0] >= BOUNDARY else (policy.model_2, policy.model)
    grads = [p.grad for p in other.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)
    assert any(p.grad is not None and p.grad.any() for p in used.parameters() if p.requires_grad)

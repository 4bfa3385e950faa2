"""The LoRA lifecycle of the diffusers policies: seeded init, adapter-only state, diffusers exports."""

import copy
import inspect

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install ddrl-engine[diffusers])")
pytest.importorskip("peft", reason="peft is an optional dependency (pip install ddrl-engine[diffusers])")

from ddrl_engine.models import DiT, DiTConfig  # noqa: E402
from ddrl_engine.models.lora_export import LORA_WEIGHT_NAME, export_lora, export_transformer, pipeline_class  # noqa: E402
from ddrl_engine.models.trainable import select_trainable, trainable_keys, trainable_state_dict  # noqa: E402
from tests.test_diffusers_adapters import CASES, inputs, prompts  # noqa: E402


def build(name, *, base_seed=0):
    """A tiny policy whose base weights depend on base_seed only."""
    cls, make_model, shape = CASES[name]
    torch.manual_seed(base_seed)
    return cls(make_model().eval(), shape, prompts()), shape


def lora_tensors(policy):
    return {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}


def perturb_lora_b(policy, seed=7):
    """Non-zero lora_B (as a trained adapter would have), drawn from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ----------------------------------------------------------------------------------------------- seeded init


@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_lora_ignores_the_global_rng(name):
    a, shape = build(name)
    b, _ = build(name)
    torch.manual_seed(123)
    torch.rand(17)  # a different global RNG state for each build
    state = torch.get_rng_state()
    a.enable_lora(rank=4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the seeded call consumes nothing of the global RNG
    torch.manual_seed(999)
    b.enable_lora(rank=4, seed=5)
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # peft's law: lora_A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), lora_B = 0 (the policy is unchanged).
    for k, v in ta.items():
        if "lora_A" in k:
            assert v.abs().max() <= v[0].numel() ** -0.5 and v.abs().max() > 0.5 * v[0].numel() ** -0.5, k
        else:
            assert "lora_B" in k and not v.any(), k
    # The symptom that was reported: identical runs, different gradient norms. Now identical.
    x, t, cond = inputs(shape)
    norms = []
    for p in (a, b):
        p(x, t, cond).square().mean().backward()
        norms.append(torch.stack([q.grad.norm() for q in p.parameters() if q.requires_grad]).norm())
    assert torch.equal(norms[0], norms[1])

    c, _ = build(name)
    torch.manual_seed(123)
    torch.rand(17)
    c.enable_lora(rank=4, seed=6)
    tc = lora_tensors(c)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta if "lora_A" in k)


def test_unseeded_lora_follows_the_global_rng():
    """Without a seed peft's initialisation is kept: it depends on the global RNG (why seed= exists)."""
    a, _ = build("sd3")
    b, _ = build("sd3")
    torch.manual_seed(1)
    a.enable_lora(rank=4)
    torch.manual_seed(2)
    b.enable_lora(rank=4)
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)


def test_seed_is_validated():
    policy, _ = build("sd3")
    with pytest.raises(ValueError, match="seed"):
        policy.enable_lora(rank=4, seed=1.5)


# ----------------------------------------------------------------------------------------------- adapter-only state


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_trainable_state_dict_is_the_adapters(name):
    policy, shape = build(name)
    full = policy.trainable_state_dict()
    assert full.keys() == policy.state_dict().keys()  # no LoRA: everything
    policy.enable_lora(rank=4, seed=0)
    perturb_lora_b(policy)
    sd = policy.trainable_state_dict()
    assert sd and all("lora_" in k for k in sd)
    assert set(sd) == {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(sd) == set(policy.lora_keys()) and set(sd) <= set(policy.state_dict())
    # The generic rule agrees with the adapter's own.
    assert trainable_keys(policy) == frozenset(sd)
    n_all = sum(v.numel() for v in policy.state_dict().values())
    assert sum(v.numel() for v in sd.values()) < 0.2 * n_all

    # Resume: rebuild the frozen base from its source, enable the same LoRA, load the adapters.
    saved = {k: v.clone() for k, v in sd.items()}
    fresh, _ = build(name)
    fresh.enable_lora(rank=4, seed=0)
    fresh.load_trainable_state_dict(saved)
    x, t, cond = inputs(shape)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, cond), policy(x, t, cond))


def test_load_trainable_state_dict_is_strict():
    policy, _ = build("sd3")
    policy.enable_lora(rank=4, seed=0)
    sd = policy.trainable_state_dict()
    first = next(iter(sd))
    with pytest.raises(ValueError, match=rf"missing 1 key\(s\): {first}"):
        policy.load_trainable_state_dict({k: v for k, v in sd.items() if k != first})
    with pytest.raises(ValueError, match="1 unexpected key.*model.pos_embed"):
        policy.load_trainable_state_dict({**sd, "model.pos_embed.pos_embed": policy.model.pos_embed.pos_embed})
    other, _ = build("sd3")
    other.enable_lora(rank=2, seed=0)
    with pytest.raises(ValueError, match=r"is \[4, .*\] in the state dict but \[2, "):
        other.load_trainable_state_dict(sd)
    plain, _ = build("sd3")
    with pytest.raises(ValueError, match="call enable_lora"):
        plain.load_trainable_state_dict(sd)


# ----------------------------------------------------------------------------------------------- generic rule


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.other = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def test_trainable_rule_full_fine_tune_writes_everything():
    dit = DiT(DiTConfig(depth=1))
    assert trainable_keys(dit) is None
    assert trainable_state_dict(dit).keys() == dit.state_dict().keys()
    m = WithBuffer()
    assert trainable_state_dict(m).keys() == {"lin.weight", "lin.bias", "other.weight", "other.bias", "scale"}
    # A wholly frozen module (the reference or EMA copy of a full fine-tune) also writes everything.
    frozen = copy.deepcopy(dit).requires_grad_(False)
    assert trainable_keys(frozen) is None


def test_trainable_rule_partial_fine_tune_writes_the_trained_tensors():
    m = WithBuffer()
    m.other.requires_grad_(False)
    assert trainable_keys(m) == {"lin.weight", "lin.bias"}  # frozen layer and buffers: the base
    tied = WithBuffer()
    tied.other.weight = tied.lin.weight  # one parameter under two keys: both are written
    tied.other.bias.requires_grad_(False)
    assert trainable_keys(tied) == {"lin.weight", "lin.bias", "other.weight"}

    policy, _ = build("sd3")
    policy.enable_lora(rank=4, seed=0)
    keys = trainable_keys(policy)
    assert keys and all("lora_" in k for k in keys)
    # The EMA / reference of a LoRA run: a frozen deep copy; `like=` gives the adapters' keys.
    ema = copy.deepcopy(policy).requires_grad_(False)
    assert trainable_keys(ema) is None
    assert trainable_keys(ema, like=policy) == keys
    assert trainable_state_dict(ema, like=policy).keys() == keys
    # select_trainable filters a given state dict (e.g. get_model_state_dict under FSDP2).
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    assert select_trainable(policy, get_model_state_dict(policy)).keys() == keys
    with pytest.raises(ValueError, match="lacks"):
        select_trainable(policy, {})
    with pytest.raises(ValueError, match="not a copy"):
        trainable_keys(DiT(DiTConfig(depth=1)), like=policy)


# ----------------------------------------------------------------------------------------------- exports


def base_pipeline(policy, transformer):
    """The policy's diffusers pipeline holding only `transformer` and a scheduler (no VAE, no text encoders)."""
    cls = pipeline_class(policy)
    sig = inspect.signature(cls.__init__).parameters
    kwargs = {n: None for n, p in sig.items() if n != "self" and p.default is inspect.Parameter.empty}
    kwargs.update(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    return cls(**kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_lora_loads_into_the_diffusers_pipeline(name, tmp_path):
    policy, shape = build(name)
    base = copy.deepcopy(policy.model)  # the untouched base transformer (what the model folder holds)
    policy.enable_lora(rank=4, alpha=8, seed=0)  # alpha != rank: the scaling must travel too
    perturb_lora_b(policy)
    # A little training, so lora_A moves too.
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    x, t, cond = inputs(shape)
    policy(x, t, cond).square().mean().backward()
    opt.step()

    with torch.no_grad():
        plain = type(policy)(copy.deepcopy(base), shape, prompts())(x, t, cond)
    path = export_lora(policy, tmp_path / "lora")
    assert path.name == LORA_WEIGHT_NAME and path.is_file()
    pipe = base_pipeline(policy, base)
    pipe.load_lora_weights(tmp_path / "lora")
    assert pipe.transformer.peft_config  # the adapters are in
    config = next(iter(pipe.transformer.peft_config.values()))
    assert config.r == 4 and config.lora_alpha == 8
    loaded = type(policy)(pipe.transformer, shape, prompts())
    with torch.no_grad():
        ours = policy(x, t, cond)
        theirs = loaded(x, t, cond)
    # Bit-exact: the same fp32 tensors, the same peft layers and scaling, the same ops in the same order.
    assert torch.equal(theirs, ours)
    assert not torch.equal(plain, ours)  # and the adapter does change the output


def test_export_errors(tmp_path):
    policy, _ = build("sd3")
    with pytest.raises(ValueError, match="the run has no LoRA.*export_transformer"):
        export_lora(policy, tmp_path / "lora")
    policy.enable_lora(rank=4, seed=0)
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        export_lora(policy, tmp_path / "lora", adapter_name="other")
    with pytest.raises(ValueError, match="export_lora"):
        export_transformer(policy, tmp_path / "transformer")
    with pytest.raises(TypeError, match="diffusers policy"):
        export_lora(DiT(DiTConfig(depth=1)), tmp_path / "x")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_export_transformer_of_a_full_fine_tune(name, tmp_path):
    policy, shape = build(name)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    export_transformer(policy, tmp_path / "transformer")
    model_cls = getattr(diffusers, policy.model_class_name)
    reloaded = type(policy)(model_cls.from_pretrained(tmp_path / "transformer").eval(), shape, prompts())
    x, t, cond = inputs(shape)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, cond), policy(x, t, cond))


# ----------------------------------------------------------------------------------------------- frozen copies


@pytest.mark.parametrize("name", sorted(CASES))
def test_frozen_copy_shares_the_frozen_base(name):
    """The KL reference / EMA of a LoRA run (Trainer's frozen_copy): the base tensors are the policy's own,
    the adapters are copies, everything is frozen; without sharing (FSDP2) or for a full fine-tune
    (nothing frozen to share) every tensor is a copy."""
    from ddrl_engine.models.trainable import frozen_copy

    policy, _ = build(name)
    policy.enable_lora(4, seed=0)
    perturb_lora_b(policy)
    ref = frozen_copy(policy, True)
    mine, theirs = dict(policy.named_parameters()), dict(ref.named_parameters())
    assert mine.keys() == theirs.keys() and not any(p.requires_grad for p in theirs.values())
    for k, p in mine.items():
        assert (theirs[k] is p) == (not p.requires_grad), k  # shared exactly when frozen in the policy
        assert torch.equal(theirs[k], p), k
    before = lora_tensors(ref)
    with torch.no_grad():  # training the policy's adapters leaves the copy's as they were
        for k, p in mine.items():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(v, lora_tensors(ref)[k]) for k, v in before.items())
    assert all(p.requires_grad for k, p in mine.items() if "lora_" in k)  # the policy is untouched
    assert not any(q is p for q, p in zip(frozen_copy(policy, False).parameters(), policy.parameters()))
    full = DiT(DiTConfig(hidden=32, depth=1, heads=2, num_classes=2))
    assert not any(q is p for q, p in zip(frozen_copy(full, True).parameters(), full.parameters()))


def test_lora_trainer_reference_and_ema_share_the_base(tmp_path, monkeypatch):
    """A LoRA pipeline run with a KL reference and EMA: both hold the policy's base tensors (no second or
    third copy of the transformer); after two updates the reference's adapters are still the initial ones,
    the EMA's are the decayed average of the policy's, and a checkpoint resumes them."""
    from dataclasses import replace

    from ddrl_engine.trainer.config import load_config
    from ddrl_engine.trainer.loop import Trainer
    from ddrl_engine.trainer.pipeline_run import build_pipeline_run
    from tests.test_diffusers_context_parallel import pipeline_config
    from tests.tiny_pipelines import make_wan_pipeline

    monkeypatch.setenv("DDRL_ENGINE_CACHE", str(tmp_path / "cache"))
    folder = make_wan_pipeline(tmp_path / "models")
    base = load_config(pipeline_config(tmp_path, folder, tmp_path / "run"))
    decay = 0.5

    def trainer(out):
        cfg = replace(base, run=replace(base.run, out_dir=str(out)), algorithm=replace(base.algorithm, beta_kl=0.1),
                      optim=replace(base.optim, ema_decay=decay))
        run = build_pipeline_run(cfg, log=lambda *a: None, progress=False)
        return Trainer(cfg, run.policy, run.sampler, run.rewards, run.dataset, run.evaluator, conditions=run.conditions,
                       decode=run.decode, log=lambda *a: None)

    tr = trainer(tmp_path / "run")
    policy = dict(tr.policy.named_parameters())
    for copy_ in (tr.reference, tr.ema):
        for k, p in copy_.named_parameters():
            assert (p is policy[k]) == ("lora_" not in k), k
    start = lora_tensors(tr.policy)
    ema = dict(start)
    for _ in range(2):
        tr.update(tr.collect())
        for k, v in lora_tensors(tr.policy).items():
            ema[k] = ema[k].lerp(v, 1 - decay)
    trained = lora_tensors(tr.policy)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the adapters trained
    assert all(torch.equal(v, start[k]) for k, v in lora_tensors(tr.reference).items())
    for k, v in lora_tensors(tr.ema).items():
        torch.testing.assert_close(v, ema[k], atol=1e-6, rtol=1e-6)
    tr.save()
    resumed = trainer(tmp_path / "resumed")
    assert resumed.resume(tr.out / "checkpoints" / f"step_{tr.step:07d}")
    for a, b in ((resumed.reference, tr.reference), (resumed.ema, tr.ema), (resumed.policy, tr.policy)):
        assert all(torch.equal(v, lora_tensors(b)[k]) for k, v in lora_tensors(a).items())
    assert all(p is dict(resumed.policy.named_parameters())[k] for k, p in resumed.reference.named_parameters()
               if "lora_" not in k)  # resuming keeps the base shared


# ------------------------------------------------------------------------------------ adapters' dtype


def _changed_fraction_after_one_step(policy, shape, lr):
    """Fraction of the lora_A entries one AdamW step at `lr` moves (the loss reaches A through a non-zero B)."""
    perturb_lora_b(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_A" in n}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    x, t, cond = inputs(shape)
    policy(x, t, cond).float().square().mean().backward()
    opt.step()
    after = dict(policy.named_parameters())
    moved = sum(int((after[n].detach() != v).sum()) for n, v in before.items())
    return moved / sum(v.numel() for v in before.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_of_a_bf16_base_are_fp32_and_train(name, seed):
    """enable_lora on a bf16 base makes fp32 adapters (peft's autocast_adapter_dtype): the seeded draws are
    the fp32 base's exactly, the base stays bf16, and one AdamW step at lr 1e-4 moves (nearly) every lora_A
    entry. With autocast_adapter_dtype=False (bf16 adapters, the old behaviour) most of those updates round
    away: lora_A's entries ~1/sqrt(fan_in) have a bf16 resolution above the step."""
    torch.manual_seed(seed)
    ref, shape = build(name)
    ref.enable_lora(rank=4, seed=seed)
    policy, _ = build(name)
    policy.model.to(torch.bfloat16)
    policy.enable_lora(rank=4, seed=seed)
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.equal(trained[n], p), n  # the fp32 seeded draw, not its bf16 rounding
    fp32 = _changed_fraction_after_one_step(policy, shape, lr=1e-4)
    bf16, _ = build(name)
    bf16.model.to(torch.bfloat16)
    bf16.enable_lora(rank=4, seed=seed, autocast_adapter_dtype=False)
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.bfloat16}
    rounded = _changed_fraction_after_one_step(bf16, shape, lr=1e-4)
    print(f"{name}: lora_A entries moved by one step at lr 1e-4: fp32 adapters {fp32:.1%}, bf16 adapters {rounded:.1%}")
    assert fp32 > 0.95 and rounded < 0.5 * fp32, (fp32, rounded)

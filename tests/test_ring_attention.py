"""Ring attention for context parallelism ([distributed] context_parallel_attention = "ring") on CPU / gloo.

- `ring_attention` over 2 and 4 ranks equals whole-sequence attention, output and q / k / v gradients:
  float64 to rounding, the other dtypes within the error of unsharded attention in the same dtype;
  head counts no cp size divides (the ring keeps every head on every rank).
- The DiT with 3 heads (Ulysses refuses it) and the tiny Wan adapters (one transformer and two
  experts) sharded with ring attention give the unsharded output and every parameter gradient, one
  `cp/ring` profiler range per attention.
- The trainer (video DiT, FSDP2, context_parallel = 2, ring) reproduces the one-process run.
- Where the ring does not apply (SD3 / FLUX joint text + image attention, the fp8 backend) and a wrong
  method name are clear errors naming the field, before any communication.
The multi-process tests (torchrun, gloo) are marked slow.
"""
import json

import pytest
import torch

from ddrl_engine.attention.context_parallel import check_context_parallel
from ddrl_engine.models.dit import DiT, DiTConfig
from ddrl_engine.trainer.config import config_from_dict
from tests.test_context_parallel import (_assert_same, _assert_weights, _torchrun, cp_config, make_cp_trainer,
                                         run_records)

# max |error| against float64, relative to the unsharded same-dtype attention's own error: the ring
# merges N partial softmaxes in fp32 (float64 stays float64), so it may differ from one kernel call by
# rounding but not by more than a few of the dtype's ulps.
SLACK = {"torch.float64": 1e-13, "torch.float32": 2e-6, "torch.bfloat16": 3e-2, "torch.float16": 3e-3}


def _ring_worker(nproc, *args):
    """tests/ring_worker.py ARGS on `nproc` gloo ranks."""
    _torchrun(nproc, *args, worker="tests.ring_worker")


# ---- fast checks (one process) -----------------------------------------------------------------

def test_ring_needs_no_head_divisibility():
    check_context_parallel(3, 16, 2, "DiT", "ring")  # passes: every head stays on every rank
    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible.*'ring' has no such condition"):
        check_context_parallel(3, 16, 2, "DiT", "ulysses")
    with pytest.raises(ValueError, match=r"sequence \(10 tokens\) must be divisible"):
        check_context_parallel(4, 10, 4, "DiT", "ring")  # the tokens still split evenly


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"distributed.context_parallel_attention must be one of 'ulysses', 'ring'"):
        check_context_parallel(4, 16, 2, "DiT", "star")
    with pytest.raises(ValueError, match=r"'distributed.context_parallel_attention' must be one of"):
        config_from_dict({"distributed": {"parallel": "ddp", "context_parallel": 2, "context_parallel_attention": "x"}})


def test_config_takes_ring_and_refuses_fp8_with_it():
    cfg = config_from_dict({"distributed": {"parallel": "ddp", "context_parallel": 2,
                                            "context_parallel_attention": "ring"}})
    assert cfg.distributed.context_parallel_attention == "ring"
    assert config_from_dict({}).distributed.context_parallel_attention == "ulysses"  # the default
    with pytest.raises(ValueError, match=r"'distributed.context_parallel_attention' = 'ring' needs "
                                         r"rollout.attention_backend = 'sdpa'.*'fp8'"):
        config_from_dict({"distributed": {"parallel": "ddp", "context_parallel": 2, "context_parallel_attention": "ring"},
                          "rollout": {"attention_backend": "fp8"}})
    # without context parallelism the field is inert: fp8 stays allowed
    config_from_dict({"distributed": {"context_parallel_attention": "ring"}, "rollout": {"attention_backend": "fp8"}})


def test_dit_takes_ring_with_heads_ulysses_refuses(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    model = DiT(DiTConfig(hidden=48, heads=3, depth=1))
    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible"):
        model.set_context_parallel(object())
    group = object()
    model.set_context_parallel(group, attention="ring")
    assert all(b.cp_group is group and b.cp_attention == "ring" for b in model.blocks)


def test_attention_refuses_ring_with_another_backend(monkeypatch):
    from ddrl_engine.attention import attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"'ring' serves only .* the attention backend is 'fp8'"):
        attention(q, q, q, backend="fp8", cp_group=object(), cp_attention="ring")


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_joint_attention_models_refuse_ring(kind, monkeypatch):
    """SD3 / FLUX attend over text + image jointly: the ring (which would count the replicated text N
    times) is refused by the adapter and by the pipeline run's pre-load check."""
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    pytest.importorskip("peft", reason="peft is an optional dependency")
    import torch.distributed as dist

    from ddrl_engine.models.diffusers import check_ring_applies
    from ddrl_engine.pipelines.bundle import policy_class
    from tests.test_diffusers_context_parallel import case

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    policy = case(kind, 0)[0]
    with pytest.raises(ValueError, match=r"joint text \+ image attention needs distributed.context_parallel_attention "
                                         r"= 'ulysses'"):
        policy.set_context_parallel(object(), attention="ring")
    assert policy._cp_group is None  # refused before any change
    with pytest.raises(ValueError, match=policy_class(kind).__name__):
        check_ring_applies(policy_class(kind), "ring", 2)
    check_ring_applies(policy_class(kind), "ulysses", 2)
    check_ring_applies(policy_class(kind), "ring", 1)  # no cp: nothing to refuse
    check_ring_applies(policy_class("wan"), "ring", 2)


def test_pipeline_run_refuses_ring_for_sd3_before_loading(tmp_path, monkeypatch):
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    pytest.importorskip("peft", reason="peft is an optional dependency")
    from ddrl_engine.trainer.config import load_config
    from ddrl_engine.trainer.pipeline_run import build_pipeline_run
    from tests.test_diffusers_context_parallel import pipeline_config
    from tests.tiny_pipelines import make_sd3_pipeline

    folder = make_sd3_pipeline(tmp_path / "models")
    cfg = load_config(pipeline_config(tmp_path, folder, tmp_path / "run", cp=2, kind="sd3"))
    cfg.distributed.context_parallel_attention = "ring"
    import ddrl_engine.trainer.pipeline_run as pr

    monkeypatch.setattr(pr, "load_policy", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ValueError, match=r"SD3Policy's joint text \+ image attention"):
        build_pipeline_run(cfg, log=lambda *a: None, progress=False)


# ---- multi-process (torchrun, gloo) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """(folder, seed) of one 2-process launch for the op cases and the models (tests.ring_worker "both");
    the seed as the `seed` fixture draws it ($DDRL_TEST_SEED, else fresh)."""
    from tests.conftest import _seed_from_env

    s = _seed_from_env()
    s = torch.seed() % (2**31) if s is None else s
    tmp = tmp_path_factory.mktemp("ring")
    _ring_worker(2, "both", tmp / "models.pt", "--seed", s)
    return tmp, s


@pytest.fixture
def two_ranks(two_rank_run, request):
    """The shared launch's folder; its seed is reported like the `seed` fixture's on a failure."""
    from tests.conftest import _SEED_PROPERTY

    request.node.user_properties.append((_SEED_PROPERTY, two_rank_run[1]))
    return two_rank_run[0]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_ring_attention_matches_whole_sequence(request, tmp_path, nproc):
    from tests.ring_worker import RING_CASES

    if nproc == 2:
        prefix = request.getfixturevalue("two_ranks") / "models.pt.ops"
    else:
        seed = request.getfixturevalue("seed")
        _ring_worker(nproc, "ops", tmp_path / "ops", "--seed", seed)
        prefix = tmp_path / "ops"
    for rank in range(nproc):
        *cases, last = torch.load(f"{prefix}.rank{rank}.pt")
        assert last == {"options_restored": True}  # torch's global ring options are as the calls found them
        assert len(cases) == len(RING_CASES)
        for c in cases:
            where = f"rank {rank} {c['dtype']} {tuple(c['want'].shape)}"
            for got, want, plain in [(c["out"], c["want"], c["plain"])] + list(zip(c["grads"], c["want_grads"],
                                                                                    c["plain_grads"])):
                assert want.abs().max() > 0.05, where  # the case is not trivial
                err = (got.double() - want).abs().max().item()
                plain_err = (plain.double() - want).abs().max().item()
                assert err <= 2 * plain_err + SLACK[c["dtype"]], f"{where}: ring {err:.3g} vs unsharded {plain_err:.3g}"


@pytest.mark.slow
def test_ring_sharded_models_match_one_process(two_ranks):
    """The DiT with 3 heads and the tiny Wan adapters (one transformer, two experts) under ring attention."""
    got = torch.load(two_ranks / "models.pt")
    names = {"dit"} | ({"wan", "experts"} if _have_diffusers() else set())
    assert set(got) == names
    attentions = {"dit": 2, "wan": 2, "experts": 4}  # self-attentions per forward
    for name in names:
        run = got[name]
        assert run["cp_ranges"] == {"ddrl/cp/ring": attentions[name], "ddrl/cp/all_gather": attentions[name] // 2}
        assert run["plain_ranges"] == {}
        torch.testing.assert_close(run["cp"]["out"], run["plain"]["out"], atol=2e-5, rtol=1e-5)
        assert run["plain"]["out"].abs().max() > 0.1, name
        assert set(run["cp"]["grads"]) == set(run["plain"]["grads"]), name
        for k, want in run["plain"]["grads"].items():
            assert want.abs().max() > 0, (name, k)
            atol = 1e-5 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(run["cp"]["grads"][k], want, atol=atol, rtol=1e-4, msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.slow
def test_ring_cp2_fsdp_training_reproduces_one_process(tmp_path):
    plain = make_cp_trainer(cp_config(tmp_path / "plain", True, 2))
    records = run_records(plain)
    _ring_worker(2, "train", tmp_path / "ring.json")
    run = json.loads((tmp_path / "ring.json").read_text())
    assert run["cp_size"] == 2 and run["cp_attention"] == "ring"
    _assert_same(run["records"], records)
    _assert_weights(torch.load(str(tmp_path / "ring.json") + ".weights.pt"), plain._module().state_dict())
    assert records[0]["metrics"]["grad_norm"] > 0


def _have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# ---- memory and communication estimates ---------------------------------------------------------------

def test_ring_communication_volume():
    """Own count for Wan2.1-14B (40 blocks, hidden 5120) at 86,400 tokens over 8 ranks, bf16: per block
    the K and V blocks of one rank travel 7 hops forward; backward again plus 8 hops of fp32 dK, dV."""
    from ddrl_engine.trainer.memory import PRESETS, cp_communication

    shape = PRESETS["wan2.1-14b"].shape
    n, cp = 86_400, 8
    got = cp_communication(shape, tokens=n, context_parallel=cp, rollout_rows=2, data_rows=1, sampler_steps=20,
                           trained_steps=10, compute_bytes=2, activation_checkpointing=True, cp_attention="ring")
    block = n // cp * 5120
    gather = 7 / 8 * n * 64 * 2
    fwd = 40 * 2 * 7 * block * 2 + gather
    bwd = 40 * (2 * 7 * block * 2 + 2 * 8 * block * 4) + gather
    assert got["per forward row"] == pytest.approx(fwd, rel=1e-12)
    assert got["per backward row"] == pytest.approx(bwd, rel=1e-12)
    assert got["rollout"] == pytest.approx(20 * 2 * fwd, rel=1e-12)
    assert got["update"] == pytest.approx(10 * 3 * (2 * fwd + bwd), rel=1e-12)  # recomputed forward + backward
    ulysses = cp_communication(shape, tokens=n, context_parallel=cp, compute_bytes=2)
    # the ring sends n_cp / 2 times Ulysses' forward volume (the block part)
    assert (got["per forward row"] - gather) / (ulysses["per forward row"] - gather) == pytest.approx(cp / 2)
    assert ulysses["per backward row"] == ulysses["per forward row"]


def test_ring_estimate_needs_no_head_divisibility():
    from ddrl_engine.trainer.memory import PRESETS, estimate_memory

    shape = PRESETS["wan2.1-14b"].shape  # 40 heads: 16 does not divide them
    with pytest.raises(ValueError, match=r"attention heads \(40.*'ring' has no such condition"):
        estimate_memory(shape, tokens=86_400, world_size=64, context_parallel=16)
    ring = estimate_memory(shape, tokens=86_400, world_size=64, context_parallel=16, cp_attention="ring")
    ulysses8 = estimate_memory(shape, tokens=86_400, world_size=64, context_parallel=8)
    key = next(k for k in ring.parts if k.startswith("activations"))
    assert ring.parts[key] < ulysses8.parts[key]  # 16 ranks split the blocks' tokens further
    with pytest.raises(ValueError, match=r"'cp_attention' must be one of"):
        estimate_memory(shape, tokens=86_400, world_size=64, context_parallel=8, cp_attention="star")


def test_memory_cli_prints_the_ring_volume(capsys):
    from ddrl_engine.cli import main

    main(["memory", "--preset", "wan2.1-14b", "--frames", "93", "--height", "720", "--width", "1280",
          "--world-size", "64", "--context-parallel", "16", "--cp-attention", "ring", "--activation-checkpointing"])
    out = capsys.readouterr().out
    assert "context parallelism 16 (4 data ranks): ring attention" in out and "GiB per backward row" in out


# ---- the CUDA block ops (no GPU here: their choice and their schemas, checked on CPU) ---------------

class _FakeQ:
    def __init__(self, device, dtype, tokens):
        self.device, self.dtype, self.shape = torch.device(device), dtype, (1, 2, tokens, 8)


def _schema(op):
    return (op.default if isinstance(op, torch._ops.OpOverloadPacket) else op)._schema


def _arg_names(op) -> set:
    return {a.name for a in _schema(op).arguments}


@pytest.mark.parametrize("device, dtype, tokens, kernel", [
    ("cpu", torch.float32, 7, "_scaled_dot_product_flash_attention_for_cpu"),
    ("cuda", torch.bfloat16, 7, "_scaled_dot_product_flash_attention"),
    ("cuda", torch.float16, 9, "_scaled_dot_product_flash_attention"),
    ("cuda", torch.float32, 64, "_scaled_dot_product_efficient_attention"),
])
def test_block_ops_match_the_aten_schemas(device, dtype, tokens, kernel):
    """Every keyword torch's ring passes (query, key, value, is_causal, scale; in backward the output,
    its log-sum-exp and the output gradient) and every one this module adds exists in the op's schema,
    and the forward's extra outputs map onto the backward's arguments in the schema's order."""
    from ddrl_engine.attention.ring import _block_ops

    ops = _block_ops(_FakeQ(device, dtype, tokens))
    assert _schema(ops.forward).name == f"aten::{kernel}"
    fwd, bwd = _arg_names(ops.forward), _arg_names(ops.backward)
    assert {"query", "key", "value", "is_causal", "scale", *ops.forward_kw} <= fwd
    assert {"query", "key", "value", "out", "logsumexp", "is_causal", "scale", ops.grad_name, *ops.backward_kw} <= bwd
    returns = _schema(ops.forward).returns
    rest = tuple(object() for _ in returns[2:])  # the outputs after (out, lse)
    extras = ops.extras(rest)
    assert set(extras) <= bwd
    # the extras are the forward's outputs after (out, lse) in order, each of the backward argument's type
    assert list(extras.values()) == list(rest[:len(extras)])
    types = {a.name: str(a.type) for a in _schema(ops.backward).arguments}
    assert [types[name] for name in extras] == [str(r.type) for r in returns[2:2 + len(extras)]]
    taken = {"query", "key", "value", "out", "logsumexp", "is_causal", "scale", ops.grad_name, *ops.backward_kw, *extras}
    required = {a.name for a in _schema(ops.backward).arguments if not a.has_default_value()}
    assert required <= taken, required - taken


def test_block_ops_refuse_fp32_cuda_rows_the_kernel_pads():
    from ddrl_engine.attention.ring import _block_ops

    with pytest.raises(ValueError, match=r"tokens per rank \(33\) to be a multiple of 32"):
        _block_ops(_FakeQ("cuda", torch.float32, 33))
    with pytest.raises(ValueError, match=r"no block attention op for device type 'mps'"):
        _block_ops(_FakeQ("mps", torch.float32, 32))


def test_ring_refuses_unequal_shards():
    """q, k, v of other shapes (cross-attention, unequal shards) or of mixed dtypes are one error naming
    them, before any communication (the group is a stand-in)."""
    from ddrl_engine.attention.ring import ring_attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"q, k, v of one shape .* got q \(1, 2, 4, 8\), k \(1, 2, 6, 8\)"):
        ring_attention(q, torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8), object())
    with pytest.raises(ValueError, match=r"one dtype and device, got q torch.float32 on cpu, k torch.bfloat16"):
        ring_attention(q, q.bfloat16(), q, object())

"""The rectified-flow SDE on a pipeline's own schedule: explicit `sigmas`, per-step `noise_level`s, and
`sampling.from_diffusers(scheduler, K, ...)`, whose levels are exactly the diffusers scheduler's sigmas.
References are float64 and written here from the SDE (not via ops.transitions):

x_t = (1 - t) x0 + t eps, velocity v = eps - x0, so eps = x + (1 - t) v and the score is
-(x + (1 - t) v) / t. The reverse-time SDE with diffusion g_t that keeps the marginals is
dx = [v - g_t^2 / 2 * score] dt + g_t dW (dt < 0); one Euler-Maruyama step from t_k to t_{k+1} gives
mu = x + dt [v + g^2 / (2 t) (x + (1 - t) v)], std = g sqrt(t_k - t_{k+1}), with g_k = a_k sqrt(t_k / (1 - t_k))
(1 - t_k replaced by 1 - t_1 at t_k = 1, the engine's finite first step)."""
import copy
import json
import math
import tomllib

import pytest
import torch

from ddrl_engine.ops import transitions
from ddrl_engine.sampling import RectifiedFlowSDE, from_diffusers, make_sampler, rollout
from ddrl_engine.trainer.config import SamplerConfig, config_from_dict, defaults_as_toml

diffusers = pytest.importorskip("diffusers")
FlowMatch = diffusers.FlowMatchEulerDiscreteScheduler

FLUX_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)


def bits(v: torch.Tensor) -> list[int]:
    return v.contiguous().view(torch.int32).tolist()


# float32 bit patterns of the tables the sampler built before sigmas / per-step noise levels existed
# (the old linspace + shift + one vectorised ops.transitions.rectified_flow_sde call).
OLD = {
    (10, 1.0): dict(
        t=[1065353216, 1063675494, 1061997773, 1060320051, 1058642330, 1056964608, 1053609165, 1050253722,
           1045220557, 1036831949, 0],
        x=[1061242798, 1061242798, 1063298007, 1063983077, 1064325612, 1064531132, 1064668146, 1064766013,
           1064839414, 1064896503],
        o=[-1110651699, -1107363365, -1107363365, -1107363365, -1107363365, -1107363365, -1107363365,
           -1107363365, -1107363365, -1107363365],
        s=[1060320051, 1059717385, 1055042572, 1051533223, 1049284295, 1046653964, 1043927988, 1041523782,
           1038265356, 1033313630]),
    (4, 3.0): dict(
        t=[1065353216, 1063675494, 1061158912, 1056964608, 0],
        x=[1061242798, 1059187589, 1061242798, 1061242798],
        o=[-1110651699, -1103152284, -1096852439, -1088463831],
        s=[1060320051, 1062221354, 1058746647, 1056795988]),
}


@pytest.mark.parametrize("key", list(OLD))
def test_default_tables_are_bitwise_unchanged(key):
    K, shift = key
    sampler = RectifiedFlowSDE(K) if shift == 1.0 else RectifiedFlowSDE(K, shift=shift)
    tab, old = sampler._tables, OLD[key]
    assert bits(tab.network_level) == old["t"] and bits(tab.noise_scale) == old["t"]
    assert bits(tab.step.x_coef) == old["x"] and bits(tab.step.out_coef) == old["o"] and bits(tab.step.std) == old["s"]
    # and the old computation, redone
    t = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    st = transitions.rectified_flow_sde(t[:-1], t[1:], 0.7)
    for got, want in [(tab.step.x_coef, st.x_coef), (tab.step.out_coef, st.out_coef), (tab.step.std, st.std),
                      (tab.data_scale, (1 - t).float())]:
        assert got.dtype == torch.float32 and torch.equal(got, want)


def scheduler_sigmas(K, config=None, **kw):
    s = FlowMatch(**(config or dict(shift=3.0)))
    s.set_timesteps(K, **kw)
    return s.sigmas


def assert_levels_are(sampler, sigmas):
    K = sampler.num_steps
    assert sigmas.dtype == torch.float32 and sigmas.numel() == K + 1
    got = torch.stack([sampler.network_level(k) for k in range(K + 1)])
    assert got.dtype == torch.float32 and torch.equal(got, sigmas), (got, sigmas)
    assert torch.equal(sampler.network_levels, sigmas[:K])
    assert torch.equal(sampler._tables.noise_scale, sigmas)
    assert torch.equal(sampler._tables.data_scale, (1 - sigmas.double()).float())


def test_levels_are_the_sd3_scheduler_sigmas_exactly():
    sigmas = scheduler_sigmas(10)
    sampler = from_diffusers(FlowMatch(shift=3.0), 10)
    assert_levels_are(sampler, sigmas)
    assert sigmas[-1] == 0 and sigmas[0] == 1
    # Flow-GRPO's schedule is not the plain SD3 shift of a uniform grid: ..., 0.2780, 0.0089, 0 vs ..., 0.25, 0.
    assert abs(float(sigmas[-2]) - 0.0089) < 1e-4 and abs(float(sigmas[-3]) - 0.2780) < 1e-4
    assert abs(float(RectifiedFlowSDE(10, shift=3.0).network_level(9)) - 0.25) < 1e-6
    # The same sampler from make_sampler with the sigmas given as a list; hashable and equal.
    again = make_sampler("rectified_flow_sde", num_steps=10, sigmas=sigmas.tolist())
    assert again == sampler and hash(again) == hash(sampler) and isinstance(again.sigmas, tuple)
    assert torch.equal(again._tables.step.std, sampler._tables.step.std)


def test_levels_are_the_flux_dynamic_shift_sigmas_exactly():
    mu = 0.83
    sigmas = scheduler_sigmas(12, FLUX_CONFIG, mu=mu)
    scheduler = FlowMatch(**FLUX_CONFIG)
    sampler = from_diffusers(scheduler, 12, mu=mu, noise_level=0.5)
    assert_levels_are(sampler, sigmas)
    assert sampler.noise_level == 0.5
    assert not torch.equal(sigmas, scheduler_sigmas(12, FLUX_CONFIG, mu=0.3))  # mu matters


def test_the_callers_scheduler_is_not_modified():
    scheduler = FlowMatch(shift=3.0)
    scheduler.set_timesteps(28)
    before = (scheduler.sigmas.clone(), scheduler.timesteps.clone(), scheduler.num_inference_steps)
    from_diffusers(scheduler, 10)
    assert torch.equal(scheduler.sigmas, before[0]) and torch.equal(scheduler.timesteps, before[1])
    assert scheduler.num_inference_steps == before[2] == 28


def reference_steps(t, a):
    """float64 x_coef, out_coef, std of each step from the SDE (module docstring)."""
    out = []
    for k in range(len(t) - 1):
        tk, tn = t[k], t[k + 1]
        den = 1 - t[1] if tk >= 1 else 1 - tk
        g2 = a[k] ** 2 * tk / den
        dt = tn - tk
        # mu = x + dt [v + g2/(2t) (x + (1-t) v)]  ->  affine coefficients of x and v
        out.append((1 + dt * g2 / (2 * tk), dt * (1 + g2 * (1 - tk) / (2 * tk)), math.sqrt(g2) * math.sqrt(tk - tn)))
    return out


@pytest.mark.parametrize("source", ["sd3", "flux", "uniform"])
def test_per_step_noise_levels_match_the_float64_sde(source):
    K = 8
    if source == "sd3":
        sampler = from_diffusers(FlowMatch(shift=3.0), K, noise_level=[0.2 + 0.1 * k for k in range(K)])
    elif source == "flux":
        levels = tuple(1.0 - 0.05 * k for k in range(K))
        sampler = from_diffusers(FlowMatch(**FLUX_CONFIG), K, noise_level=levels, mu=1.1)
    else:
        sampler = RectifiedFlowSDE(K, noise_level=[0.7] * (K - 1) + [2], shift=2.0)
    assert isinstance(sampler.noise_level, tuple) and all(isinstance(a, float) for a in sampler.noise_level)
    t = sampler._tables.network_level.double().tolist()
    if source != "uniform":
        assert t == list(sampler.sigmas)
    for k, (xc, oc, sd) in enumerate(reference_steps(t, sampler.noise_level)):
        c = sampler.coefs(k)
        for got, want in [(c.x_coef, xc), (c.out_coef, oc), (c.std, sd)]:
            assert got.dtype == torch.float32
            assert abs(float(got) - want) <= 2e-7 * abs(want) + 1e-12, (k, float(got), want)


def test_constant_per_step_noise_level_equals_the_float():
    for sampler_kw in [dict(shift=3.0), dict(sigmas=scheduler_sigmas(6).tolist())]:
        one = RectifiedFlowSDE(6, noise_level=0.9, **sampler_kw)
        per = RectifiedFlowSDE(6, noise_level=[0.9] * 6, **sampler_kw)
        for f in ("x_coef", "out_coef", "std"):
            assert torch.equal(getattr(one._tables.step, f), getattr(per._tables.step, f))


class VelocityPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.3 * torch.randn(3, generator=g))

    def forward(self, x, t, cond):
        return (0.8 * x.float() + torch.cos(2 * t.float())[:, None, None, None] * self.w[None, :, None, None]
                + 0.1 * cond.float()[:, None, None, None]).to(x.dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logprobs_are_float64_gaussian_densities(reduction):
    K = 6
    sampler = from_diffusers(FlowMatch(**FLUX_CONFIG), K, mu=0.9, noise_level=[0.9, 0.8, 0.7, 0.7, 0.6, 0.5])
    policy, cond = VelocityPolicy(), torch.tensor([0, 1, 2, 3])
    ro = rollout(policy, sampler, cond, generator=torch.Generator().manual_seed(4), sample_shape=(3, 4, 5),
                 dtype=torch.float32, reduction=reduction)
    t = [float(v) for v in scheduler_sigmas(K, FLUX_CONFIG, mu=0.9).double()]
    ref = reference_steps(t, sampler.noise_level)
    assert torch.equal(ro.levels, torch.tensor(t[:K], dtype=torch.float32))
    assert torch.equal(ro.samples, ro.states[:, K])  # ends at t = 0: finish is the identity
    with torch.no_grad():
        for k in range(K):
            x = ro.states[:, k]
            v = policy(x, ro.levels[k].expand(4), cond).double()
            xc, oc, sd = ref[k]
            mu = xc * x.double() + oc * v
            lp = (-((ro.states[:, k + 1].double() - mu) ** 2) / (2 * sd**2) - math.log(sd)
                  - 0.5 * math.log(2 * math.pi)).reshape(4, -1)
            want = lp.mean(1) if reduction == "mean" else lp.sum(1)
            atol = 1e-4 * (60 if reduction == "sum" else 1)
            torch.testing.assert_close(ro.log_probs[:, k].double(), want, atol=atol, rtol=1e-5)


def test_config_round_trip():
    sigmas = scheduler_sigmas(10)
    levels = [1, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5]  # an int is a float here, as in TOML
    cfg = config_from_dict({"sampler": {"name": "rectified_flow_sde", "num_steps": 10,
                                        "sigmas": sigmas.tolist(), "noise_level": levels}})
    assert isinstance(cfg.sampler.sigmas, tuple) and cfg.sampler.sigmas == tuple(sigmas.tolist())
    assert cfg.sampler.noise_level == (1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5)
    assert isinstance(cfg.sampler.noise_level[0], float)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    sampler = cfg.sampler.build()
    assert_levels_are(sampler, sigmas)
    assert sampler == from_diffusers(FlowMatch(shift=3.0), 10, noise_level=list(cfg.sampler.noise_level))
    # A float noise level and unset sigmas (the defaults) round-trip too, also through JSON's null.
    plain = config_from_dict({"sampler": {"name": "rectified_flow_sde", "noise_level": 1}})
    assert plain.sampler.noise_level == 1.0 and isinstance(plain.sampler.noise_level, float)
    assert plain.sampler.sigmas is None
    assert config_from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    # Python callers giving tuples or lists get the same config.
    as_list = SamplerConfig(num_steps=10, sigmas=sigmas.tolist())
    assert SamplerConfig(num_steps=10, sigmas=tuple(sigmas.tolist())) == as_list
    # The TOML dump (no null in TOML) shows the unset field commented out and still loads.
    text = defaults_as_toml()
    assert "# sigmas = (unset)" in text
    assert config_from_dict(tomllib.loads(text)).sampler.sigmas is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigmas=[1.0, 0.5, 0.0]), r"'sigmas' must have num_steps \+ 1 = 5 values"),
    (dict(sigmas=[1.0, 0.7, 0.5, 0.2, 0.1]), "'sigmas' must end at 0"),
    (dict(sigmas=[1.5, 0.7, 0.5, 0.2, 0.0]), "'sigmas' must start at a level <= 1"),
    (dict(sigmas=[1.0, 0.7, 0.7, 0.2, 0.0]), r"'sigmas' must be strictly decreasing, got sigmas\[1\]"),
    (dict(sigmas=[1.0, 0.2, 0.5, 0.1, 0.0]), "'sigmas' must be strictly decreasing"),
    (dict(sigmas=[1.0, 0.7, 0.5, 0.2, 0.0], shift=3.0), "either 'sigmas' or 'shift'"),
    (dict(sigmas=[1.0, float("nan"), 0.5, 0.2, 0.0]), r"'sigmas\[1\]' must be finite"),
    (dict(noise_level=[0.7, 0.7]), "'noise_level' as a list must have num_steps = 4 values"),
    (dict(noise_level=[0.7, 0.0, 0.7, 0.7]), r"'noise_level\[1\]' must be a finite number > 0"),
    (dict(noise_level=[0.7, -1, 0.7, 0.7]), r"'noise_level\[1\]'"),
])
def test_bad_schedules_are_value_errors_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RectifiedFlowSDE(4, **kwargs)
    with pytest.raises(ValueError, match="config: \\[sampler\\] .*" + match):
        SamplerConfig(num_steps=4, **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match=r"'sigmas\[1\]' must be a number"):
        RectifiedFlowSDE(2, sigmas=[1.0, "0.5", 0.0])
    with pytest.raises(TypeError, match="'sigmas' must be a list of numbers"):
        RectifiedFlowSDE(2, sigmas=1.0)
    with pytest.raises(TypeError, match=r"'noise_level\[0\]' must be a number"):
        RectifiedFlowSDE(2, noise_level=[True, 0.5])
    with pytest.raises(ValueError, match="sampler.sigmas"):
        SamplerConfig(num_steps=2, sigmas="1, 0.5, 0")
    with pytest.raises(ValueError, match="sampler.noise_level"):
        SamplerConfig(num_steps=2, noise_level=[0.5, "x"])


def test_from_diffusers_errors():
    with pytest.raises(ValueError, match="`mu`"):
        from_diffusers(FlowMatch(**FLUX_CONFIG), 10)
    with pytest.raises(TypeError, match="set_timesteps"):
        from_diffusers(object(), 10)
    ddim = diffusers.DDIMScheduler()
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        from_diffusers(ddim, 10)
    euler = diffusers.EulerDiscreteScheduler()  # k-diffusion sigmas (up to ~14.6): not in [0, 1]
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*not a flow-matching scheduler"):
        from_diffusers(euler, 10)
    with pytest.raises(ValueError, match="num_steps"):
        from_diffusers(FlowMatch(), 0)
    with pytest.raises(ValueError, match="'noise_level' as a list must have num_steps = 10"):
        from_diffusers(FlowMatch(shift=3.0), 10, noise_level=[0.7] * 9)
    inverted = FlowMatch(shift=3.0, invert_sigmas=True)  # levels rising to 1: not a denoising chain
    with pytest.raises(ValueError, match="sigmas"):
        from_diffusers(inverted, 10)
    # The caller's schedulers are left as they were, even when from_diffusers fails.
    flux = FlowMatch(**FLUX_CONFIG)
    state = copy.deepcopy(flux.__dict__.get("sigmas"))
    with pytest.raises(ValueError):
        from_diffusers(flux, 10)
    assert (flux.sigmas is None and state is None) or torch.equal(flux.sigmas, state)

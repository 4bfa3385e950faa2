"""The sampler registry: a new sampler is one dataclass plus one registration, usable from a config
with its own fields; [sampler] takes exactly the chosen sampler's fields, with errors naming them;
the default and the demo config build exactly the samplers the old flat SamplerConfig built."""
import dataclasses
import json
import tomllib

import pytest
import torch

from ddrl_engine.ops.transitions import StepCoefs
from ddrl_engine.sampling import DDIM, SAMPLERS, EDMChurn, RectifiedFlowSDE, Sampler, make_sampler, register_sampler
from ddrl_engine.trainer.builders import build_sampler
from ddrl_engine.trainer.config import SamplerConfig, TrainConfig, config_from_dict, defaults_as_toml, load_config

TEST_NAME = "damped_rf_test"


@dataclasses.dataclass(frozen=True)
class DampedRF(RectifiedFlowSDE):
    """The rectified-flow SDE with every step's noise scaled down (a sampler for these tests).

    Fields:
        damping: in (0, 1], multiplies each step's std.
    """

    damping: float = 0.5

    name = TEST_NAME

    def __post_init__(self) -> None:
        if not 0 < self.damping <= 1:
            raise ValueError(f"DampedRF: 'damping' must be in (0, 1], got {self.damping}")
        super().__post_init__()

    def _schedule(self):
        s = super()._schedule()
        return dataclasses.replace(s, step=StepCoefs(s.step.x_coef, s.step.out_coef, s.step.std * self.damping))


@pytest.fixture
def damped():
    register_sampler(DampedRF)
    try:
        yield DampedRF
    finally:
        SAMPLERS.pop(TEST_NAME)


def tables_equal(a, b) -> bool:
    """Every tensor of two Schedules bitwise equal (None where the other is None)."""
    ta, tb = a._tables, b._tables
    pairs = [(getattr(ta, f.name), getattr(tb, f.name)) for f in dataclasses.fields(ta) if f.name != "step"]
    pairs += [(getattr(ta.step, f), getattr(tb.step, f)) for f in ("x_coef", "out_coef", "std")]
    return all((x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                              and torch.equal(x, y)) for x, y in pairs)


def test_builtins_are_registered():
    assert SAMPLERS["rectified_flow_sde"] is RectifiedFlowSDE
    assert SAMPLERS["ddim"] is DDIM and SAMPLERS["edm_churn"] is EDMChurn


def test_a_registered_sampler_is_usable_from_a_config_with_its_own_field(damped):
    cfg = config_from_dict({"sampler": {"name": TEST_NAME, "num_steps": 4, "damping": 0.25, "shift": 2}})
    assert cfg.sampler.options == {"noise_level": 0.7, "shift": 2.0, "sigmas": None, "damping": 0.25}
    assert cfg.sampler.damping == 0.25
    sampler = build_sampler(cfg)
    assert type(sampler) is DampedRF and sampler.damping == 0.25 and sampler.shift == 2.0
    plain = RectifiedFlowSDE(num_steps=4, shift=2.0)
    torch.testing.assert_close(sampler.coefs(1).std, 0.25 * plain.coefs(1).std, rtol=1e-6, atol=0)
    # Its defaults, its docs in the TOML dump, its validation, and the registered names in errors.
    assert config_from_dict({"sampler": {"name": TEST_NAME}}).sampler.damping == 0.5
    with pytest.raises(ValueError, match=r"config: \[sampler\] DampedRF: 'damping' must be in \(0, 1\]"):
        config_from_dict({"sampler": {"name": TEST_NAME, "damping": 2.0}})
    with pytest.raises(ValueError, match=f"registered samplers \\(.*{TEST_NAME}.*\\), got 'dpm'"):
        config_from_dict({"sampler": {"name": "dpm"}})
    assert config_from_dict(cfg.to_dict()) == cfg


def test_removed_sampler_is_unknown_again(damped):
    SAMPLERS.pop(TEST_NAME)
    try:
        with pytest.raises(ValueError, match="'sampler.name' must be one of"):
            config_from_dict({"sampler": {"name": TEST_NAME}})
    finally:
        register_sampler(DampedRF)


@pytest.mark.parametrize("values,match", [
    ({"eta": 0.5}, r"^config: unknown field 'sampler.eta' for sampler 'rectified_flow_sde' "
                   r"\(its fields: noise_level, shift, sigmas\)$"),
    ({"name": "ddim", "noise_level": 0.5}, "unknown field 'sampler.noise_level' for sampler 'ddim'"),
    ({"options": {"eta": 0.5}}, "unknown field 'sampler.options'"),
    ({"name": "dpm"}, r"^config: 'sampler.name' must be one of the registered samplers "
                      r"\(ddim, edm_2ab, edm_churn, rectified_flow_cps, rectified_flow_sde\), got 'dpm'$"),
    ({"name": 3}, "'sampler.name' must be a string"),
    ({"noise_level": "high"}, r"^config: 'sampler.noise_level' must be a number, got 'high'$"),
    ({"name": "ddim", "num_train_timesteps": 10.5}, "'sampler.num_train_timesteps' must be an integer"),
    ({"num_steps": 2.0}, "'sampler.num_steps' must be an integer"),
    ({"num_steps": 0}, "'sampler.num_steps' must be > 0"),
    ({"noise_level": -1}, r"^config: \[sampler\] RectifiedFlowSDE: 'noise_level' must be a finite number > 0"),
    ({"name": "ddim", "eta": 1.5}, r"^config: \[sampler\] DDIM: 'eta' must be in \(0, 1\]"),
    ({"name": "ddim", "beta_schedule": "cosine"}, r"^config: \[sampler\] DDIM: 'beta_schedule' must be one of"),
    ({"name": "edm_churn", "sigma_min": 100.0}, r"^config: \[sampler\] EDMChurn: need sigma_min < sigma_max"),
])
def test_sampler_section_errors_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({"sampler": values})


def test_python_construction():
    assert SamplerConfig() == config_from_dict({}).sampler == TrainConfig().sampler
    s = SamplerConfig(num_steps=4)
    assert (s.name, s.num_steps, s.options) == ("rectified_flow_sde", 4, {"noise_level": 0.7, "shift": 1.0, "sigmas": None})
    d = SamplerConfig(name="ddim", num_steps=10, eta=0.5)
    assert d == SamplerConfig("ddim", 10, options={"eta": 0.5}) == config_from_dict(
        {"sampler": {"name": "ddim", "num_steps": 10, "eta": 0.5}}).sampler
    assert d.build() == DDIM(num_steps=10, eta=0.5)
    d.eta = 0.25  # the sampler's fields read and write as attributes
    assert d.options["eta"] == 0.25 and d.build().eta == 0.25
    with pytest.raises(AttributeError, match="sampler 'ddim' has no field 'shift'"):
        d.shift = 2.0
    with pytest.raises(AttributeError, match="has no field 'shift'"):
        d.shift  # noqa: B018
    assert dataclasses.replace(d, num_steps=3) == SamplerConfig("ddim", 3, eta=0.25)
    with pytest.raises(ValueError, match="unknown field 'sampler.eta' for sampler 'rectified_flow_sde'"):
        SamplerConfig(num_steps=4, eta=0.5)
    with pytest.raises(ValueError, match=r"config: \[sampler\] RectifiedFlowSDE: 'shift'"):
        SamplerConfig(shift=0.0)
    with pytest.raises(TypeError, match="both in options and as keyword"):
        SamplerConfig(options={"shift": 2.0}, shift=3.0)


def test_to_dict_is_flat_and_round_trips():
    for values in ({}, {"name": "ddim", "num_steps": 6, "eta": 0.3, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "beta_end": 0.012},
                   {"name": "edm_churn", "churn": 0.1, "rho": 5.0}):
        cfg = config_from_dict({"sampler": values})
        flat = cfg.to_dict()["sampler"]
        assert flat == {"name": cfg.sampler.name, "num_steps": cfg.sampler.num_steps, **cfg.sampler.options}
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig().to_dict()["sampler"] == {"name": "rectified_flow_sde", "num_steps": 10,
                                                  "noise_level": 0.7, "shift": 1.0, "sigmas": None}


def test_default_and_demo_configs_build_the_old_samplers():
    from ddrl_engine.trainer.demo import DEMO_CONFIG

    # What the flat SamplerConfig's build_sampler made of these configs.
    demo = build_sampler(load_config(DEMO_CONFIG))
    assert demo == RectifiedFlowSDE(num_steps=10, noise_level=0.7, shift=1.0)
    assert tables_equal(demo, RectifiedFlowSDE(num_steps=10, noise_level=0.7, shift=1.0))
    assert tables_equal(build_sampler(TrainConfig()), make_sampler("rectified_flow_sde", num_steps=10,
                                                                    noise_level=0.7, shift=1.0))
    old = {"ddim": DDIM(num_steps=10, eta=1.0), "edm_churn": EDMChurn(num_steps=10, churn=0.2)}
    for name, sampler in old.items():
        new = build_sampler(config_from_dict({"sampler": {"name": name}}))
        assert new == sampler and tables_equal(new, sampler)
    assert not tables_equal(demo, RectifiedFlowSDE(num_steps=10, noise_level=0.7, shift=1.5))


def test_defaults_toml_documents_the_default_samplers_fields():
    text = defaults_as_toml()
    section = text.split("[sampler]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "# registered samplers: ddim, edm_2ab, edm_churn, rectified_flow_cps, rectified_flow_sde;" in "\n".join(section)
    assigned = [line.split(" = ")[0] for line in section if not line.startswith("#")]
    assert assigned == ["name", "num_steps", "noise_level", "shift"]
    for key in assigned:  # each assignment is preceded by its documentation
        i = next(i for i, line in enumerate(section) if line.startswith(f"{key} = "))
        assert section[i - 1].startswith("# ")
    assert "# a > 0 in std_t = a sqrt(t / (1 - t))" in text  # from RectifiedFlowSDE's "Fields:" block
    assert config_from_dict(tomllib.loads(text)) == TrainConfig()


def test_register_sampler_rejects_bad_classes():
    class NotADataclass(Sampler):
        name = "not_a_dataclass"

        def _schedule(self):
            raise NotImplementedError

    for cls in (NotADataclass, StepCoefs):
        with pytest.raises(TypeError, match="dataclass subclass of Sampler"):
            register_sampler(cls)

    @dataclasses.dataclass(frozen=True)
    class Unnamed(RectifiedFlowSDE):
        extra: float = 1.0

    with pytest.raises(TypeError, match="own class attribute `name`"):
        register_sampler(Unnamed)

    @dataclasses.dataclass(frozen=True)
    class NeedsValue(RectifiedFlowSDE):
        required: float = dataclasses.field(kw_only=True)
        name = "needs_value"

    with pytest.raises(TypeError, match=r"field\(s\) \['required'\] need defaults"):
        register_sampler(NeedsValue)

    @dataclasses.dataclass(frozen=True)
    class Impostor(RectifiedFlowSDE):
        name = "ddim"

    with pytest.raises(ValueError, match="name 'ddim' is taken by ddrl_engine.sampling.ddim.DDIM"):
        register_sampler(Impostor)
    assert register_sampler(DDIM) is DDIM  # registering the same class again is harmless
    assert set(SAMPLERS) == {"ddim", "edm_2ab", "edm_churn", "rectified_flow_cps", "rectified_flow_sde"}

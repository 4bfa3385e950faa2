"""The ops' safety net (ops.selftest): first-contact checks on a CUDA device (mocked here: no GPU),
the plain-PyTorch reference path selected by DDRL_ENGINE_OPS=reference, and `info --selftest`."""
import os
import subprocess
import sys

import pytest
import torch

from ddrl_engine import ops
from ddrl_engine.ops import selftest
from ddrl_engine.ops.reference import diffusion_loss_ref, step_logprob_ref
from tests.tolerances import reduction_tol


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.setattr(selftest, "_CHECKED", {})
    yield


def test_the_checks_run_and_pass_cpu_against_cpu():
    results = selftest.check_device("cpu")
    assert {r.op for r in results} == {"diffusion_loss", "step_logprob", "fp8_attention"}
    assert all(r.ok for r in results), [r.detail for r in results if not r.ok]


def test_a_wrong_device_result_is_caught_and_named(monkeypatch):
    sl = sys.modules["ddrl_engine.ops.step_logprob"]  # the module (the package attribute is the function)

    real, calls = sl.step_logprob, []

    def off_on_the_device(*a, **k):  # the checks call the op on the device first, then on the CPU
        calls.append(1)
        out = real(*a, **k)
        return out * 1.01 if len(calls) % 2 == 1 else out  # 1% off: far past the tolerance

    monkeypatch.setattr(sl, "step_logprob", off_on_the_device)
    results = selftest._row_op_checks(torch.device("cpu"))
    bad = [r for r in results if not r.ok]
    assert bad and {r.op for r in bad} == {"step_logprob"}
    assert "log-prob" in bad[0].detail and "max |error|" in bad[0].detail


def test_first_contact_checks_once_per_device_and_refuses_on_mismatch(monkeypatch, fresh_checks):
    calls = []

    def fake_check(device):
        calls.append(str(device))
        ok = device.index == 0
        return [selftest.CheckResult("step_logprob", str(device), ok, 0.0 if ok else 0.5,
                                     "within tolerance" if ok else "log-prob float32 [3, 7]: max |error| 0.5")]

    monkeypatch.setattr(selftest, "check_device", fake_check)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    selftest.ensure_checked(torch.device("cuda", 0))
    selftest.ensure_checked(torch.device("cuda", 0))
    assert calls == ["cuda:0"]
    for _ in range(2):  # refused every time, checked once
        with pytest.raises(selftest.OpSelfTestError, match=r"(?s)step_logprob on cuda:1.*0\.5.*DDRL_ENGINE_OPS=reference"):
            selftest.ensure_checked(torch.device("cuda", 1))
    assert calls == ["cuda:0", "cuda:1"]
    selftest.ensure_checked(torch.device("cpu"))  # the CPU is the reference: nothing to check
    assert len(calls) == 2


def test_no_check_while_capturing_a_graph(monkeypatch, fresh_checks):
    monkeypatch.setattr(selftest, "check_device", lambda d: pytest.fail("must not run while capturing"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    selftest.ensure_checked(torch.device("cuda", 0))
    assert "cuda:0" not in selftest._CHECKED  # checked on the next eager call


@pytest.fixture
def reference_path():
    selftest.set_ops_path("reference")
    yield
    selftest.set_ops_path("fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_matches_float64_and_has_gradients(reference_path, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(4, 33, generator=g).to(dtype) for _ in range(3))
    coef = torch.rand(4, generator=g) + 0.5
    p = a.clone().requires_grad_()
    loss = ops.diffusion_loss(p, b, c, noise_coef=coef, data_coef=-coef)
    loss.backward()
    want = diffusion_loss_ref(a, b, c, noise_coef=coef, data_coef=-coef)
    torch.testing.assert_close(loss.double(), want, **reduction_tol())
    assert loss.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0
    x = a.clone().requires_grad_()
    lp = ops.step_logprob(c, x, b, x_coef=coef, out_coef=0.3, std=0.2 * coef)
    lp.sum().backward()
    torch.testing.assert_close(lp.double(), step_logprob_ref(c, a, b, x_coef=coef, out_coef=0.3, std=0.2 * coef),
                               **reduction_tol())
    assert x.grad is not None


def test_reference_path_attention_is_exact(reference_path):
    q, k, v = (torch.randn(1, 2, 9, 64) for _ in range(3))
    got = ops.fp8_attention(q, k, v)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_reference_path_is_recorded_in_the_metrics(tmp_path, reference_path):
    from tests.trainer_helpers import make_trainer, tiny_config

    m = make_trainer(tiny_config(tmp_path, steps=1)).train_step()
    assert m["ops_reference"] == 1


def test_env_switch_and_bad_value():
    env = dict(os.environ, DDRL_ENGINE_OPS="reference")
    code = "from ddrl_engine.ops import selftest; print(selftest.ops_path())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "reference", out.stderr
    env["DDRL_ENGINE_OPS"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DDRL_ENGINE_OPS='fast'" in out.stderr


def test_info_selftest_command():
    out = subprocess.run([sys.executable, "-m", "ddrl_engine.info", "--selftest"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ops path             fused" in out.stdout and "selftest" in out.stdout

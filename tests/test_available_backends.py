"""available_backends(device): what the trainer checks rollout.attention_backend against."""
import importlib

import pytest
import torch

from ddrl_engine.attention import available_backends

# the module (ddrl_engine.ops.fp8_attention the attribute is the function of that name)
fp8_attention = importlib.import_module("ddrl_engine.ops.fp8_attention")


def _fake_status(monkeypatch, ok: bool, why: str = "") -> None:
    monkeypatch.setattr(fp8_attention, "fp8_cuda_status", lambda: (ok, why))


def test_sdpa_and_fp8_usable_on_cpu(monkeypatch):
    # Even where the CUDA kernel cannot run, the CPU emulation can.
    _fake_status(monkeypatch, False, "needs an sm_90 (Hopper) GPU, this one is sm_80")
    for dev in ("cpu", torch.device("cpu")):
        b = available_backends(dev)
        assert set(b) == {"sdpa", "fp8"}
        assert b["sdpa"] == (True, "")
        usable, note = b["fp8"]
        assert usable and "emulation" in note


@pytest.mark.parametrize("dev", ["cuda", "cuda:0", torch.device("cuda")])
def test_fp8_refused_on_cuda_with_the_reason(monkeypatch, dev):
    _fake_status(monkeypatch, False, "sm_90a kernel not built (no CUTLASS)")
    b = available_backends(dev)
    assert b["sdpa"] == (True, "")
    usable, why = b["fp8"]
    assert not usable
    assert "sm_90a kernel not built (no CUTLASS)" in why


def test_fp8_usable_on_cuda_when_the_kernel_can_run(monkeypatch):
    _fake_status(monkeypatch, True)
    assert available_backends("cuda")["fp8"][0]


def test_default_device(monkeypatch):
    _fake_status(monkeypatch, False, "no kernel here")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    assert available_backends() == available_backends(default)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_backends()["fp8"] == (False, "cuda: no kernel here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_backends()["fp8"][0]


def test_missing_cuda_index_is_refused(monkeypatch):
    _fake_status(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    usable, why = available_backends("cuda:3")["fp8"]
    assert not usable and "no CUDA device 3" in why


def test_other_device_types_refuse_fp8():
    usable, why = available_backends("meta")["fp8"]
    assert not usable and "meta" in why
    assert available_backends("meta")["sdpa"] == (True, "")


def test_real_status_on_cuda_matches_fp8_cuda_status():
    ok, why = fp8_attention.fp8_cuda_status()
    usable, note = available_backends("cuda")["fp8"]
    assert usable == ok
    if not ok:
        assert why in note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_info_reports_why_fp8_cannot_run_on_cuda():
    from ddrl_engine.info import report

    text = report()
    assert "fp8 on cpu" in text
    fp8_cuda = [ln for ln in text.splitlines() if "fp8 on cuda" in ln]
    assert len(fp8_cuda) == 1 and " no (" in fp8_cuda[0]

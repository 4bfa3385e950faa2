"""CLIP-based rewards: local weights only, clear errors when weights or open_clip are absent."""

import pytest
import torch


def test_clip_rewards_fail_clearly_without_weights_or_package(tmp_path):
    from ddrl_engine.rewards.clip import AestheticHead, AestheticReward, CLIPScoreReward

    with pytest.raises(FileNotFoundError, match="local files only"):
        CLIPScoreReward(["a cat"], weights=tmp_path / "missing.pt")
    head = tmp_path / "head.pth"
    torch.save(AestheticHead().state_dict(), head)
    with pytest.raises(FileNotFoundError, match="missing_clip.pt"):
        AestheticReward(clip_weights=tmp_path / "missing_clip.pt", head_weights=head)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        (tmp_path / "clip.pt").write_bytes(b"")
        with pytest.raises(ImportError, match="pip install open_clip_torch"):
            CLIPScoreReward(["a cat"], weights=tmp_path / "clip.pt")


def test_aesthetic_head_loads_local_state_dicts(tmp_path):
    from ddrl_engine.rewards.clip import AestheticHead

    torch.manual_seed(0)
    ref = AestheticHead(32)
    torch.save(ref.state_dict(), tmp_path / "head.pth")
    head = AestheticHead.load(tmp_path / "head.pth")
    emb = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    torch.testing.assert_close(head(emb), ref.eval()(emb))
    assert not any(p.requires_grad for p in head.parameters())
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an aesthetic-predictor state dict"):
        AestheticHead.load(tmp_path / "other.pth")

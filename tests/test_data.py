"""Digits split, the resumable DataStream, the folder dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddrl_engine.data import DataStream, FolderDataset, digits_split, load_digits_tensors, load_folder


@pytest.fixture(scope="module")
def split():
    return digits_split(seed=0)


def test_digits_tensors():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))


def test_split_is_stratified_disjoint_deterministic(split):
    n_train, n_held = len(split.train_y), len(split.heldout_y)
    assert n_train + n_held == 1797 and abs(n_held / 1797 - 0.2) < 0.01
    assert not set(split.train_index.tolist()) & set(split.heldout_index.tolist())
    # stratified: each class's share is the same in both parts (within one sample)
    for k in range(10):
        train_k, held_k = (split.train_y == k).sum().item(), (split.heldout_y == k).sum().item()
        assert abs(held_k - 0.2 * (train_k + held_k)) <= 1
    again = digits_split(seed=0)
    assert torch.equal(again.train_index, split.train_index) and torch.equal(again.heldout_x, split.heldout_x)
    other = digits_split(seed=1)
    assert not torch.equal(other.heldout_index, split.heldout_index)
    x, y = load_digits_tensors()
    assert torch.equal(x[split.heldout_index], split.heldout_x) and torch.equal(y[split.train_index], split.train_y)


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        digits_split(heldout_fraction=1.5)


@pytest.mark.parametrize("n,batch_size", [(10, 3), (7, 7), (5, 12)])
def test_datastream_covers_each_epoch_and_resumes(n, batch_size):
    x = torch.arange(n).float().view(n, 1)
    y = torch.arange(n)
    stream = DataStream(x, y, batch_size, seed=3)
    batches = [stream.next_batch() for _ in range(4 * n)]  # 4 * batch_size epochs
    assert all(xb.shape[0] == batch_size and torch.equal(xb[:, 0].long(), yb) for xb, yb in batches)
    seen = torch.cat([yb for _, yb in batches])
    for e in range(seen.numel() // n):
        assert sorted(seen[e * n : (e + 1) * n].tolist()) == list(range(n))  # every item once per epoch

    a = DataStream(x, y, batch_size, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(6)]
    b = DataStream(x, y, batch_size, seed=99)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [b.next_batch() for _ in range(6)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)


def test_datastream_seed_changes_order_and_errors():
    x, y = torch.randn(50, 2), torch.arange(50)
    assert not torch.equal(DataStream(x, y, 8, seed=0).next_batch()[1], DataStream(x, y, 8, seed=1).next_batch()[1])
    with pytest.raises(ValueError, match="batch_size"):
        DataStream(x, y, 0)
    with pytest.raises(ValueError, match="one entry per item"):
        DataStream(x, y[:3], 4)
    with pytest.raises(ValueError, match="saved for 50 items"):
        DataStream(x[:10], y[:10], 4).load_state_dict(DataStream(x, y, 4).state_dict())


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_subfolders_pt_and_png(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _png(tmp_path / "3" / "a.png", img)
    torch.save(torch.zeros(1, 8, 8), tmp_path / "3" / "b.pt")
    (tmp_path / "7").mkdir()
    torch.save(torch.ones(1, 8, 8), tmp_path / "7" / "c.pt")
    ds = FolderDataset(tmp_path)
    assert ds.files == ["3/a.png", "3/b.pt", "7/c.pt"]
    assert ds.x.shape == (3, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.y.tolist() == [3, 3, 7]
    torch.testing.assert_close(ds.x[0, 0], torch.from_numpy(img.astype(np.float32) / 127.5 - 1))
    x, y = load_folder(tmp_path)
    assert torch.equal(x, ds.x) and torch.equal(y, ds.y)


def test_folder_named_subfolders_labels_json_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    torch.save(torch.randn(3, 4, 4), tmp_path / "dog" / "d.pt")
    save_file({"x": torch.randn(3, 4, 4)}, str(tmp_path / "cat" / "c.safetensors"))
    assert FolderDataset(tmp_path).y.tolist() == [0, 1]  # sorted names: cat=0, dog=1
    (tmp_path / "labels.json").write_text(json.dumps({"cat/c.safetensors": 5, "dog/d.pt": 2}))
    assert FolderDataset(tmp_path).y.tolist() == [5, 2]


def test_folder_flat_rgb_default_label(tmp_path):
    _png(tmp_path / "a.png", np.full((4, 6, 3), 255, dtype=np.uint8))
    ds = FolderDataset(tmp_path, default_label=4)
    assert ds.x.shape == (1, 3, 4, 6) and torch.all(ds.x == 1) and ds.y.tolist() == [4]
    assert FolderDataset(tmp_path, image_mode="L").x.shape == (1, 1, 4, 6)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="holds no"):
        FolderDataset(tmp_path)
    torch.save(torch.zeros(1, 8, 8), tmp_path / "a.pt")
    torch.save(torch.zeros(1, 4, 4), tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"b.pt has shape \(1, 4, 4\)"):
        FolderDataset(tmp_path)
    (tmp_path / "b.pt").unlink()
    (tmp_path / "labels.json").write_text(json.dumps({"other.pt": 1}))
    with pytest.raises(ValueError, match="'a.pt' needs a non-negative integer label"):
        FolderDataset(tmp_path)
    (tmp_path / "labels.json").unlink()
    (tmp_path / "sub").mkdir()
    torch.save(torch.zeros(1, 8, 8), tmp_path / "sub" / "c.pt")
    with pytest.raises(ValueError, match="mixes files at several depths"):
        FolderDataset(tmp_path)
    torch.save({"not": "a tensor"}, tmp_path / "sub" / "c.pt")
    (tmp_path / "a.pt").unlink()
    with pytest.raises(ValueError, match="expected a tensor"):
        FolderDataset(tmp_path)

"""Captioned folders (metadata.jsonl) and the latent cache that encodes each item once."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddrl_engine.data import (
    Dataset,
    LatentCache,
    VideoDecodingUnavailable,
    load_image,
    load_video,
    read_captioned,
)


def _image(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _folder(root, entries, size=(16, 16)):
    """entries: [(file_name, caption)]; writes an image per entry and metadata.jsonl."""
    root.mkdir(exist_ok=True)
    for i, (name, _) in enumerate(entries):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _image(root / name, *size, seed=i)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in entries))
    return root


class PoolEncoder:
    """A stand-in VAE: 2x2 average pooling, counting the images it encodes."""

    def __init__(self):
        self.seen = 0

    def __call__(self, pixels):
        assert pixels.dtype == torch.float32 and pixels.dim() == 4 and pixels.shape[1] == 3
        assert -1 <= pixels.min() and pixels.max() <= 1
        self.seen += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 2).to(torch.bfloat16)


def test_read_captioned(tmp_path):
    root = _folder(tmp_path / "d", [("b.png", " a red car "), ("sub/a.png", "a cat"), ("c.png", "a cat")])
    (root / "unlisted.png").write_bytes((root / "b.png").read_bytes())
    items = read_captioned(root)
    assert items == [(root / "b.png", "a red car"), (root / "sub/a.png", "a cat"), (root / "c.png", "a cat")]


@pytest.mark.parametrize("lines, error, match", [
    (['{"file_name": "a.png"}'], ValueError, "line 1: expected a JSON object with \"file_name\" and \"text\""),
    (['{"text": "x"}'], ValueError, "line 1: expected a JSON object"),
    (['{"file_name": "a.png", "text": "x"}', "", '{"file_name": "b.png", "text": "  "}'], ValueError,
     "line 3: empty caption for 'b.png'"),
    (['{"file_name": "gone.png", "text": "x"}'], FileNotFoundError, "listed file 'gone.png' does not exist"),
    (['{"file_name": "a.png", "text": "x"', ], ValueError, "line 1: not valid JSON"),
    (['{"file_name": "a.png", "text": "x"}', '{"file_name": "a.png", "text": "y"}'], ValueError, "listed twice"),
    (['{"file_name": "../a.png", "text": "x"}'], ValueError, "must be a path inside the folder"),
    (['{"file_name": "notes.txt", "text": "x"}'], ValueError, "neither an image"),
    ([""], ValueError, "lists no file"),
])
def test_read_captioned_errors(tmp_path, lines, error, match):
    root = tmp_path / "d"
    root.mkdir()
    for name in ("a.png", "b.png"):
        _image(root / name, 4, 4, 0)
    (root / "notes.txt").write_text("x")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(error, match=match):
        read_captioned(root)


def test_read_captioned_needs_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_captioned(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        read_captioned(tmp_path / "d")


def test_latent_cache_encodes_once(tmp_path):
    root = _folder(tmp_path / "d", [(f"{i}.png", ["a cat", "a dog", "a cow"][i % 3]) for i in range(7)])
    items = read_captioned(root)
    enc = PoolEncoder()
    out = LatentCache(tmp_path / "cache", "vae-test").encode(items, enc, resolution=16, batch_size=3, progress=False)
    assert enc.seen == 7
    assert out.latents.shape == (7, 3, 8, 8) and out.latents.dtype == torch.bfloat16
    ref = PoolEncoder()(torch.stack([load_image(p, 16) for p, _ in items]))
    assert torch.equal(out.latents, ref)
    assert out.captions == ["a cat", "a dog", "a cow"] and out.caption_ids.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert out.files == [p for p, _ in items]
    prompts = ["a horse", "a cow", "a cat", "a dog"]
    assert out.ids_into(prompts).tolist() == [2, 3, 1, 2, 3, 1, 2]
    with pytest.raises(KeyError, match="not in the prompt list"):
        out.ids_into(["a cat"])
    ds = Dataset.split(out.latents.float(), out.caption_ids, heldout_fraction=0.3)
    assert len(ds.train_y) + len(ds.heldout_y) == 7

    # a new run (new object, same root): nothing encoded; one new image: only it
    enc2 = PoolEncoder()
    cache = LatentCache(tmp_path / "cache", "vae-test")
    again = cache.encode(items, enc2, resolution=16, progress=False)
    assert enc2.seen == 0 and torch.equal(again.latents, out.latents)
    _image(root / "new.png", 16, 16, seed=99)
    report = cache.build(items + [(root / "new.png", "a new one")], enc2, resolution=16, progress=False)
    assert enc2.seen == 1 and (report.encoded, report.reused) == (1, 7)
    # a renamed copy has the same bytes: reused; another resolution is another entry
    (root / "copy.png").write_bytes((root / "0.png").read_bytes())
    assert cache.build([(root / "copy.png", "x")], enc2, resolution=16, progress=False).encoded == 0
    assert cache.build([(root / "copy.png", "x")], enc2, resolution=8, progress=False).encoded == 1
    with pytest.raises(KeyError, match="call build"):
        cache.load([(root / "1.png", "a dog")], resolution=12)


def test_images_resized_and_center_cropped(tmp_path):
    # 48 high x 32 wide -> cover 16x16: scale 0.5 -> 24x16 (bicubic), rows 4..20 kept
    _image(tmp_path / "tall.png", 48, 32, seed=1)
    got = load_image(tmp_path / "tall.png", 16)
    with Image.open(tmp_path / "tall.png") as im:
        ref = np.asarray(im.resize((16, 24), Image.Resampling.BICUBIC), dtype=np.float32)[4:20]
    assert got.shape == (3, 16, 16) and torch.equal(got, torch.from_numpy(ref.transpose(2, 0, 1) / 127.5 - 1.0))
    # already at the resolution: not resampled; (H, W) resolutions and grey images work
    _image(tmp_path / "exact.png", 8, 12, seed=2)
    with Image.open(tmp_path / "exact.png") as im:
        raw = torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1))
    assert torch.equal(load_image(tmp_path / "exact.png", (8, 12)), raw / 127.5 - 1.0)
    Image.fromarray(np.full((5, 9), 255, dtype=np.uint8), mode="L").save(tmp_path / "grey.webp", lossless=True)
    grey = load_image(tmp_path / "grey.webp", (6, 6))
    assert grey.shape == (3, 6, 6) and torch.allclose(grey, torch.ones(3, 6, 6), atol=1e-2)
    with pytest.raises(ValueError, match="resolution"):
        load_image(tmp_path / "exact.png", 0)

    # through the cache: a folder of mixed sizes gives one latent shape
    root = tmp_path / "mixed"
    root.mkdir()
    _image(root / "a.png", 40, 20, 3)
    _image(root / "b.jpg", 16, 16, 4)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.jpg", "text": "y"}\n')
    out = LatentCache(tmp_path / "c", "k").encode(read_captioned(root), PoolEncoder(), resolution=16, progress=False)
    assert out.latents.shape == (2, 3, 8, 8)


def test_videos(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    (root / "clip.mp4").write_bytes(b"not really a video")
    _image(root / "still.png", 8, 8, 0)
    (root / "metadata.jsonl").write_text('{"file_name": "clip.mp4", "text": "waves"}\n'
                                         '{"file_name": "still.png", "text": "a still"}\n')
    items = read_captioned(root)
    assert items[0] == (root / "clip.mp4", "waves")
    cache = LatentCache(tmp_path / "c", "k")
    with pytest.raises(ValueError, match="only images or only videos"):
        cache.build(items, PoolEncoder(), resolution=8, num_frames=2, progress=False)
    with pytest.raises(ValueError, match="num_frames"):
        cache.build(items[:1], PoolEncoder(), resolution=8, progress=False)
    if importlib.util.find_spec("av") is None:
        with pytest.raises(VideoDecodingUnavailable, match="needs PyAV"):
            load_video(root / "clip.mp4", 8, num_frames=2)
        with pytest.raises(VideoDecodingUnavailable):
            cache.build(items[:1], PoolEncoder(), resolution=8, num_frames=2, progress=False)


def write_video(path, frames, size=32, fps=8):
    """An MPEG-4 video of `frames` flat grey frames (value 40 i for frame i), written with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, dtype=np.uint8), format="rgb24")
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def test_real_video_decodes_to_its_frames(tmp_path):
    pytest.importorskip("av")
    write_video(tmp_path / "clip.mp4", 6)
    v = load_video(tmp_path / "clip.mp4", 16, num_frames=5)
    assert v.shape == (3, 5, 16, 16) and v.dtype == torch.float32
    want = torch.tensor([40 * i / 127.5 - 1 for i in range(5)])
    torch.testing.assert_close(v.mean(dim=(0, 2, 3)), want, atol=0.03, rtol=0)  # a lossy codec
    with pytest.raises(ValueError, match="6 frames, fewer than num_frames=9"):
        load_video(tmp_path / "clip.mp4", 16, num_frames=9)

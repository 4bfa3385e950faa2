"""Prompt files, the on-disk prompt-embedding cache and the prompt bank that gathers from it."""

import hashlib
import json
import multiprocessing as mp

import pytest
import torch

from ddrl_engine.data import PromptBank, PromptCache, read_prompts

L, D, P = 77, 64, 32


def fake_encode(texts):
    """A deterministic stand-in for a text encoder: each prompt's tensors depend only on its text."""
    embeds, pooled = [], []
    for t in texts:
        g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
        embeds.append(torch.randn(L, D, generator=g).to(torch.bfloat16))
        pooled.append(torch.randn(P, generator=g))
    return {"embeds": torch.stack(embeds), "pooled": torch.stack(pooled)}


class CountingEncoder:
    def __init__(self):
        self.calls, self.texts = 0, []

    def __call__(self, texts):
        self.calls += 1
        self.texts += list(texts)
        return fake_encode(texts)


def _build_in_process(root, texts):  # module level: run by spawned processes
    PromptCache(root, "fake").build(texts, fake_encode, batch_size=8, progress=False)


# -- prompt files ------------------------------------------------------------------------------------------


def test_read_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("  a cat  \n\n\tb dog\na cat\n   \n")
    assert read_prompts(txt) == ["a cat", "b dog", "a cat"]  # duplicates kept, in order
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "x", "id": 3}) + "\n\n" + json.dumps({"prompt": " y "}) + "\n")
    assert read_prompts(str(jl)) == ["x", "y"]


@pytest.mark.parametrize("name, content, match", [
    ("p.txt", "", "holds no prompt"),
    ("p.txt", "\n  \n", "holds no prompt"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2: not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"text": "b"}\n', "line 3: expected a JSON object with a \"prompt\""),
    ("p.jsonl", '["a"]\n', "line 1: expected a JSON object"),
    ("p.jsonl", '{"prompt": 3}\n', "line 1: \"prompt\" must be a non-empty string"),
    ("p.csv", "a\n", "unsupported extension '.csv'"),
])
def test_read_prompts_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        read_prompts(path)
    assert str(path) in str(e.value)


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt")


# -- the cache ---------------------------------------------------------------------------------------------


def _assert_rows(bank, ids, out):
    ref = fake_encode([bank.texts[i] for i in ids.tolist()])
    assert sorted(out) == ["embeds", "pooled"]
    for name in ref:
        assert out[name].dtype == ref[name].dtype and torch.equal(out[name], ref[name]), name


def test_build_once_then_only_new(tmp_path):
    texts = [f"prompt {i}" for i in range(40)] + ["prompt 3"]
    enc = CountingEncoder()
    cache = PromptCache(tmp_path, "fake")
    report = cache.build(texts + [""], enc, batch_size=16, progress=False)
    assert (report.encoded, report.reused, enc.calls) == (41, 0, 3)
    assert sorted(enc.texts) == sorted(set(texts + [""]))  # the duplicate is encoded once
    assert len(cache) == 41 and "prompt 3" in cache and "other" not in cache

    enc2 = CountingEncoder()
    report = cache.build(texts + [""], enc2, progress=False)
    assert enc2.calls == 0 and (report.encoded, report.reused, report.shards_written) == (0, 41, 0)

    enc3 = CountingEncoder()
    report = cache.build(texts + ["new a", "new b"], enc3, progress=False)
    assert enc3.texts == ["new a", "new b"] and report.encoded == 2
    assert "cache on disk" in str(report)


def test_gather_is_bitwise_and_survives_restart(tmp_path):
    texts = [f"a photo of {i}" for i in range(20)]
    cache = PromptCache(tmp_path, "fake")
    bank = cache.bank(texts, fake_encode, batch_size=6, progress=False)
    assert len(bank) == 21 and bank.num_prompts == 20 and bank.null_id == 20 and bank.texts[-1] == ""
    assert bank.specs == {"embeds": ("BF16", (L, D)), "pooled": ("F32", (P,))}
    ids = torch.tensor([3, 3, 20, 0, 19, 7, 3])
    out = bank.gather(ids, "cpu")
    assert out["embeds"].shape == (7, L, D) and out["pooled"].shape == (7, P)
    _assert_rows(bank, ids, out)
    assert bank.reader.rows_read == 5  # repeated ids read once

    enc = CountingEncoder()  # a new process: new objects, same root
    again = PromptCache(tmp_path, "fake").bank(texts, enc, progress=False)
    assert enc.calls == 0
    _assert_rows(again, ids, again.gather(ids))
    assert again.gather(torch.zeros(0, dtype=torch.long))["embeds"].shape == (0, L, D)


def test_gather_touches_only_needed_shards(tmp_path):
    n = 300
    texts = [f"prompt number {i}" for i in range(n)]
    cache = PromptCache(tmp_path, "fake")
    report = cache.build(texts + [""], fake_encode, batch_size=16, progress=False)
    assert report.shards_written == 19  # ceil(301 / 16)
    raw = (n + 1) * (L * D * 2 + P * 4)
    assert raw <= report.disk_bytes == cache.disk_bytes() < 1.1 * raw

    bank = PromptBank(cache, texts, max_open_shards=2)
    ids = torch.tensor([0, 15, 1, 16, 31])  # rows of the first two shards only
    _assert_rows(bank, ids, bank.gather(ids))
    assert bank.shard_opens == 2
    bank.gather(torch.tensor([2, 17]))
    assert bank.shard_opens == 2  # both still open
    bank.gather(torch.tensor([n]))  # the empty prompt, in the last shard: evicts the least recent
    assert bank.shard_opens == 3
    bank.gather(torch.tensor([15]))  # shard 0 was evicted
    assert bank.shard_opens == 4 and bank.reader.rows_read == 9


def test_parallel_builders_leave_a_valid_cache(tmp_path):
    texts = [f"shared prompt {i}" for i in range(24)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), texts + [""] + extra))
             for extra in ([], ["only in second"])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert not list((tmp_path / "fake").glob("*.tmp")) and not list((tmp_path / "fake").glob(".*"))
    enc = CountingEncoder()
    bank = PromptCache(tmp_path, "fake").bank(texts + ["only in second"], enc, progress=False)
    assert enc.calls == 0
    ids = torch.arange(len(bank))
    _assert_rows(bank, ids, bank.gather(ids))


def test_threads_building_at_once(tmp_path):
    import threading

    texts = [f"t{i}" for i in range(30)]
    threads = [threading.Thread(target=_build_in_process, args=(str(tmp_path), texts)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache = PromptCache(tmp_path, "fake")
    assert cache.missing(texts) == [] and len(cache) == 30


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="model_key"):
        PromptCache(tmp_path, "../escape")
    cache = PromptCache(tmp_path, "fake")
    cache.build(["a", "b"], fake_encode, progress=False)
    with pytest.raises(KeyError, match="1 of the bank's 3 prompts"):  # "" is missing
        PromptBank(cache, ["a", "b"])
    bank = cache.bank(["a", "b"], fake_encode, progress=False)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        bank.gather(torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="1-D long"):
        bank.gather(torch.tensor([0.0]))
    with pytest.raises(TypeError, match="not one string"):
        cache.build("abc", fake_encode)
    with pytest.raises(ValueError, match=r"\[B=1, \.\.\.\]"):
        cache.build(["c"], lambda t: {"embeds": torch.zeros(2, 3)}, progress=False)
    with pytest.raises(TypeError, match="dict of named tensors"):
        cache.build(["c"], lambda t: torch.zeros(1, 3), progress=False)
    # another encoder setting under the same model_key: caught when a bank mixes them
    cache.build(["long"], lambda t: {"embeds": torch.zeros(1, 2 * L, D, dtype=torch.bfloat16),
                                     "pooled": torch.zeros(1, P)}, progress=False)
    with pytest.raises(ValueError, match="'embeds' is"):
        PromptBank(cache, ["a", "long"])

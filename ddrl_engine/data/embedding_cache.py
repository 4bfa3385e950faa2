"""The on-disk prompt-embedding cache and the prompt bank that gathers rows of it per batch.

In the hot loop conditions stay integer prompt ids; the text-encoder outputs behind them live here,
on disk, and `PromptBank.gather(ids, device)` reads only the rows a batch needs, so neither host nor
device memory grows with the number of prompts (10k prompts of [512, 4096] bf16 are 40 GiB on disk).

Layout: `root/<model_key>/prompts-<hash>.safetensors`, append-only shards. A shard holds S entries:
one tensor per name the encoder returned, stacked to [S, ...] in the encoder's dtype, and metadata
with the entries' keys and texts. An entry's key is a hash of (format version, model_key, text), so
one root can serve several models (one folder each) and a changed encoder needs a new model_key.
The index (key -> shard, row) is rebuilt when a cache is opened by reading the shards' headers only
(a few KiB each), so nothing but the shards themselves is ever written.

Concurrency: every builder (rank) writes its own temporary file and renames it into place
(`os.replace`), so a reader never sees a partial shard. A shard's name is a hash of its keys, so
ranks building the same prompts in the same order write the same shard names and the last rename
wins; if their work overlaps differently, an entry may sit in two shards, which is harmless (the
first shard in name order serves it). All ranks may therefore build at once; to save encoder time,
let rank 0 build and the others open the cache after a barrier.
Leftover `.*.tmp` files of a crashed builder are ignored (delete them at leisure).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

_FORMAT = "ddrl-shard-v1"
_MODEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors limit

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

EncodeFn = Callable[[list[str]], Mapping[str, Tensor]]


def check_model_key(model_key: str) -> str:
    """model_key names a folder: letters, digits, '.', '_' and '-', not starting with '.' or '-'."""
    if not isinstance(model_key, str) or not _MODEL_KEY_RE.match(model_key):
        raise ValueError(f"model_key must be a folder name of letters, digits, '.', '_' and '-' "
                         f"(e.g. 'sd3.5-medium_t5-256'), got {model_key!r}")
    return model_key


def _hash(*parts: str, n: int = 32) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:n]


def read_safetensors_header(path: Union[str, Path]) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, offsets, __metadata__), no data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
        return json.loads(f.read(n))


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass(frozen=True)
class CacheReport:
    """What a build did: entries encoded now, entries found cached, shards written, shard bytes on disk."""

    encoded: int
    reused: int
    shards_written: int
    disk_bytes: int

    def __str__(self) -> str:
        return (f"encoded {self.encoded}, reused {self.reused}, wrote {self.shards_written} shard(s); "
                f"cache on disk: {_format_bytes(self.disk_bytes)}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as its header describes it: per tensor name, (dtype as safetensors spells it, row shape)."""

    path: Path
    keys: tuple[str, ...]
    rows: dict[str, tuple[str, tuple[int, ...]]]


class ShardStore:
    """Append-only entries (dicts of named tensors) keyed by strings, in `directory/<prefix>-*.safetensors`.

    Shared by the prompt cache and the latent cache; see the module docstring for layout and concurrency.
    """

    def __init__(self, directory: Union[str, Path], prefix: str) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self._index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, row)
        self._shards: dict[str, ShardInfo] = {}
        self.refresh()

    def refresh(self) -> None:
        """Indexes shards written since the last refresh (by this or another process)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"{self.prefix}-*.safetensors")):
            if path.name in self._shards:
                continue
            header = read_safetensors_header(path)
            meta = header.get("__metadata__") or {}
            if meta.get("format") != _FORMAT or meta.get("kind") != self.prefix:
                raise ValueError(f"{path}: not a {self.prefix} shard of format {_FORMAT} "
                                 f"(metadata {dict(list(meta.items())[:3])}); remove it or use another folder")
            keys = tuple(json.loads(meta["keys"]))
            rows = {name: (h["dtype"], tuple(h["shape"][1:])) for name, h in header.items() if name != "__metadata__"}
            self._shards[path.name] = ShardInfo(path, keys, rows)
            for row, key in enumerate(keys):
                self._index.setdefault(key, (path.name, row))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def location(self, key: str) -> tuple[str, int]:
        return self._index[key]

    def shard(self, name: str) -> ShardInfo:
        return self._shards[name]

    def disk_bytes(self) -> int:
        """Bytes of all indexed shards."""
        return sum(s.path.stat().st_size for s in self._shards.values() if s.path.exists())

    def write(self, keys: Sequence[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
        """Writes one shard atomically (temporary file + os.replace) and indexes it; tensors are [S, ...]."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.prefix}-{_hash(*keys, n=24)}.safetensors"
        meta = {**metadata, "format": _FORMAT, "kind": self.prefix, "keys": json.dumps(list(keys))}
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is meant to be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.refresh()
        return path


class ShardReader:
    """Reads rows of shards through memory-mapped safetensors handles, keeping the last `max_open` open.

    `opens` counts shard openings (a handle reads the header; data pages are read only when a row is
    sliced), `rows_read` the rows read.
    """

    def __init__(self, store: ShardStore, max_open: int = 64) -> None:
        if int(max_open) < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open!r}")
        self.store, self.max_open = store, int(max_open)
        self._open: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0
        self.rows_read = 0

    def _handle(self, shard: str):
        from safetensors import safe_open

        h = self._open.get(shard)
        if h is None:
            h = safe_open(str(self.store.shard(shard).path), framework="pt", device="cpu")
            self.opens += 1
            self._open[shard] = h
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return h

    def read_rows(self, locations: Sequence[tuple[str, int]], specs: Mapping[str, tuple[str, tuple[int, ...]]]
                  ) -> dict[str, Tensor]:
        """{name: [len(locations), ...]} with row i read from shard/row locations[i] (CPU, stored dtype);
        specs: {name: (safetensors dtype, row shape)}, used for an empty result."""
        names = list(specs)
        if not locations:
            return {n: torch.empty((0, *specs[n][1]), dtype=_TORCH_DTYPES[specs[n][0]]) for n in names}
        pieces: dict[str, list[Tensor]] = {n: [] for n in names}
        with self._lock:
            for shard, row in locations:
                h = self._handle(shard)
                for n in names:
                    pieces[n].append(h.get_slice(n)[row : row + 1])
            self.rows_read += len(locations)
        return {n: torch.cat(p) for n, p in pieces.items()}

    def close(self) -> None:
        with self._lock:
            self._open.clear()


class PromptCache:
    """Per-prompt encoder outputs on disk under `root/<model_key>/` (see the module docstring).

    `build(texts, encode_fn)` encodes the prompts not cached yet; `bank(texts)` opens a PromptBank.
    """

    def __init__(self, root: Union[str, Path], model_key: str) -> None:
        self.root = Path(root)
        self.model_key = check_model_key(model_key)
        self.directory = self.root / model_key
        self.store = ShardStore(self.directory, "prompts")

    def __repr__(self) -> str:
        return (f"PromptCache({str(self.directory)!r}: {len(self)} prompts, "
                f"{_format_bytes(self.disk_bytes())} on disk)")

    def key(self, text: str) -> str:
        return _hash(_FORMAT, "prompt", self.model_key, text)

    def __contains__(self, text: str) -> bool:
        return self.key(text) in self.store

    def __len__(self) -> int:
        """Prompts cached (as indexed at the last refresh)."""
        return len(self.store)

    def disk_bytes(self) -> int:
        return self.store.disk_bytes()

    def refresh(self) -> None:
        """Sees shards other processes wrote since this cache was opened."""
        self.store.refresh()

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts not cached, in first-appearance order."""
        texts = _check_texts(texts)
        return [t for t in dict.fromkeys(texts) if self.key(t) not in self.store]

    def build(
        self,
        texts: Iterable[str],
        encode_fn: EncodeFn,
        *,
        batch_size: int = 16,
        shard_size: Optional[int] = None,
        progress: bool = True,
    ) -> CacheReport:
        """Encodes the texts not cached yet, `batch_size` at a time, with `encode_fn(list[str]) ->
        {name: Tensor [B, ...]}` (under no_grad), and writes them as CPU tensors in their dtype, one shard
        per `shard_size` prompts (default: batch_size). Duplicates are encoded once."""
        from tqdm.auto import tqdm

        batch_size = _positive("batch_size", batch_size)
        shard_size = batch_size if shard_size is None else _positive("shard_size", shard_size)
        texts = _check_texts(texts)
        self.refresh()
        todo = self.missing(texts)
        reused = len(dict.fromkeys(texts)) - len(todo)
        shards = 0
        pending: list[tuple[list[str], dict[str, Tensor]]] = []

        def flush() -> None:
            nonlocal shards
            batch_texts = [t for ts, _ in pending for t in ts]
            tensors = {n: torch.cat([out[n] for _, out in pending]) for n in pending[0][1]}
            self.store.write([self.key(t) for t in batch_texts], tensors,
                             {"model_key": self.model_key, "texts": json.dumps(batch_texts)})
            pending.clear()
            shards += 1

        names: Optional[list[str]] = None
        with tqdm(total=len(todo), unit="prompt", desc=f"prompt cache {self.model_key}",
                  disable=not progress or not todo) as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                with torch.no_grad():
                    out = _check_encoded(encode_fn(batch), len(batch), "encode_fn")
                if names is None:
                    names = sorted(out)
                elif sorted(out) != names:
                    raise ValueError(f"encode_fn returned tensors {sorted(out)} but earlier batches returned {names}")
                pending.append((batch, out))
                if sum(len(ts) for ts, _ in pending) >= shard_size:
                    flush()
                bar.update(len(batch))
            if pending:
                flush()
            if todo:
                bar.set_postfix_str(f"{_format_bytes(self.disk_bytes())} on disk")
        return CacheReport(encoded=len(todo), reused=reused, shards_written=shards, disk_bytes=self.disk_bytes())

    def bank(self, texts: Iterable[str], encode_fn: Optional[EncodeFn] = None, *, max_open_shards: int = 64,
             **build_kwargs) -> "PromptBank":
        """A PromptBank over `texts` plus the empty prompt; with encode_fn, builds what is missing first."""
        texts = _check_texts(texts)
        if encode_fn is not None:
            self.build(texts + [""], encode_fn, **build_kwargs)
        return PromptBank(self, texts, max_open_shards=max_open_shards)


class PromptBank:
    """Prompt ids -> cached encoder outputs: ids 0..N-1 are `texts`, id N (`null_id`) the empty prompt "".

    `len(bank)` is N + 1 rows and `bank.texts` their N + 1 texts (the empty prompt last), matching the
    policy's prompt bank (num_classes = N). All texts, "" included, must be in the cache.
    `gather(ids, device)` reads only the rows of `ids` from disk (memory-mapped shards, the last
    `max_open_shards` kept open) and moves them to `device`.
    """

    def __deepcopy__(self, memo) -> "PromptBank":
        # Read-only: the copies of a policy (EMA, reference) share one bank and its open shards.
        return self

    def __init__(self, cache: PromptCache, texts: Iterable[str], *, max_open_shards: int = 64) -> None:
        self.cache = cache
        self.texts: list[str] = _check_texts(texts) + [""]
        cache.refresh()
        missing = cache.missing(self.texts)
        if missing:
            raise KeyError(f"{len(missing)} of the bank's {len(self.texts)} prompts are not in {cache!r}, "
                           f"e.g. {missing[:3]}; call cache.build(texts + [''], encode_fn) "
                           f"(or cache.bank(texts, encode_fn)) first")
        self._locations = [cache.store.location(cache.key(t)) for t in self.texts]
        specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in dict.fromkeys(s for s, _ in self._locations):
            rows = cache.store.shard(shard).rows
            if specs and sorted(rows) != sorted(specs):
                raise ValueError(f"{cache.directory}: shard {shard} holds tensors {sorted(rows)}, others "
                                 f"{sorted(specs)}; one model_key must always use the same encoder")
            for name, spec in rows.items():
                if specs.setdefault(name, spec) != spec:
                    raise ValueError(f"{cache.directory}: tensor {name!r} is {spec} in shard {shard} but "
                                     f"{specs[name]} elsewhere (dtype, row shape); one model_key must always use "
                                     f"the same encoder and settings (e.g. max sequence length)")
        self.specs = specs
        self.reader = ShardReader(cache.store, max_open_shards)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_prompts(self) -> int:
        """N: the prompts without the empty one."""
        return len(self.texts) - 1

    @property
    def null_id(self) -> int:
        """The id of the empty prompt (the unconditional condition), N."""
        return len(self.texts) - 1

    @property
    def shard_opens(self) -> int:
        return self.reader.opens

    def gather(self, ids: Tensor, device: Union[str, torch.device, None] = None) -> dict[str, Tensor]:
        """{name: Tensor [B, ...]} for long ids [B] (any device; read on the host), on `device`
        (default: the ids' device). Repeated ids are read once."""
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.dim() != 1:
            raise TypeError(f"ids must be a 1-D long tensor of prompt ids, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        device = ids.device if device is None else torch.device(device)
        host = ids.cpu()
        if host.numel() and (host.min() < 0 or host.max() >= len(self)):
            raise IndexError(f"prompt ids must be in [0, {len(self)}), got min {host.min().item()}, max {host.max().item()}")
        unique, inverse = torch.unique(host, return_inverse=True)
        rows = self.reader.read_rows([self._locations[i] for i in unique.tolist()], self.specs)
        return {n: t[inverse].to(device) for n, t in rows.items()}


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_texts(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must be strings, got a {type(bad).__name__}: {bad!r}")
    return texts


def _check_encoded(out: object, batch: int, what: str) -> dict[str, Tensor]:
    """An encoder's output as {name: detached contiguous CPU tensor [batch, ...]}."""
    if isinstance(out, Tensor):
        raise TypeError(f"{what} must return a dict of named tensors (e.g. {{'embeds': ..., 'pooled': ...}}), got a tensor")
    if not isinstance(out, Mapping) or not out:
        raise TypeError(f"{what} must return a non-empty dict of named tensors, got {type(out).__name__}")
    checked = {}
    for name, t in out.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"{what} returned a tensor under the invalid name {name!r}")
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != batch:
            raise ValueError(f"{what} output {name!r} must be a tensor [B={batch}, ...], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        checked[name] = t.detach().to("cpu").contiguous()
    return checked

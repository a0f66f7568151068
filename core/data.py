"""The data pipeline: loaders' examples -> tokenized, masked, split, mixed and packed rows.

Everything between raw files and the batches the trainer sees lives here. The helpers loaders are
written with (file reading, bad-record policy, prompt formats) live in the public ``ftk.loaderkit``
and are importable from here under their old names too. Only the standard library and numpy are
imported at module level; torch/transformers/datasets load inside functions.

Labels come from our own masks (segment char spans -> tokens via the fast tokenizer's offsets),
never from pad ids, so the EOS a model must learn to emit is never masked.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ftk.components import DataContext, Example, LoadedData, PreparedData, Segment
from ftk.errors import DataError
from ftk.loaderkit import (  # noqa: F401 - the loader helpers' old home: ftk.data.<name> keeps working
    ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, DEFAULT_SPEAKERS, BadRecord, RecordPolicy, check_messages, check_path,
    conversation_example, decode_utf8, detect_format, example_from_row, field_str, file_fingerprint,
    instruction_example, iter_records, load_hub, loader_from_class, merge_segments, read_text, split_template,
)

CACHE_VERSION = 2  # 2: own-validation examples named part#vj
IGNORE = -100


# == tokenizer ====================================================================================
def prepare_tokenizer(tokenizer):
    """Give a pad token that is not EOS and pad on the right. Idempotent.

    pad = unk when the tokenizer has one (LLaMA); otherwise a new ``<pad>`` token is added (then the
    model's embeddings must be resized to ``len(tokenizer)``). Labels never depend on pad ids.
    """
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    fp = getattr(tokenizer, "_ftk_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    fp = h.hexdigest()[:20]
    try:
        tokenizer._ftk_fingerprint = fp
    except AttributeError:
        pass
    return fp


# == tokenization =================================================================================
@dataclass
class TokenBlock:
    """Examples tokenized once, stored flat: ``ids``/``mask`` (1 = trainable) of example i are
    ``[offsets[i]:offsets[i+1]]``, untruncated (truncation is applied on use, so max_length is not
    part of the cache key)."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trainable_within(self, max_length: int) -> np.ndarray:
        """Trainable labels per example within its first ``max_length`` tokens (the first token's
        mask is always 0: :func:`tokenize_examples` clears it, nothing predicts that token)."""
        cs = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        start = self.offsets[:-1]
        return cs[start + np.minimum(self.lengths, max_length)] - cs[start]


def render_chat(tokenizer, messages: list[dict], where: str) -> Example:
    """Render with the tokenizer's chat template; only assistant turns are trainable.

    Each assistant turn's span is found by rendering the conversation up to it (with the generation
    prompt) and up to its end: the difference is exactly what the model must produce."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: template 'chat' needs a tokenizer with a chat template; this one has none "
                        f"(use \"template\": \"default\")")

    def render(msgs, gen=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja errors from the template itself
            raise DataError(f"{where}: the tokenizer's chat template failed: {e}") from None

    full = render(messages)
    segs, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:k], gen=True), render(messages[: k + 1])
        start, end = len(before), len(through)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix, so "
                            f"assistant turns cannot be located; use \"template\": \"default\"")
        if start > pos:
            segs.append(Segment(full[pos:start], False))
        segs.append(Segment(full[start:end], True))
        pos = end
    if pos < len(full):
        segs.append(Segment(full[pos:], False))
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return Example(segments=segs, prompt=render(messages[:last], gen=True), reference=messages[last]["content"],
                   messages=messages)


def _token_range(enc, s: int, e: int) -> tuple[int, int] | None:
    """Tokens overlapping chars [s, e) (a token crossing into the span counts as inside)."""
    first = next((t for c in range(s, e) if (t := enc.char_to_token(c)) is not None), None)
    if first is None:
        return None
    last = next((t for c in range(e - 1, s - 1, -1) if (t := enc.char_to_token(c)) is not None), first)
    return first, last


def tokenize_examples(examples: list[Example], tokenizer, train_on_inputs: bool = False,
                      progress: bool | None = None, desc: str = "tokenizing") -> TokenBlock:
    """Tokenize once with the fast tokenizer, in batches: BOS + text + EOS, mask from segment spans.

    BOS/EOS are not added where the text already has them (chat templates); EOS is trainable."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{type(tokenizer).__name__}: ftk needs a fast (Rust) tokenizer for exact label masks")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{type(tokenizer).__name__}: the tokenizer has no EOS token, so examples cannot end")
    bos_s, eos_s = tokenizer.bos_token or "\0", tokenizer.eos_token or "\0"
    n = len(examples)
    chunks_ids, chunks_mask, lens = [], [], np.zeros(n, np.int64)
    from tqdm.auto import tqdm

    step = 4096
    bar = tqdm(total=n, desc=desc, unit="ex", disable=(None if progress is None else not progress), leave=False)
    for a in range(0, n, step):
        batch = examples[a: a + step]
        texts = [ex.text for ex in batch]
        encs = backend.encode_batch(texts, add_special_tokens=False)
        for j, (ex, text, enc) in enumerate(zip(batch, texts, encs)):
            ids = enc.ids
            add_bos = bos is not None and not text.startswith(bos_s)
            add_eos = not text.rstrip().endswith(eos_s)
            body = np.zeros(len(ids), np.uint8)
            if train_on_inputs:
                body[:] = 1
            else:
                pos = 0
                for seg in ex.segments:
                    if seg.train and seg.text:
                        r = _token_range(enc, pos, pos + len(seg.text))
                        if r:
                            body[r[0]: r[1] + 1] = 1
                    pos += len(seg.text)
            m = [np.zeros(1, np.uint8)] if add_bos else []
            m.append(body)
            if add_eos:
                m.append(np.ones(1, np.uint8))
            full = ([bos] if add_bos else []) + ids + ([eos] if add_eos else [])
            chunks_ids.append(np.asarray(full, np.int32))
            chunks_mask.append(np.concatenate(m))
            lens[a + j] = len(full)
        bar.update(len(batch))
    bar.close()
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.concatenate(chunks_ids) if chunks_ids else np.zeros(0, np.int32)
    mask = np.concatenate(chunks_mask) if chunks_mask else np.zeros(0, np.uint8)
    if len(mask):
        mask[offsets[:-1][lens > 0]] = 0  # the first token never has a label (nothing predicts it)
    return TokenBlock(ids=ids, mask=mask, offsets=offsets)


# == cache ========================================================================================
def cache_root(data_cfg: dict) -> Path:
    root = data_cfg.get("cache_dir") or os.environ.get("FTK_CACHE_DIR") or os.path.join("~", ".cache", "ftk")
    return Path(os.path.expanduser(root)) / "data"


def examples_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for s in ex.segments:
            h.update(b"\x01" if s.train else b"\x00")
            h.update(s.text.encode("utf-8", "surrogatepass"))
        h.update(b"\x02")
    return h.hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def cached_tokenize(examples: list[Example], tokenizer, train_on_inputs: bool, data_cfg: dict,
                    progress: bool | None = None, desc: str = "tokenizing",
                    digest: str | None = None) -> tuple[TokenBlock, bool]:
    """Tokenize through the cache: (block, hit). Keyed by the rendered examples (which already
    reflect data, loader options and template), the tokenizer and train_on_inputs."""
    if not data_cfg["cache"]:
        return tokenize_examples(examples, tokenizer, train_on_inputs, progress, desc), False
    from ftk.io import atomic_write_bytes, atomic_write_json

    key = hashlib.sha256(json.dumps([CACHE_VERSION, digest or examples_digest(examples), tokenizer_fingerprint(tokenizer),
                                     bool(train_on_inputs)]).encode()).hexdigest()[:24]
    d = cache_root(data_cfg) / key
    if (d / "done.json").exists():
        try:
            blk = TokenBlock(*(np.load(d / f"{k}.npy", allow_pickle=False) for k in ("ids", "mask", "offsets")))
            if len(blk) == len(examples):
                return blk, True
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt
    blk = tokenize_examples(examples, tokenizer, train_on_inputs, progress, desc)
    try:
        for k in ("ids", "mask", "offsets"):
            atomic_write_bytes(d / f"{k}.npy", _npy_bytes(getattr(blk, k)))
        atomic_write_json(d / "done.json", {"version": CACHE_VERSION, "examples": len(examples)})  # written last
    except OSError as e:
        import warnings

        warnings.warn(f"ftk: data cache not written to {d}: {e.strerror}", stacklevel=2)
    return blk, False


# == rows, packing, collator ======================================================================
class FeatureRows:
    """Rows of features backed by flat numpy arrays (a map-style dataset for torch's DataLoader).

    ``rows[i]`` -> ``{"input_ids": [...], "labels": [...], ("position_ids": [...]), "example_ids": [...]}``;
    ``example_ids`` name the examples in the row (``source#index``) so errors can point at them.
    """

    def __init__(self, ids, labels, offsets, position_ids=None, names=None):
        self.ids, self.labels, self.offsets, self.position_ids = ids, labels, offsets, position_ids
        self.names = names or [[] for _ in range(len(offsets) - 1)]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids[a:b].tolist()
        out["example_ids"] = list(self.names[i])
        return out

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None


@dataclass
class _Ref:
    """One example chosen for a split: its token block, index there, and name."""

    block: TokenBlock
    idx: int
    name: str


def _ref_spans(refs: list[_Ref]):
    """Concatenated ids/mask of the blocks refs point into, and each ref's start and full length there."""
    blocks, where = [], {}
    for r in refs:
        if id(r.block) not in where:
            where[id(r.block)] = len(blocks)
            blocks.append(r.block)
    bid = np.fromiter((where[id(r.block)] for r in refs), np.int64, len(refs))
    idx = np.fromiter((r.idx for r in refs), np.int64, len(refs))
    base = np.concatenate([[0], np.cumsum([len(b.ids) for b in blocks])]).astype(np.int64)
    starts, full = np.zeros(len(refs), np.int64), np.zeros(len(refs), np.int64)
    for k, b in enumerate(blocks):
        sel = bid == k
        starts[sel] = base[k] + b.offsets[idx[sel]]
        full[sel] = b.offsets[idx[sel] + 1] - b.offsets[idx[sel]]
    ids = np.concatenate([b.ids for b in blocks]) if len(blocks) > 1 else (blocks[0].ids if blocks else np.zeros(0, np.int32))
    mask = np.concatenate([b.mask for b in blocks]) if len(blocks) > 1 else (blocks[0].mask if blocks else np.zeros(0, np.uint8))
    return ids, mask, starts, full


def build_rows(refs: list[_Ref], max_length: int, packing: bool, rng: np.random.Generator | None = None) -> FeatureRows:
    """Rows from examples (truncated to max_length). Packing: best-fit-decreasing bins of at most
    max_length tokens, position_ids restarting per example, bins in seeded random order."""
    all_ids, all_mask, starts, full = _ref_spans(refs)
    lens = np.minimum(full, max_length)
    if packing:
        bins = pack_bins(lens, max_length)
        if rng is not None:
            bins = [bins[k] for k in rng.permutation(len(bins))]
    else:
        bins = [[k] for k in range(len(refs))]
    order = np.fromiter((k for b in bins for k in b), np.int64, len(refs))
    ex_lens = lens[order]
    ex_starts = np.concatenate([[0], np.cumsum(ex_lens)[:-1]]).astype(np.int64) if len(order) else np.zeros(0, np.int64)
    within = np.arange(int(ex_lens.sum()), dtype=np.int64) - np.repeat(ex_starts, ex_lens)
    gather = np.repeat(starts[order], ex_lens) + within  # one vectorized gather instead of a slice per example
    ids = all_ids[gather].astype(np.int64)
    labels = np.where(all_mask[gather] > 0, ids, IGNORE)
    row_lens = np.fromiter((len(b) for b in bins), np.int64, len(bins))
    row_tokens = np.add.reduceat(ex_lens, np.concatenate([[0], np.cumsum(row_lens)[:-1]])) if len(bins) else row_lens
    offsets = np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int64)
    names = [[refs[k].name for k in b] for b in bins]
    return FeatureRows(ids, labels, offsets, within if packing else None, names)


def pack_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first) goes into the fullest row it still fits."""
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(int(i))
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


class Collator:
    """Features -> a batch of tensors, padded on the right to the longest row (or ``pad_to``).

    Unpacked rows get an ``attention_mask``; packed rows get ``position_ids`` and no mask, so
    transformers builds a block-diagonal causal mask from the position restarts (exact only with
    ``use_cache=False``). Padding has labels -100 and, when packed, its own position run.
    A batch without a single trainable label raises DataError naming its examples."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None):
        self.pad_token_id, self.pad_to = int(pad_token_id), pad_to

    def __call__(self, features: list[dict]) -> dict:
        import torch

        packed = "position_ids" in features[0]
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to:
            width = max(width, self.pad_to)
        n = len(features)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        extra = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            if packed:
                extra[i, :k] = torch.as_tensor(f["position_ids"], dtype=torch.long)
                extra[i, k:] = torch.arange(width - k)
            else:
                extra[i, :k] = 1
        if not bool((labels[:, 1:] != IGNORE).any()):
            names = [x for f in features for x in f.get("example_ids", [])] or [f"batch rows 0..{n - 1}"]
            raise DataError(f"batch has no trainable label (all -100), examples: {', '.join(names[:8])}"
                            f"{' ...' if len(names) > 8 else ''}; check train_on_inputs, max_length and the template")
        out = {"input_ids": ids, "labels": labels}
        out["position_ids" if packed else "attention_mask"] = extra
        return out


# == the pipeline =================================================================================
@dataclass
class _Part:
    """One dataset entry of the recipe after loading, tokenizing and splitting."""

    index: int
    name: str
    entry: dict
    examples: list[Example]
    n_train: int  # examples[:n_train] came as train, the rest as the dataset's own validation
    own_validation: bool
    skipped: dict[str, int]
    fingerprint: str
    block: TokenBlock | None = None
    cache_hit: bool = False
    train_idx: np.ndarray | None = None
    val_idx: np.ndarray | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    digest: str = ""


def data_seed(recipe: dict) -> int:
    d = recipe["data"]
    return int(d["seed"]) if d.get("seed") is not None else int(recipe["training"]["seed"])


def load_entry(i: int, entry: dict, recipe: dict, tokenizer, manager) -> LoadedData:
    """Call one dataset entry's loader factory with its options and a DataContext."""
    d = recipe["data"]
    comp = manager.get("dataset", entry["loader"])
    ctx = DataContext(recipe_dir=str(Path(getattr(recipe, "path", None) or ".").resolve().parent),
                      on_error=entry.get("on_error") or d["on_error"],
                      streaming=bool(d.get("streaming")), seed=data_seed(recipe), tokenizer=tokenizer,
                      max_length=d["max_length"])
    with manager.calling(comp, "loading data"):
        loaded = comp.factory(dict(entry), ctx)
    if not isinstance(loaded, LoadedData):
        raise DataError(f"data.datasets[{i}]: loader {entry['loader']!r} returned {type(loaded).__name__}, "
                        f"expected ftk.components.LoadedData")
    if not isinstance(loaded.train, (list, tuple)):  # lazy examples: plugin code runs as they are read
        loaded.train = manager.iterate(comp, "reading examples", loaded.train)
    return loaded


def _render(examples: Iterable[Example], entry: dict, tokenizer, where: str, start: int = 0) -> list[Example]:
    """Apply the entry's chat template where asked and check each example has trainable text;
    ``start`` is the index of the first example (a later chunk of a stream)."""
    out = []
    for j, ex in enumerate(examples, start):
        if entry.get("template") == "chat":
            if not ex.messages:
                raise DataError(f"{where}: loader {entry['loader']!r} gives no conversation form for example {j}; "
                                f"template 'chat' needs one")
            ex2 = render_chat(tokenizer, ex.messages, f"{where} example {j}")
            ex2.meta = ex.meta
            ex = ex2
        if not any(s.train and s.text for s in ex.segments):
            raise DataError(f"{where} example {j}: no trainable text (loader {entry['loader']!r})")
        ex.source = entry["loader"]
        out.append(ex)
    return out


def _split(n: int, size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = int(round(size * n)) if size < 1 else int(size)
    k = min(k, max(n - 1, 0))
    perm = rng.permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _mix(parts: list[_Part], mixing: str, balance_to: str, rng: np.random.Generator) -> list[_Ref]:
    """Train examples of all datasets: concat, or balanced by weight (sampled, seeded)."""
    pools = [[_Ref(p.block, int(k), _example_name(p.name, int(k))) for k in p.train_idx] for p in parts]
    if mixing == "balanced" and len(parts) > 1:
        w = np.array([float(p.entry["weight"]) for p in parts])
        sizes = np.array([len(x) for x in pools], float)
        per_weight = (sizes / w)
        base = per_weight.max() if balance_to == "largest" else per_weight.min()
        chosen = []
        for pool, wi in zip(pools, w):
            want = int(round(wi * base))
            if not pool:
                continue
            reps, rest = divmod(want, len(pool))
            idx = [k for _ in range(reps) for k in range(len(pool))] + list(rng.permutation(len(pool))[:rest])
            chosen.extend(pool[k] for k in idx)
    else:
        chosen = [r for pool in pools for r in pool]
    return [chosen[k] for k in rng.permutation(len(chosen))]


def _token_stats(lens: np.ndarray) -> dict:
    """Token counts per example before truncation (BOS and EOS included)."""
    if not len(lens):
        return {"mean": 0.0, "p95": 0.0, "max": 0}
    return {"mean": round(float(lens.mean()), 1), "p95": round(float(np.percentile(lens, 95)), 1),
            "max": int(lens.max())}


def _sum_counts(dicts: Iterable[dict]) -> dict:
    out: dict[str, int] = {}
    for dct in dicts:
        for k, v in dct.items():
            out[k] = out.get(k, 0) + v
    return out


def padding_waste(lengths: np.ndarray, batch_size: int, pad_to: int | None = None) -> float:
    """Share of positions that are padding when rows are batched in order and padded to the
    longest in each batch (or to ``pad_to``)."""
    if not len(lengths):
        return 0.0
    total = 0
    for a in range(0, len(lengths), batch_size):
        b = lengths[a: a + batch_size]
        total += len(b) * (pad_to or int(b.max()))
    return round(1.0 - float(lengths.sum()) / total, 4)


def prepare_data(recipe: dict, tokenizer, manager, progress: bool | None = None, reuse: bool = True) -> PreparedData:
    """Load every dataset entry, render, tokenize (cached), split, mix, pack; see the module doc.

    With ``reuse`` (and data.cache on), the finished rows are cached too, keyed by the recipe's data
    settings, the tokenizer, the loader plugins' versions and the size and mtime of every local file a
    dataset entry names: a second run with unchanged inputs reads arrays instead of parsing and
    rendering every record again. (``ftk data preview`` passes reuse=False: it needs the examples.)"""
    d = recipe["data"]
    prepare_tokenizer(tokenizer)
    if d.get("streaming"):
        return _prepare_streaming(recipe, tokenizer, manager, progress)
    key = _result_key(recipe, tokenizer, manager) if (reuse and d["cache"]) else None
    if key:
        hit = _load_result(cache_root(d) / "prepared" / key, tokenizer)
        if hit is not None:
            return hit
    prepared = _prepare_uncached(recipe, tokenizer, manager, progress)
    if key and prepared.reusable:
        _save_result(cache_root(d) / "prepared" / key, prepared)
    return prepared


def _file_states(paths) -> list:
    """[path, size, mtime_ns] of each file, [path, None, None] when it is gone (the cache misses then)."""
    out = []
    for f in sorted(set(map(str, paths))):
        try:
            st = os.stat(f)
            out.append([f, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([f, None, None])
    return out


def _source_state(value: str) -> list | None:
    """(path, size, mtime_ns) of a local file and the files beside it, or of every file below a folder."""
    p = Path(value)
    # a named file's siblings count too: loaders read companions (validation.zip beside train.zip)
    files = sorted(f for f in (p.parent.iterdir() if p.is_file() else p.rglob("*")) if f.is_file())
    if len(files) > 10000:
        return None
    return _file_states(files)


def _result_key(recipe: dict, tokenizer, manager) -> str | None:
    d = recipe["data"]
    sources = []
    for entry in d["datasets"]:
        comp = manager.get("dataset", entry["loader"])
        state = [entry["loader"], comp.package, comp.version]
        for k, v in sorted(entry.items()):
            if isinstance(v, str) and os.path.isabs(v) and os.path.exists(v):
                st = _source_state(v)
                if st is None:
                    return None
                state.append([k, st])
            elif k == "path":
                return None  # a hub dataset: its content is not known without loading it
        sources.append(state)
    from ftk import __version__

    blob = [CACHE_VERSION, __version__, sources, tokenizer_fingerprint(tokenizer), data_seed(recipe), _settings(d),
            int(recipe["training"]["batch_size"])]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


_ROW_ARRAYS = ("ids", "labels", "offsets", "position_ids")


def _save_result(d: Path, prepared: PreparedData) -> None:
    from ftk.io import atomic_write_bytes, atomic_write_json

    try:
        meta = {"eval_pairs": prepared.eval_pairs, "stats": prepared.stats, "fingerprint": prepared.fingerprint,
                "pad_token_id": prepared.collator.pad_token_id, "pad_to": prepared.collator.pad_to, "sets": {},
                "source_files": prepared.source_files}
        for name in ("train", "validation", "validation_unpacked"):
            rows = getattr(prepared, name)
            for a in _ROW_ARRAYS:
                arr = getattr(rows, a)
                if arr is not None:
                    atomic_write_bytes(d / f"{name}.{a}.npy", _npy_bytes(np.asarray(arr)))
            meta["sets"][name] = {"names": rows.names, "packed": rows.position_ids is not None}
        atomic_write_json(d / "prepared.json", meta)  # written last: its presence marks a complete entry
    except OSError as e:
        import warnings

        warnings.warn(f"ftk: data cache not written to {d}: {e.strerror}", stacklevel=2)


def _load_result(d: Path, tokenizer) -> PreparedData | None:
    try:
        meta = json.loads((d / "prepared.json").read_text(encoding="utf-8"))
        sets = {}
        for name, info in meta["sets"].items():
            arrs = {a: np.load(d / f"{name}.{a}.npy", allow_pickle=False)
                    for a in _ROW_ARRAYS if a != "position_ids" or info["packed"]}
            sets[name] = FeatureRows(arrs["ids"], arrs["labels"], arrs["offsets"], arrs.get("position_ids"),
                                     info["names"])
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: rebuilt
    if meta["pad_token_id"] != tokenizer.pad_token_id:
        return None
    declared = meta.get("source_files") or []
    if declared and _file_states(f for f, _, _ in declared) != declared:
        return None  # a file a loader declared (LoadedData.source_files) changed or is gone
    for ds in meta["stats"].get("datasets", []):
        if isinstance(ds, dict) and "cache" in ds:
            ds["cache"] = "hit"
    return PreparedData(train=sets["train"], validation=sets["validation"], source_files=declared,
                        collator=Collator(meta["pad_token_id"], meta["pad_to"]),
                        eval_pairs=[tuple(x) for x in meta["eval_pairs"]],
                        validation_unpacked=sets["validation_unpacked"], stats=meta["stats"],
                        fingerprint=meta["fingerprint"])


def _part_name(datasets: list, i: int) -> str:
    """A dataset entry's name in stats and example ids: its loader, with the entry index when the same
    loader appears more than once."""
    loader = datasets[i]["loader"]
    return loader if sum(e["loader"] == loader for e in datasets) == 1 else f"{loader}[{i}]"


def _example_name(part: str, k: int, n_train: int | None = None) -> str:
    """``part#k``: the k-th training example as loaded (before any hold-out); ``part#vj``: the j-th example
    of the dataset's own validation split (index k >= n_train in the loaded list)."""
    return f"{part}#v{k - n_train}" if n_train is not None and k >= n_train else f"{part}#{k}"


def _keep(block, max_length: int, drop_long: bool):
    """-> (keep, {drop reason: mask}, truncated mask). An example trains when it has a trainable label
    within max_length; with truncation "drop" also only when it fits (counted as too long)."""
    too_long = block.lengths > max_length
    no_label = block.trainable_within(max_length) <= 0
    if drop_long:
        no_label &= ~too_long
        return ~(no_label | too_long), {"too_long": too_long, "no_trainable_tokens": no_label}, np.zeros_like(too_long)
    return ~no_label, {"no_trainable_tokens": no_label}, too_long & ~no_label


def _prepare_uncached(recipe: dict, tokenizer, manager, progress: bool | None = None) -> PreparedData:
    d = recipe["data"]
    seed = data_seed(recipe)
    max_length = int(d["max_length"])
    parts: list[_Part] = []
    declared: list[str] = []  # files the loaders read beyond those their options name
    reusable = True
    for i, entry in enumerate(d["datasets"]):
        where = f"data.datasets[{i}] ({entry['loader']})"
        loaded = load_entry(i, entry, recipe, tokenizer, manager)
        declared += loaded.source_files
        reusable = reusable and loaded.reusable
        train = list(itertools.islice(loaded.train, entry.get("max_examples") or None))
        val = loaded.validation
        if val is not None and entry.get("max_examples"):
            val = val[: entry["max_examples"]]
        train = _render(train, entry, tokenizer, where)
        val = _render(val, entry, tokenizer, where + " validation") if val else None
        if not train:
            raise DataError(f"{where}: no training examples"
                            + (f" (skipped: {loaded.skipped})" if loaded.skipped else ""))
        name = _part_name(d["datasets"], i)
        parts.append(_Part(index=i, name=name, entry=entry, examples=train + (val or []), n_train=len(train),
                           own_validation=bool(val), skipped=dict(loaded.skipped), fingerprint=loaded.fingerprint))
    for p in parts:
        p.digest = examples_digest(p.examples)
        p.block, p.cache_hit = cached_tokenize(p.examples, tokenizer, d["train_on_inputs"], d, progress,
                                               desc=f"tokenizing {p.name}", digest=p.digest)
        keep, dropped, truncated = _keep(p.block, max_length, d.get("truncation") == "drop")
        p.dropped.update({reason: int(mask.sum()) for reason, mask in dropped.items()})
        p.truncated = int(truncated.sum())
        no_label = dropped["no_trainable_tokens"]
        idx = np.arange(len(p.examples))
        train_all, val_all = idx[: p.n_train], idx[p.n_train:]
        if not p.own_validation and d["validation_size"]:
            rng = np.random.default_rng([seed, p.index])
            t, v = _split(p.n_train, float(d["validation_size"]), rng)
            train_all, val_all = train_all[t], train_all[v]
        p.train_idx, p.val_idx = train_all[keep[train_all]], val_all[keep[val_all]]
        if not len(p.train_idx):
            bad = [_example_name(p.name, k) for k in np.flatnonzero(no_label)[:5]]
            raise DataError(f"data.datasets[{p.index}] ({p.name}): no example has a trainable label within "
                            f"max_length {max_length} (e.g. {', '.join(bad) or 'all dropped as too long'}); "
                            f"raise data.max_length or check the template")
    rng = np.random.default_rng(seed)
    train_refs = _mix(parts, d["mixing"], d["balance_to"], rng)
    val_refs = [_Ref(p.block, int(k), _example_name(p.name, int(k), p.n_train)) for p in parts for k in p.val_idx]
    packing = bool(d["packing"])
    train_rows = build_rows(train_refs, max_length, packing, rng)
    val_rows = build_rows(val_refs, max_length, packing, None)
    val_unpacked = build_rows(val_refs, max_length, False, None) if packing else val_rows
    pad_to = max_length if (d.get("pad_to_max_length") and not packing) else None
    collator = Collator(tokenizer.pad_token_id, pad_to)
    eval_pairs = [(p.examples[k].prompt, p.examples[k].reference) for p in parts for k in p.val_idx
                  if p.examples[k].prompt is not None and p.examples[k].reference is not None]
    stats = _stats(recipe, parts, train_refs, train_rows, val_rows, max_length)
    fp = hashlib.sha256(json.dumps([[p.fingerprint, p.digest] for p in parts]
                                   + [tokenizer_fingerprint(tokenizer), seed, _settings(d)]).encode()).hexdigest()[:20]
    prepared = PreparedData(train=train_rows, validation=val_rows, collator=collator, eval_pairs=eval_pairs,
                            validation_unpacked=val_unpacked, stats=stats, fingerprint=fp,
                            source_files=_file_states(declared), reusable=reusable)
    prepared.examples = {p.name: p.examples for p in parts}  # for preview
    prepared.train_refs = train_refs
    return prepared


def _settings(d: dict) -> dict:
    keys = ("mixing", "balance_to", "max_length", "validation_size", "train_on_inputs", "packing",
            "pad_to_max_length", "truncation", "on_error")
    return {k: d.get(k) for k in keys} | {"datasets": d["datasets"]}


def _stats(recipe, parts, train_refs, train_rows, val_rows, max_length) -> dict:
    d = recipe["data"]
    bs = int(recipe["training"]["batch_size"])
    per = []
    for p in parts:
        lens = p.block.lengths
        per.append({
            "name": p.name, "loader": p.entry["loader"],
            "examples": {"train": int(len(p.train_idx)), "validation": int(len(p.val_idx))},
            "validation_from": "own split" if p.own_validation else (
                f"validation_size {d.get('validation_size')}" if d.get("validation_size") else "none"),
            "tokens": _token_stats(lens),
            "truncated": p.truncated, "dropped": dict(p.dropped),
            "skipped": dict(p.skipped), "cache": "hit" if p.cache_hit else "miss",
        })
    sampled: dict[str, int] = {}
    for r in train_refs:
        src = r.name.rsplit("#", 1)[0]
        sampled[src] = sampled.get(src, 0) + 1
    ex_lens = np.minimum(_ref_spans(train_refs)[3], max_length)
    all_lens = np.concatenate([p.block.lengths for p in parts])
    return {
        "datasets": per,
        "train": {"examples": len(train_refs), "per_dataset": sampled, "rows": len(train_rows),
                  "tokens": int(train_rows.lengths.sum()),
                  "trainable_tokens": int((train_rows.labels != IGNORE).sum())},
        "validation": {"examples": int(sum(len(p.val_idx) for p in parts)), "rows": len(val_rows)},
        "tokens": _token_stats(all_lens),
        "truncated": sum(p.truncated for p in parts),
        "dropped": {k: sum(p.dropped.get(k, 0) for p in parts) for k in ("too_long", "no_trainable_tokens")},
        "skipped": _sum_counts(p.skipped for p in parts),
        "padding_waste": {  # batches of training.batch_size in order
            "unpacked": padding_waste(ex_lens, bs),
            "unpacked_pad_to_max_length": padding_waste(ex_lens, bs, max_length),
            "packed": padding_waste(train_rows.lengths, bs),
        },
        "settings": {"max_length": max_length, "packing": bool(d["packing"]),
                     "mixing": d["mixing"], "train_on_inputs": bool(d.get("train_on_inputs")),
                     "batch_size": bs},
    }


# == streaming ====================================================================================
STREAM_CHUNK = 1024  # examples tokenized (and packed) together while streaming
STREAM_DEFAULT_VALIDATION = 100


def _prepare_streaming(recipe: dict, tokenizer, manager, progress: bool | None) -> PreparedData:
    """Streaming: datasets are read lazily and tokenized/packed chunk by chunk (no cache, no
    balanced mixing). Validation is the dataset's own split, else the first ``validation_size``
    examples of the stream (a count; a fraction cannot be taken of an unknown length, so the first
    100 are held out)."""
    d = recipe["data"]
    max_length, packing = int(d["max_length"]), bool(d["packing"])
    streams, val_parts = [], []
    for i, entry in enumerate(d["datasets"]):
        where = f"data.datasets[{i}] ({entry['loader']})"
        loaded = load_entry(i, entry, recipe, tokenizer, manager)
        it = iter(loaded.train)
        if entry.get("max_examples"):
            it = itertools.islice(it, entry["max_examples"])
        vs = d.get("validation_size") or 0
        own = bool(loaded.validation)
        if own:
            val = list(loaded.validation)[: entry.get("max_examples") or None]  # as in memory
        else:
            val = list(itertools.islice(it, int(vs) if vs >= 1 else (STREAM_DEFAULT_VALIDATION if vs else 0)))
        name = _part_name(d["datasets"], i)
        # names as in memory: #k counts the stream from its start (hold-out included), #vj the own split
        streams.append((name, entry, it, loaded, where, 0 if own else len(val)))
        val = _render(val, entry, tokenizer, where + " validation")
        if val:
            blk = tokenize_examples(val, tokenizer, d["train_on_inputs"], False)
            keep = np.flatnonzero(_keep(blk, max_length, d.get("truncation") == "drop")[0])
            val_parts.append((name, val, blk, keep, 0 if own else None))
    val_refs = [_Ref(blk, int(k), _example_name(name, int(k), n_train))
                for name, _, blk, keep, n_train in val_parts for k in keep]
    val_rows = build_rows(val_refs, max_length, packing, None)
    counters = {"examples": 0, "dropped": {}, "truncated": 0}
    skipped = _sum_counts(s[3].skipped for s in streams)  # kept current as the stream is read

    def generate():
        for name, entry, it, loaded, where, n in streams:
            while True:
                chunk = list(itertools.islice(it, STREAM_CHUNK))
                if not chunk:
                    break
                exs = _render(chunk, entry, tokenizer, where, start=n)
                blk = tokenize_examples(exs, tokenizer, d["train_on_inputs"], False)
                keep, dropped, truncated = _keep(blk, max_length, d.get("truncation") == "drop")
                counters["truncated"] += int(truncated.sum())
                for reason, mask in dropped.items():
                    counters["dropped"][reason] = counters["dropped"].get(reason, 0) + int(mask.sum())
                refs = [_Ref(blk, int(k), _example_name(name, n + int(k))) for k in np.flatnonzero(keep)]
                counters["examples"] += len(refs)
                n += len(exs)
                skipped.update(_sum_counts(s[3].skipped for s in streams))
                rows = build_rows(refs, max_length, packing, np.random.default_rng([data_seed(recipe), n]))
                yield from rows

    import torch

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return generate()

    stats = {"streaming": True, "validation": {"examples": len(val_refs), "rows": len(val_rows)},
             "train": counters, "skipped": skipped,
             "settings": {"max_length": max_length, "packing": packing}}
    pad_to = max_length if (d.get("pad_to_max_length") and not packing) else None
    fp = hashlib.sha256(json.dumps([[s[3].fingerprint for s in streams], tokenizer_fingerprint(tokenizer),
                                    _settings(d)]).encode()).hexdigest()[:20]
    return PreparedData(train=_Stream(), validation=val_rows, collator=Collator(tokenizer.pad_token_id, pad_to),
                        eval_pairs=[(e.prompt, e.reference) for _, val, _, keep, _ in val_parts for e in
                                    (val[k] for k in keep) if e.prompt is not None and e.reference is not None],
                        validation_unpacked=build_rows(val_refs, max_length, False, None) if packing else val_rows,
                        stats=stats, fingerprint=fp)

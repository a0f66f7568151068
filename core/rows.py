"""Rows: chosen examples -> training rows (truncated, optionally packed) and batches of them.

numpy at module level; torch loads only when a batch is collated.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ftk.errors import DataError
from ftk.tokens import IGNORE, TokenBlock


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
class Ref:
    """One example chosen for a split: its token block, index there, and name."""

    block: TokenBlock
    idx: int
    name: str


def ref_spans(refs: list[Ref]):
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


def build_rows(refs: list[Ref], max_length: int, packing: bool, rng: np.random.Generator | None = None) -> FeatureRows:
    """Rows from examples (truncated to max_length). Packing: best-fit-decreasing bins of at most
    max_length tokens, position_ids restarting per example, bins in seeded random order."""
    all_ids, all_mask, starts, full = ref_spans(refs)
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
    ``use_cache=False``). Padding has labels -100 and, when packed, its own position run. With
    ``sequence_bounds`` packed batches also carry ``cu_seq_lens_q``/``_k`` and ``max_length_q``/``_k``
    (the sequences over the flattened batch), which ftk's ``sdpa_packed`` attention reads.
    A batch without a single trainable label raises DataError naming its examples."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None, sequence_bounds: bool = False):
        self.pad_token_id, self.pad_to = int(pad_token_id), pad_to
        self.sequence_bounds = sequence_bounds

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
        if packed and self.sequence_bounds:
            from ftk.attention import sequence_bounds

            cu = sequence_bounds(extra)
            longest = int((cu[1:] - cu[:-1]).max())
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
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

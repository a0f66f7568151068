"""The data pipeline: loaders' examples -> rendered, tokenized, split, mixed and packed rows.

Each step has its own module; this one runs them in order for a recipe:
``ftk.loaderkit`` (what loaders are written with; its names are importable from here too),
``ftk.tokens`` (examples -> token ids and label masks), ``ftk.rows`` (rows, packing, the collator) and
``ftk.datacache`` (tokenized examples and finished rows kept between runs). An example may come already
tokenized (``Example.token_ids``): it skips rendering and tokenizing, and is truncated, split, mixed,
packed and cached like any other. Trainers of the "pairs" data form get preference pairs instead
(``ftk.pairs``), built with the same loading, splitting and mixing steps. Only the standard library and
numpy are imported at module level; torch/transformers/datasets load inside functions.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ftk.components import DataContext, Example, LoadedData, PreferencePair, PreparedData
from ftk.datacache import cache_root, cached_tokenize, examples_digest, file_states, load_result, result_key, save_result
from ftk.errors import DataError
from ftk.loaderkit import (  # noqa: F401 - the loader helpers' old home: ftk.data.<name> keeps working
    ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, DEFAULT_SPEAKERS, FILE_OPTIONS, ROLES_OPTION, BadRecord, RecordPolicy, check_messages, check_path,
    conversation_example, decode_utf8, detect_format, example_from_row, field_str, file_fingerprint,
    instruction_example, iter_records, load_hub, loader_from_class, merge_segments, preference_pair, read_text,
    split_template, tokenized_example,
)
from ftk.rows import IGNORE, Collator, Ref, build_rows, padding_waste, ref_spans
from ftk.tokens import TokenBlock, prepare_tokenizer, render_chat, tokenize_examples, tokenizer_fingerprint


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


def trainer_name(recipe: dict) -> str:
    """The recipe's training method (its trainer section, or the schema's default)."""
    from ftk.train import trainer_section

    return trainer_section(recipe)["method"]


def check_form(item, form: str, entry: dict, where: str, trainer: str) -> None:
    """One line naming the entry and the trainer when a loader's item is not of the trainer's data form."""
    if form == "pairs" and not isinstance(item, PreferencePair):
        got = "examples (rows)" if isinstance(item, Example) else type(item).__name__
        raise DataError(f"{where}: loader {entry['loader']!r} gives {got}, but trainer {trainer!r} trains on "
                        f"preference pairs (data form \"pairs\"); use a loader of pairs such as 'preference'")
    if form == "rows" and not isinstance(item, Example):
        got = "preference pairs" if isinstance(item, PreferencePair) else type(item).__name__
        raise DataError(f"{where}: loader {entry['loader']!r} gives {got}, but trainer {trainer!r} trains on rows of "
                        f"examples (data form \"rows\"); use a preference trainer or a loader of examples")


def _render(examples: Iterable[Example], entry: dict, tokenizer, where: str, start: int = 0,
            trainer: str = "") -> list[Example]:
    """Apply the entry's chat template where asked and check each example has trainable text;
    ``start`` is the index of the first example (a later chunk of a stream). An already-tokenized
    example is taken as it is, its ids checked against the tokenizer's vocabulary."""
    out = []
    vocab_size = len(tokenizer)
    for j, ex in enumerate(examples, start):
        check_form(ex, "rows", entry, where, trainer)
        if ex.token_ids is not None:  # taken as it is: no template, ids checked (any loader may give one)
            try:
                checked = tokenized_example(ex.token_ids, ex.token_labels, vocab_size=vocab_size)
            except BadRecord as e:
                raise DataError(f"{where} example {j}: {e.message} (loader {entry['loader']!r})") from None
            ex.token_ids, ex.token_labels = checked.token_ids, checked.token_labels
        else:
            if entry.get("template") == "chat":
                if not ex.messages:
                    raise DataError(f"{where}: loader {entry['loader']!r} gives no conversation form for example "
                                    f"{j}; template 'chat' needs one")
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


def _mix(parts: list[_Part], mixing: str, balance_to: str, rng: np.random.Generator) -> list[Ref]:
    """Train examples of all datasets: concat, or balanced by weight (sampled, seeded)."""
    pools = [[Ref(p.block, int(k), _example_name(p.name, int(k))) for k in p.train_idx] for p in parts]
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



def prepare_data(recipe: dict, tokenizer, manager, progress: bool | None = None, reuse: bool = True,
                 form: str | None = None) -> PreparedData:
    """Load every dataset entry, render, tokenize (cached), split, mix, pack; see the module doc.

    ``form`` is the data form the trainer trains on (``ftk.components.DATA_FORMS``); None asks the recipe's
    trainer (its TrainerPlan). "pairs" builds preference pairs (``ftk.pairs.prepare_pairs``).

    With ``reuse`` (and data.cache on), the finished rows are cached too, keyed by the recipe's data
    settings, the tokenizer, the loader plugins' versions and the size and mtime of every local file a
    dataset entry names: a second run with unchanged inputs reads arrays instead of parsing and
    rendering every record again. (``ftk data preview`` passes reuse=False: it needs the examples.)"""
    d = recipe["data"]
    if form is None:
        from ftk.train import trainer_plan

        form = trainer_plan(recipe, manager, recipe.get("output_dir") or ".").data
    prepare_tokenizer(tokenizer)
    if form == "pairs":
        from ftk.pairs import prepare_pairs

        return prepare_pairs(recipe, tokenizer, manager, progress)
    if d.get("max_prompt_length") is not None:
        raise DataError(f"data.max_prompt_length applies to preference pairs; trainer {trainer_name(recipe)!r} "
                        f"trains on rows (remove it, or use a preference trainer)")
    if d.get("streaming"):
        return _prepare_streaming(recipe, tokenizer, manager, progress)
    key = None
    if reuse and d["cache"]:
        key = result_key(d["datasets"], tokenizer, manager,
                         [data_seed(recipe), _settings(d), int(recipe["training"]["batch_size"])])
    if key:
        hit = load_result(cache_root(d) / "prepared" / key, tokenizer)
        if hit is not None:
            return hit
    prepared = _prepare_uncached(recipe, tokenizer, manager, progress)
    if key and prepared.reusable:
        save_result(cache_root(d) / "prepared" / key, prepared)
    return prepared


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


def load_parts(recipe: dict, tokenizer, manager, render) -> tuple[list[_Part], list[str], bool]:
    """Every dataset entry loaded and rendered: (parts, files the loaders declared, all reusable).
    ``render(items, entry, where)`` checks and renders one split's items (examples or pairs)."""
    d = recipe["data"]
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
        train = render(train, entry, where)
        val = render(val, entry, where + " validation") if val else None
        if not train:
            raise DataError(f"{where}: no training examples"
                            + (f" (skipped: {loaded.skipped})" if loaded.skipped else ""))
        name = _part_name(d["datasets"], i)
        parts.append(_Part(index=i, name=name, entry=entry, examples=train + (val or []), n_train=len(train),
                           own_validation=bool(val), skipped=dict(loaded.skipped), fingerprint=loaded.fingerprint))
    return parts, declared, reusable


def hold_out(p: _Part, keep: np.ndarray, d: dict, seed: int) -> None:
    """Set the part's train/validation indices: its own validation split, else ``validation_size`` of its
    training examples held out (seeded per entry); only examples ``keep`` marks stay in either."""
    idx = np.arange(len(p.examples))
    train_all, val_all = idx[: p.n_train], idx[p.n_train:]
    if not p.own_validation and d["validation_size"]:
        rng = np.random.default_rng([seed, p.index])
        t, v = _split(p.n_train, float(d["validation_size"]), rng)
        train_all, val_all = train_all[t], train_all[v]
    p.train_idx, p.val_idx = train_all[keep[train_all]], val_all[keep[val_all]]


def _prepare_uncached(recipe: dict, tokenizer, manager, progress: bool | None = None) -> PreparedData:
    d = recipe["data"]
    seed = data_seed(recipe)
    max_length = int(d["max_length"])
    trainer = trainer_name(recipe)
    parts, declared, reusable = load_parts(
        recipe, tokenizer, manager, lambda items, entry, where: _render(items, entry, tokenizer, where, trainer=trainer))
    for p in parts:
        p.digest = examples_digest(p.examples)
        p.block, p.cache_hit = cached_tokenize(p.examples, tokenizer, d["train_on_inputs"], d, progress,
                                               desc=f"tokenizing {p.name}", digest=p.digest)
        keep, dropped, truncated = _keep(p.block, max_length, d.get("truncation") == "drop")
        p.dropped.update({reason: int(mask.sum()) for reason, mask in dropped.items()})
        p.truncated = int(truncated.sum())
        no_label = dropped["no_trainable_tokens"]
        hold_out(p, keep, d, seed)
        if not len(p.train_idx):
            bad = [_example_name(p.name, k) for k in np.flatnonzero(no_label)[:5]]
            raise DataError(f"data.datasets[{p.index}] ({p.name}): no example has a trainable label within "
                            f"max_length {max_length} (e.g. {', '.join(bad) or 'all dropped as too long'}); "
                            f"raise data.max_length or check the template")
    rng = np.random.default_rng(seed)
    train_refs = _mix(parts, d["mixing"], d["balance_to"], rng)
    val_refs = [Ref(p.block, int(k), _example_name(p.name, int(k), p.n_train)) for p in parts for k in p.val_idx]
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
                            source_files=file_states(declared), reusable=reusable)
    prepared.examples = {p.name: p.examples for p in parts}  # for preview
    prepared.train_refs = train_refs
    return prepared


def _settings(d: dict) -> dict:
    keys = ("mixing", "balance_to", "max_length", "validation_size", "train_on_inputs", "packing",
            "pad_to_max_length", "truncation", "on_error")
    return {k: d.get(k) for k in keys} | {"datasets": d["datasets"]}


def part_stats(p: _Part, d: dict, lens: np.ndarray) -> dict:
    """One dataset entry's line of the stats; ``lens``: its token counts per example (or pair)."""
    return {
        "name": p.name, "loader": p.entry["loader"],
        "examples": {"train": int(len(p.train_idx)), "validation": int(len(p.val_idx))},
        "validation_from": "own split" if p.own_validation else (
            f"validation_size {d.get('validation_size')}" if d.get("validation_size") else "none"),
        "tokens": _token_stats(lens),
        "truncated": p.truncated, "dropped": dict(p.dropped),
        "skipped": dict(p.skipped), "cache": "hit" if p.cache_hit else "miss",
    }


def per_dataset(train_refs: list[Ref]) -> dict[str, int]:
    """Training examples drawn from each dataset entry (after mixing)."""
    sampled: dict[str, int] = {}
    for r in train_refs:
        src = r.name.rsplit("#", 1)[0]
        sampled[src] = sampled.get(src, 0) + 1
    return sampled


def _stats(recipe, parts, train_refs, train_rows, val_rows, max_length) -> dict:
    d = recipe["data"]
    bs = int(recipe["training"]["batch_size"])
    per = [part_stats(p, d, p.block.lengths) for p in parts]
    sampled = per_dataset(train_refs)
    ex_lens = np.minimum(ref_spans(train_refs)[3], max_length)
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
    trainer = trainer_name(recipe)
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
        val = _render(val, entry, tokenizer, where + " validation", trainer=trainer)
        if val:
            blk = tokenize_examples(val, tokenizer, d["train_on_inputs"], False)
            keep = np.flatnonzero(_keep(blk, max_length, d.get("truncation") == "drop")[0])
            val_parts.append((name, val, blk, keep, 0 if own else None))
    val_refs = [Ref(blk, int(k), _example_name(name, int(k), n_train))
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
                exs = _render(chunk, entry, tokenizer, where, start=n, trainer=trainer)
                blk = tokenize_examples(exs, tokenizer, d["train_on_inputs"], False)
                keep, dropped, truncated = _keep(blk, max_length, d.get("truncation") == "drop")
                counters["truncated"] += int(truncated.sum())
                for reason, mask in dropped.items():
                    counters["dropped"][reason] = counters["dropped"].get(reason, 0) + int(mask.sum())
                refs = [Ref(blk, int(k), _example_name(name, n + int(k))) for k in np.flatnonzero(keep)]
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

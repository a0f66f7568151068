"""The data cache under ``cache_root``: tokenized examples, and the finished rows of a whole recipe.

Entries are written atomically with a marker file last, so a damaged or half-written entry is a miss
and is rebuilt. numpy is the only heavy import at module level.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ftk.components import Example, PreparedData
from ftk.rows import Collator, FeatureRows
from ftk.tokens import TokenBlock, tokenize_examples, tokenizer_fingerprint

CACHE_VERSION = 2  # 2: own-validation examples named part#vj


def cache_root(data_cfg: dict) -> Path:
    root = data_cfg.get("cache_dir") or os.environ.get("FTK_CACHE_DIR") or os.path.join("~", ".cache", "ftk")
    return Path(os.path.expanduser(root)) / "data"


def examples_digest(examples: list[Example]) -> str:
    """What tokenization sees of the examples: segment texts and flags, or an already-tokenized
    example's ids and labels (so a changed id or label is a cache miss)."""
    h = hashlib.sha256()
    for ex in examples:
        if ex.token_ids is not None:
            h.update(b"\x03" + len(ex.token_ids).to_bytes(8, "little") + np.asarray(ex.token_ids, np.int64).tobytes())
            h.update(b"\x04" if ex.token_labels is None else b"\x05" + np.asarray(ex.token_labels, np.int64).tobytes())
        else:
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
    return cached_block(data_cfg, [CACHE_VERSION, digest or examples_digest(examples), tokenizer_fingerprint(tokenizer),
                                   bool(train_on_inputs)], len(examples),
                        lambda: tokenize_examples(examples, tokenizer, train_on_inputs, progress, desc))


def cached_block(data_cfg: dict, key_parts: list, n: int, build) -> tuple[TokenBlock, bool]:
    """The TokenBlock of ``n`` sequences stored under the key of ``key_parts`` (JSON), else ``build()``'s,
    stored there: (block, hit). With data.cache off, always ``build()``'s."""
    if not data_cfg["cache"]:
        return build(), False
    from ftk.io import atomic_write_bytes, atomic_write_json

    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:24]
    d = cache_root(data_cfg) / key
    if (d / "done.json").exists():
        try:
            blk = TokenBlock(*(np.load(d / f"{k}.npy", allow_pickle=False) for k in ("ids", "mask", "offsets")))
            if len(blk) == n:
                return blk, True
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt
    blk = build()
    try:
        for k in ("ids", "mask", "offsets"):
            atomic_write_bytes(d / f"{k}.npy", _npy_bytes(getattr(blk, k)))
        atomic_write_json(d / "done.json", {"version": CACHE_VERSION, "sequences": n})  # written last
    except OSError as e:
        import warnings

        warnings.warn(f"ftk: data cache not written to {d}: {e.strerror}", stacklevel=3)
    return blk, False


def texts_digest(rows) -> str:
    """A digest of tuples of strings (rendered preference pairs), for cache keys."""
    h = hashlib.sha256()
    for row in rows:
        for t in row:
            h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(b"\x02")
    return h.hexdigest()


def file_states(paths) -> list:
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
    return file_states(files)


def result_key(datasets: list[dict], tokenizer, manager, settings: list) -> str | None:
    """Key of a recipe's finished rows; None when their inputs cannot be checked without loading them.

    ``settings`` is what else the rows depend on, as the pipeline sees it (seed, data settings, batch size)."""
    sources = []
    for entry in datasets:
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

    blob = [CACHE_VERSION, __version__, sources, tokenizer_fingerprint(tokenizer), *settings]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


_ROW_ARRAYS = ("ids", "labels", "offsets", "position_ids")


def save_result(d: Path, prepared: PreparedData) -> None:
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


def load_result(d: Path, tokenizer) -> PreparedData | None:
    """The rows :func:`save_result` wrote to ``d``; None when missing, damaged or stale."""
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
    if declared and file_states(f for f, _, _ in declared) != declared:
        return None  # a file a loader declared (LoadedData.source_files) changed or is gone
    for ds in meta["stats"].get("datasets", []):
        if isinstance(ds, dict) and "cache" in ds:
            ds["cache"] = "hit"
    return PreparedData(train=sets["train"], validation=sets["validation"], source_files=declared,
                        collator=Collator(meta["pad_token_id"], meta["pad_to"]),
                        eval_pairs=[tuple(x) for x in meta["eval_pairs"]],
                        validation_unpacked=sets["validation_unpacked"], stats=meta["stats"],
                        fingerprint=meta["fingerprint"])


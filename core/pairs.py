"""Preference pairs: the loaders' PreferencePairs -> rendered, tokenized, truncated, split and mixed pairs,
for trainers of the "pairs" data form (DPO, ORPO, KTO). Loading, the validation split and mixing are
``ftk.data``'s own steps; what differs from rows is here.

Rendering: text pairs are used as they are (each response continues the prompt directly); conversational
pairs are rendered in ftk's conversation format (``User: ...`` / ``Assistant: ...``, as the
``dailydialog`` and ``custom`` loaders render the same conversations for supervised training), or with
``"template": "chat"`` by the tokenizer's chat template (the prompt with the generation prompt; a
response is the whole conversation's text after it).

Tokenizing (as TRL's DPOTrainer does): the prompt, and prompt + response, are tokenized whole; the
response is what follows the tokens the prompt shares with both prompt + chosen and prompt + rejected,
so prompt + response is exactly how the whole text tokenizes. BOS goes before the prompt and EOS after
each response unless the text has them already (chat templates).

Truncation to ``data.max_length``: a pair whose prompt plus longer response is longer loses the start
of its prompt down to ``data.max_prompt_length`` tokens (BOS kept; null: max_length // 2), then the end
of each response to fit; ``data.truncation: "drop"`` drops it instead. Both are counted. Pairs are
never packed. numpy at module level; tokenizers and tqdm load inside functions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ftk.components import PreferencePair, PreparedData
from ftk.data import (
    _Part, _example_name, _mix, _settings, _sum_counts, _token_stats, check_form, data_seed, hold_out, load_parts,
    part_stats, per_dataset, trainer_name,
)
from ftk.datacache import CACHE_VERSION, cached_block, file_states, texts_digest
from ftk.errors import DataError
from ftk.loaderkit import BadRecord, conversation_example, preference_pair
from ftk.rows import Collator, Ref, build_rows
from ftk.tokens import NOT_PREFIX, TokenBlock, adds_bos, adds_eos, chat_text, fast_backend, tokenizer_fingerprint


@dataclass
class RenderedPair:
    """A pair as text, template applied: ``prompt`` then ``chosen`` (or ``rejected``) is the sequence the
    model sees, before BOS/EOS. ``reference`` is the chosen response's own text (generation metrics)."""

    prompt: str
    chosen: str
    rejected: str
    reference: str
    meta: dict = field(default_factory=dict)


def render_pairs(items, entry: dict, tokenizer, where: str, trainer: str) -> list[RenderedPair]:
    """Check each item is a well-formed PreferencePair (one line naming the entry otherwise) and render it."""
    template = entry.get("template") or "default"
    if template not in ("default", "chat"):
        raise DataError(f"{where}: template {template!r}: preference pairs take \"default\" (text as it is, "
                        f"conversations in ftk's format) or \"chat\" (the tokenizer's chat template)")
    out = []
    for j, pair in enumerate(items):
        check_form(pair, "pairs", entry, where, trainer)
        try:
            checked = preference_pair(pair.prompt, pair.chosen, pair.rejected)
        except BadRecord as e:
            raise DataError(f"{where} pair {j}: {e.message} (loader {entry['loader']!r})") from None
        pair.source = entry["loader"]
        out.append(render_pair(checked, template, tokenizer, f"{where} pair {j}"))
        out[-1].meta = pair.meta
    return out


def render_pair(pair: PreferencePair, template: str, tokenizer, where: str) -> RenderedPair:
    """A checked pair as text (see the module doc)."""
    prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
    if isinstance(prompt, str):
        if template != "chat":
            return RenderedPair(prompt, chosen, rejected, chosen)
        # text with a chat template: the prompt is one user turn, each response one assistant turn
        prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    reference = chosen[0]["content"]
    if template != "chat":  # ftk's conversation format, exactly as a dailydialog/custom example renders
        text = conversation_example(prompt + chosen).prompt
        return RenderedPair(text, reference, rejected[0]["content"], reference)
    text = chat_text(tokenizer, prompt, where, generation_prompt=True)
    responses = []
    for resp in (chosen, rejected):
        full = chat_text(tokenizer, prompt + resp, where)
        if not full.startswith(text):
            raise DataError(f"{where}: {NOT_PREFIX} (the prompt with the generation prompt does not start the "
                            f"prompt with its response); use \"template\": \"default\"")
        responses.append(full[len(text):])
    return RenderedPair(text, responses[0], responses[1], reference)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(k for k in range(n) if a[k] != b[k])


def tokenize_pairs(pairs: list[RenderedPair], tokenizer, progress: bool | None = None,
                   desc: str = "tokenizing") -> TokenBlock:
    """Three sequences per pair k, untruncated: 3k the prompt (BOS first), 3k+1 chosen, 3k+2 rejected
    (each ending with EOS); mask 1 on the responses. See the module doc for where a response starts."""
    from tqdm.auto import tqdm

    backend, specials = fast_backend(tokenizer)
    bos, eos = specials[:2]
    seqs: list[list[int]] = []
    step = 2048
    bar = tqdm(total=len(pairs), desc=desc, unit="pair", disable=(None if progress is None else not progress),
               leave=False)
    for a in range(0, len(pairs), step):
        batch = pairs[a: a + step]
        texts = [t for p in batch for t in (p.prompt, p.prompt + p.chosen, p.prompt + p.rejected)]
        encs = backend.encode_batch(texts, add_special_tokens=False)
        for k, p in enumerate(batch):
            prompt, with_c, with_r = (e.ids for e in encs[3 * k: 3 * k + 3])
            n = min(_common_prefix(prompt, with_c), _common_prefix(prompt, with_r))
            seqs.append(([bos] if adds_bos(p.prompt, specials) else []) + prompt[:n])
            for full, text in ((with_c, p.chosen), (with_r, p.rejected)):
                seqs.append(full[n:] + ([eos] if adds_eos(text, specials) else []))
        bar.update(len(batch))
    bar.close()
    lens = np.fromiter((len(x) for x in seqs), np.int64, len(seqs))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.fromiter((t for x in seqs for t in x), np.int32, int(lens.sum()))
    mask = np.repeat(np.tile(np.array([0, 1, 1], np.uint8), len(pairs)), lens)
    return TokenBlock(ids=ids, mask=mask, offsets=offsets)


@dataclass
class Cut:
    """Per pair: the tokens kept of the prompt (its end, BOS kept) and of each response (its start), and
    whether the pair was longer than max_length."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    too_long: np.ndarray


def cut_pairs(block: TokenBlock, max_length: int, max_prompt_length: int) -> Cut:
    """The truncation rule (module doc), for every pair of ``block`` at once."""
    lp, lc, lr = block.lengths.reshape(-1, 3).T
    too_long = lp + np.maximum(lc, lr) > max_length
    kp = np.where(too_long, np.minimum(lp, max_prompt_length), lp)
    room = max_length - kp
    return Cut(kp, np.where(too_long, np.minimum(lc, room), lc), np.where(too_long, np.minimum(lr, room), lr), too_long)


def pair_features(block: TokenBlock, cut: Cut, k: int, bos: int | None) -> dict:
    """Pair k as the trainer gets it: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (int lists), truncated."""
    o = block.offsets
    a, b = int(o[3 * k]), int(o[3 * k + 1])
    keep = int(cut.prompt[k])
    if keep >= b - a:
        prompt = block.ids[a:b].tolist()
    elif bos is not None and block.ids[a] == bos:  # the prompt loses its start, not its BOS
        prompt = [bos] + (block.ids[b - keep + 1: b].tolist() if keep > 1 else [])
    else:
        prompt = block.ids[b - keep: b].tolist()
    c0, r0 = int(o[3 * k + 1]), int(o[3 * k + 2])
    return {"prompt_ids": prompt, "chosen_ids": block.ids[c0: c0 + int(cut.chosen[k])].tolist(),
            "rejected_ids": block.ids[r0: r0 + int(cut.rejected[k])].tolist()}


def _rows_of(features: list[dict], names: list[str], max_length: int):
    """prompt + chosen of each pair as one row: the prompt (BOS included) masked, the response trained."""
    seqs = [f["prompt_ids"] + f["chosen_ids"] for f in features]
    lens = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    blk = TokenBlock(ids=np.fromiter((t for s in seqs for t in s), np.int32, int(lens.sum())),
                     mask=np.fromiter((m for f in features for m in ([0] * len(f["prompt_ids"]) + [1] * len(f["chosen_ids"]))),
                                      np.uint8, int(lens.sum())),
                     offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    return build_rows([Ref(blk, j, n) for j, n in enumerate(names)], max_length, False, None)


def max_prompt_length(d: dict) -> int:
    """data.max_prompt_length (null: max_length // 2), which must leave room for the responses."""
    max_length = int(d["max_length"])
    mpl = d.get("max_prompt_length")
    mpl = max_length // 2 if mpl is None else int(mpl)
    if mpl >= max_length:
        raise DataError(f"data.max_prompt_length ({mpl}) must be below data.max_length ({max_length}): a "
                        f"truncated pair keeps at most that much prompt and the rest for its responses")
    return mpl


def prepare_pairs(recipe: dict, tokenizer, manager, progress: bool | None = None) -> PreparedData:
    """PreparedData of form "pairs" (``ftk.components.PreparedData``, ``DATA_FORMS``):

    - ``train``/``validation``: lists of ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (train mixed and
      shuffled as rows are);
    - ``validation_unpacked``: the validation pairs as rows ``{"input_ids": prompt + chosen, "labels": the
      prompt -100}``, with ``collator`` ftk's rows Collator, so perplexity is computed as for rows;
    - ``eval_pairs``: (rendered prompt, chosen response) of each validation pair;
    - ``stats``: like rows' (``form: "pairs"``; token counts are prompt + the longer response).

    Not streamed; the finished pairs are not kept in the prepared-rows cache (their tokenization is cached
    by content, so a second run re-reads and re-renders the records but does not tokenize them again)."""
    d = recipe["data"]
    trainer = trainer_name(recipe)
    unsupported = [f"data.{k}" for k, on in (("streaming", d.get("streaming")), ("train_on_inputs", d.get("train_on_inputs")),
                                            ("pad_to_max_length", d.get("pad_to_max_length"))) if on]
    if unsupported:
        raise DataError(f"{', '.join(unsupported)}: not available for preference pairs (trainer {trainer!r} trains "
                        f"on pairs, whose prompts are never trained and whose trainer pads them); set "
                        f"{' and '.join(unsupported)} to false")
    seed = data_seed(recipe)
    max_length, mpl = int(d["max_length"]), max_prompt_length(d)
    drop = d.get("truncation") == "drop"
    parts, declared, reusable = load_parts(
        recipe, tokenizer, manager, lambda items, entry, where: render_pairs(items, entry, tokenizer, where, trainer))
    cuts: dict[str, Cut] = {}
    fp_tok = tokenizer_fingerprint(tokenizer)
    for p in parts:
        p.digest = texts_digest((r.prompt, r.chosen, r.rejected) for r in p.examples)
        p.block, p.cache_hit = cached_block(
            d, [CACHE_VERSION, "pairs", p.digest, fp_tok], 3 * len(p.examples),
            lambda p=p: tokenize_pairs(p.examples, tokenizer, progress, desc=f"tokenizing {p.name}"))
        empty = np.flatnonzero(p.block.lengths.reshape(-1, 3)[:, 1:].min(axis=1) == 0)
        if len(empty):  # a chat template rendering a response as nothing (ftk's own EOS makes one token)
            raise DataError(f"data.datasets[{p.index}] ({p.name}): pair {_example_name(p.name, int(empty[0]), p.n_train)}"
                            f" has a response with no tokens after its prompt")
        cut = cuts[p.name] = cut_pairs(p.block, max_length, mpl)
        p.truncated = 0 if drop else int(cut.too_long.sum())
        p.dropped = {"too_long": int(cut.too_long.sum())} if drop else {}
        hold_out(p, ~cut.too_long if drop else np.ones(len(p.examples), bool), d, seed)
        if not len(p.train_idx):
            raise DataError(f"data.datasets[{p.index}] ({p.name}): every training pair is longer than max_length "
                            f"{max_length} and was dropped (data.truncation \"drop\"); raise data.max_length")
    rng = np.random.default_rng(seed)
    train_refs = _mix(parts, d["mixing"], d["balance_to"], rng)
    by_name = {p.name: p for p in parts}
    bos = tokenizer.bos_token_id

    def features(ref: Ref) -> dict:
        return pair_features(ref.block, cuts[ref.name.rsplit("#", 1)[0]], ref.idx, bos)

    train = [features(r) for r in train_refs]
    val_refs = [Ref(p.block, int(k), _example_name(p.name, int(k), p.n_train)) for p in parts for k in p.val_idx]
    validation = [features(r) for r in val_refs]
    eval_pairs = [(by_name[r.name.rsplit("#", 1)[0]].examples[r.idx].prompt,
                   by_name[r.name.rsplit("#", 1)[0]].examples[r.idx].reference) for r in val_refs]
    settings = _settings(d) | {"max_prompt_length": mpl, "form": "pairs"}
    fp = hashlib.sha256(json.dumps([[p.fingerprint, p.digest] for p in parts]
                                   + [fp_tok, seed, settings]).encode()).hexdigest()[:20]
    prepared = PreparedData(train=train, validation=validation, collator=Collator(tokenizer.pad_token_id),
                            eval_pairs=eval_pairs, validation_unpacked=_rows_of(validation, [r.name for r in val_refs],
                                                                                max_length),
                            stats=_stats(recipe, parts, train_refs, train, validation, mpl), fingerprint=fp,
                            source_files=file_states(declared), reusable=reusable, form="pairs")
    prepared.examples = {p.name: p.examples for p in parts}  # rendered pairs, for preview
    prepared.train_refs = train_refs
    return prepared


def _stats(recipe: dict, parts: list[_Part], train_refs: list[Ref], train: list[dict], validation: list[dict],
           mpl: int) -> dict:
    d = recipe["data"]
    per, lens = [], []  # a pair's length is prompt + the longer response, as truncation counts it
    for p in parts:
        lp, lc, lr = p.block.lengths.reshape(-1, 3).T
        lens.append(lp + np.maximum(lc, lr))
        per.append(part_stats(p, d, lens[-1]) | {
            "prompt_tokens": _token_stats(lp), "response_tokens": _token_stats(np.concatenate([lc, lr]))})
    return {
        "form": "pairs",
        "datasets": per,
        "train": {"examples": len(train), "per_dataset": per_dataset(train_refs),
                  "tokens": sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in train)},
        "validation": {"examples": len(validation)},
        "tokens": _token_stats(np.concatenate(lens)),
        "truncated": sum(p.truncated for p in parts),
        "dropped": {"too_long": sum(p.dropped.get("too_long", 0) for p in parts)},
        "skipped": _sum_counts(p.skipped for p in parts),
        "settings": {"form": "pairs", "max_length": int(d["max_length"]), "max_prompt_length": mpl,
                     "truncation": d.get("truncation"), "packing": False, "mixing": d["mixing"],
                     "batch_size": int(recipe["training"]["batch_size"])},
    }

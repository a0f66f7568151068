"""Tokenization: examples -> token ids and a trainable-label mask per token, stored flat.

Labels come from our own masks (segment char spans -> tokens via the fast tokenizer's offsets),
never from pad ids, so the EOS a model must learn to emit is never masked. Examples that come already
tokenized (``Example.token_ids``) are taken as they are, trained where their labels say. numpy is the
only heavy import at module level.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ftk.components import Example, Segment
from ftk.errors import DataError, FtkError

IGNORE = -100  # torch cross_entropy's ignore_index: no loss on a position with this label


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


def chat_text(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    """``messages`` rendered with the tokenizer's chat template (DataError naming ``where`` when the
    tokenizer has none or the template fails)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: template 'chat' needs a tokenizer with a chat template; this one has none "
                        f"(use \"template\": \"default\")")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja errors from the template itself
        raise DataError(f"{where}: the tokenizer's chat template failed: {e}") from None


NOT_PREFIX = "the chat template does not render conversations prefix by prefix"


def render_chat(tokenizer, messages: list[dict], where: str) -> Example:
    """Render with the tokenizer's chat template; only assistant turns are trainable.

    Each assistant turn's span is found by rendering the conversation up to it (with the generation
    prompt) and up to its end: the difference is exactly what the model must produce."""
    full = chat_text(tokenizer, messages, where)
    segs, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = chat_text(tokenizer, messages[:k], where, True), chat_text(tokenizer, messages[: k + 1], where)
        start, end = len(before), len(through)
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: {NOT_PREFIX}, so assistant turns cannot be located; use "
                            f"\"template\": \"default\"")
        if start > pos:
            segs.append(Segment(full[pos:start], False))
        segs.append(Segment(full[start:end], True))
        pos = end
    if pos < len(full):
        segs.append(Segment(full[pos:], False))
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return Example(segments=segs, prompt=chat_text(tokenizer, messages[:last], where, True),
                   reference=messages[last]["content"], messages=messages)


def _token_range(enc, s: int, e: int) -> tuple[int, int] | None:
    """Tokens overlapping chars [s, e) (a token crossing into the span counts as inside)."""
    first = next((t for c in range(s, e) if (t := enc.char_to_token(c)) is not None), None)
    if first is None:
        return None
    last = next((t for c in range(e - 1, s - 1, -1) if (t := enc.char_to_token(c)) is not None), first)
    return first, last


def fast_backend(tokenizer) -> tuple:
    """(the Rust tokenizer, (bos id, eos id, bos text, eos text)), or DataError: ftk tokenizes with the fast
    tokenizer (exact offsets) and ends every sequence with EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{type(tokenizer).__name__}: ftk needs a fast (Rust) tokenizer for exact label masks")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{type(tokenizer).__name__}: the tokenizer has no EOS token, so examples cannot end")
    return backend, (bos, eos, tokenizer.bos_token or "\0", tokenizer.eos_token or "\0")


def adds_bos(text: str, specials: tuple) -> bool:
    """Whether ftk puts BOS before ``text``: the tokenizer has one and the text (a chat template's) does
    not already start with it."""
    return specials[0] is not None and not text.startswith(specials[2])


def adds_eos(text: str, specials: tuple) -> bool:
    """Whether ftk appends EOS after ``text``: unless the text (a chat template's) already ends with it."""
    return not text.rstrip().endswith(specials[3])


# A reply's start, for where a prompt's tokens end: with LLaMA's tokenizer (and byte-level BPE) the space
# before a reply's first word is part of that word's token, so the prompt ends before the space.
REPLY_PROBE = "the"


def prompt_token_ids(tokenizer, text: str) -> tuple[list[int], str]:
    """(the ids the data pipeline gives ``text`` before a reply's tokens start, the end of ``text`` those ids
    leave out: the space that is tokenized with the reply's first word, or "")."""
    backend, specials = fast_backend(tokenizer)
    enc = backend.encode(text + REPLY_PROBE, add_special_tokens=False)
    n = 0
    while n < len(enc.ids) and enc.offsets[n][1] <= len(text):
        n += 1
    end = enc.offsets[n - 1][1] if n else 0
    ids = ([specials[0]] if adds_bos(text, specials) else []) + enc.ids[:n]
    if not ids:
        raise FtkError(f"the prompt {text[:40]!r} tokenizes to nothing")
    return ids, text[end:]


def tokenize_examples(examples: list[Example], tokenizer, train_on_inputs: bool = False,
                      progress: bool | None = None, desc: str = "tokenizing") -> TokenBlock:
    """Tokenize once with the fast tokenizer, in batches: BOS + text + EOS, mask from segment spans.

    BOS/EOS are not added where the text already has them (chat templates); EOS is trainable. An
    already-tokenized example keeps its ids, trained where its labels are not -100 (all without labels;
    ``train_on_inputs`` does not change them)."""
    backend, specials = fast_backend(tokenizer)
    n = len(examples)
    chunks_ids, chunks_mask, lens = [], [], np.zeros(n, np.int64)
    from tqdm.auto import tqdm

    step = 4096
    bar = tqdm(total=n, desc=desc, unit="ex", disable=(None if progress is None else not progress), leave=False)
    for a in range(0, n, step):
        batch = examples[a: a + step]
        texts = [ex.text for ex in batch if ex.token_ids is None]
        encs = iter(backend.encode_batch(texts, add_special_tokens=False) if texts else ())
        for j, ex in enumerate(batch):
            if ex.token_ids is not None:  # already tokenized: as it is
                full = np.asarray(ex.token_ids, np.int32)
                mask = (np.ones(len(full), np.uint8) if ex.token_labels is None
                        else (np.asarray(ex.token_labels) != IGNORE).astype(np.uint8))
            else:
                full, mask = _text_tokens(ex, next(encs), train_on_inputs, specials)
            chunks_ids.append(full)
            chunks_mask.append(mask)
            lens[a + j] = len(full)
        bar.update(len(batch))
    bar.close()
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.concatenate(chunks_ids) if chunks_ids else np.zeros(0, np.int32)
    mask = np.concatenate(chunks_mask) if chunks_mask else np.zeros(0, np.uint8)
    if len(mask):
        mask[offsets[:-1][lens > 0]] = 0  # the first token never has a label (nothing predicts it)
    return TokenBlock(ids=ids, mask=mask, offsets=offsets)


def _text_tokens(ex: Example, enc, train_on_inputs: bool, specials: tuple) -> tuple[np.ndarray, np.ndarray]:
    """A text example's ids (BOS and EOS added unless the text has them) and mask, from its encoding."""
    bos, eos = specials[:2]
    text, ids = ex.text, enc.ids
    add_bos, add_eos = adds_bos(text, specials), adds_eos(text, specials)
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
    return np.asarray(full, np.int32), np.concatenate(m)

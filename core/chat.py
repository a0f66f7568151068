"""`ftk chat`: a conversation with a tuned model in the prompt format its run trained on.

The format is never written down twice. For a run, it is read off the run's own data: the loader's examples
(rendered text plus their ``messages``) show which text stands before each turn and between turns, so the
chat renders a conversation with the same pieces, whatever loader made them (built-in or a plugin's). A
dataset entry with ``"template": "chat"`` is rendered by the tokenizer's chat template, as the data
pipeline renders it (``ftk.tokens.chat_text``). Without a run: the tokenizer's chat template when it has
one, else ftk's conversation format (``ftk.loaderkit.conversation_example``).

A prompt's token ids are the data pipeline's (``ftk.tokens``: BOS unless the text has it, then the fast
tokenizer's ids of the text) up to where a reply's tokens start, so the model continues exactly as it was
trained to. A reply stops at EOS or at the format's turn boundary (the text that starts the next turn) and
is trimmed there. Decoding follows ``ftk.generation.resolve_decoding``; see docs/chat.md. Only the standard
library is imported at module level.
"""
from __future__ import annotations

import itertools
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ftk.errors import FtkError
from ftk.tokens import prompt_token_ids as prompt_ids

SAMPLE = 200  # examples of a dataset entry read to tell its format
# contents of the conversation rendered to learn ftk's own format and a chat template's turn end
_MARKS = ("@0@", "@1@", "@2@", "@3@", "@4@")


@dataclass
class ChatFormat:
    """How a conversation becomes the prompt text. ``pieces`` (None: the tokenizer's chat template) holds
    the text before the first message by its role, ``("lead", role)``, and the text between two messages
    by their roles, ``("gap", role, next_role)``; the prompt for a reply ends with the gap before an
    assistant message. ``stops``: text that ends a reply (the start of the next turn)."""

    source: str
    pieces: dict[tuple, str] | None = None
    stops: tuple[str, ...] = ()

    @property
    def template(self) -> bool:
        return self.pieces is None

    @property
    def multi_turn(self) -> bool:
        """Whether the format has text for a user turn after an assistant turn (else each message stands alone)."""
        return self.template or ("gap", "assistant", "user") in self.pieces

    def missing(self, roles: list[str]) -> str | None:
        """What the format lacks to render messages of these roles in this order (None: nothing)."""
        if self.template:
            return None
        keys = [("lead", roles[0])] + [("gap", a, b) for a, b in zip(roles, roles[1:] + ["assistant"])]
        for k in keys:
            if k not in self.pieces:
                return (f"no {k[1]} turn at the start" if k[0] == "lead" else f"no {k[2]} turn after a {k[1]} turn")
        return None

    def text(self, tokenizer, messages: list[dict]) -> str:
        """The prompt text for the next assistant reply to ``messages``."""
        if self.template:
            from ftk.tokens import chat_text

            return chat_text(tokenizer, messages, "chat", generation_prompt=True)
        lack = self.missing([m["role"] for m in messages])
        if lack:
            raise FtkError(f"chat: the format of {self.source} has {lack}")
        out = [self.pieces[("lead", messages[0]["role"])]]
        for m, nxt in zip(messages, messages[1:] + [{"role": "assistant"}]):
            out += [m["content"], self.pieces[("gap", m["role"], nxt["role"])]]
        return "".join(out)

    def describe(self) -> str:
        if self.template:
            return f"{self.source}: the tokenizer's chat template"
        turns = "multi-turn" if self.multi_turn else "single-turn: each message is answered on its own"
        shown = [self.pieces[k] for k in (("lead", "user"), ("gap", "user", "assistant")) if k in self.pieces]
        return f"{self.source}: {' ... '.join(repr(s) for s in shown)} ({turns})"


# -- telling a format from rendered examples -----------------------------------------------------------
def pieces_of(messages: list[dict], text: str) -> dict[tuple, str] | None:
    """The text around each message of ``text`` (which renders ``messages`` in order), or None when a
    message's content is not found in it as it is (an Alpaca record with an input, say)."""
    out, pos, prev = {}, 0, None
    for m in messages:
        i = text.find(m["content"], pos)
        if i < 0 or not m["content"]:
            return None
        out[("lead", m["role"]) if prev is None else ("gap", prev, m["role"])] = text[pos:i]
        pos, prev = i + len(m["content"]), m["role"]
    return out


def _stops(pieces: dict[tuple, str]) -> tuple[str, ...]:
    """The text that starts a turn after a reply; a single-turn format's text before a user message."""
    after = [v.rstrip() for (kind, *roles), v in pieces.items() if kind == "gap" and roles[0] == "assistant"]
    if not after:
        after = [v.strip() for (kind, *roles), v in pieces.items() if kind == "lead" and roles[0] in ("system", "user")]
    return tuple(sorted({s for s in after if s}))


def infer_format(conversations: Iterable[tuple[list[dict], str]], source: str) -> ChatFormat | None:
    """The format of (messages, rendered text) pairs: each piece is the one most examples agree on (a
    message whose content also stands inside a label cannot throw it off). None when no conversation
    shows a user turn followed by an assistant turn."""
    votes: dict[tuple, Counter] = defaultdict(Counter)
    for messages, text in itertools.islice(conversations, SAMPLE):
        for k, v in (pieces_of(messages, text) or {}).items():
            votes[k][v] += 1
    pieces = {k: c.most_common(1)[0][0] for k, c in votes.items()}
    if ("gap", "user", "assistant") not in pieces:
        return None
    return ChatFormat(source, pieces, _stops(pieces))


def conversation_format() -> ChatFormat:
    """ftk's own conversation format (``conversation_example``'s defaults), read off its rendering."""
    from ftk.loaderkit import conversation_example

    def msgs(roles):
        return [{"role": r, "content": c} for r, c in zip(roles, _MARKS)]

    samples = [msgs(["user", "assistant", "user", "assistant"]), msgs(["system", "user", "assistant"])]
    return infer_format(((m, conversation_example(m).text) for m in samples), "ftk's conversation format")


def template_format(tokenizer, source: str = "the tokenizer's chat template") -> ChatFormat:
    """The tokenizer's chat template; its reply ends where the template closes an assistant turn."""
    from ftk.tokens import chat_text

    user = [{"role": "user", "content": _MARKS[0]}]
    prompt = chat_text(tokenizer, user, "chat", generation_prompt=True)
    full = chat_text(tokenizer, user + [{"role": "assistant", "content": _MARKS[1]}], "chat")
    i = full.find(_MARKS[1], len(prompt) if full.startswith(prompt) else 0)
    end = full[i + len(_MARKS[1]):].strip() if i >= 0 else ""
    return ChatFormat(source, None, (end,) if end else ())


def _conversations(items, tokenizer, where: str):
    """(messages, text) of a loader's examples or conversational preference pairs, as the pipeline renders them."""
    from ftk.components import Example, PreferencePair
    from ftk.loaderkit import BadRecord, preference_pair

    for j, item in enumerate(items):
        if isinstance(item, Example):
            if item.messages and item.token_ids is None:
                yield item.messages, item.text
        elif isinstance(item, PreferencePair):
            from ftk.pairs import render_pair

            try:
                pair = preference_pair(item.prompt, item.chosen, item.rejected)
            except BadRecord:
                continue
            if isinstance(pair.prompt, list):
                shown = render_pair(pair, "default", tokenizer, f"{where} pair {j}")
                yield pair.prompt + pair.chosen, shown.prompt + shown.chosen


def entry_format(i: int, recipe: dict, manager, tokenizer) -> ChatFormat | None:
    """The format data.datasets[i] trained on (None when its examples are not conversations)."""
    entry = recipe["data"]["datasets"][i]
    where = f"data.datasets[{i}] ({entry['loader']})"
    if entry.get("template") == "chat":
        return template_format(tokenizer, where)
    from ftk.data import load_entry

    try:
        loaded = load_entry(i, entry, recipe, tokenizer, manager)
    except FtkError as e:
        raise FtkError(f"chat: cannot read {where} to tell the run's prompt format: {e.messages[0]} "
                       f"(--format conversation or --format template chats without it)") from None
    return infer_format(_conversations(loaded.train, tokenizer, where), where)


def run_format(recipe: dict, manager, tokenizer, dataset: int | None = None) -> ChatFormat:
    """The run's format: data.datasets[dataset], else the first entry of conversations with several turns,
    else the first entry whose format can be told."""
    entries = recipe["data"]["datasets"]
    if dataset is not None and not 0 <= dataset < len(entries):
        raise FtkError(f"--dataset: {dataset} is not an entry of the run's data.datasets (0..{len(entries) - 1})")
    first = None
    for i in [dataset] if dataset is not None else range(len(entries)):
        fmt = entry_format(i, recipe, manager, tokenizer)
        if fmt is not None and fmt.multi_turn:
            return fmt
        first = first or fmt
    if first is None:
        which = f"data.datasets[{dataset}]" if dataset is not None else "the run's data"
        raise FtkError(f"chat: cannot tell the prompt format from {which}: no example is a conversation with a "
                       f"user and an assistant turn (--format conversation or --format template)")
    return first


# -- prompt token ids ----------------------------------------------------------------------------------
def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when it is one token (a chat template's end-of-turn marker, say), else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == text else None


# -- the reply as it is generated ----------------------------------------------------------------------
class ReplyText:
    """A reply's text from its new token ids: cut at EOS (or a stop text that is one token), decoded without
    special tokens after the prompt's last token (so a leading space decodes as it would in context), the
    prompt's left-out end dropped, leading white space dropped, cut at the first stop text. ``shown`` is
    what may be printed while tokens still come: trailing white space and the start of a possible stop text
    are held back."""

    def __init__(self, tokenizer, anchor: int, pending: str, stops: tuple[str, ...], eos: set):
        self.tok, self.anchor, self.pending, self.stops = tokenizer, anchor, pending, stops
        self.eos = set(eos) | {i for s in stops if (i := single_token(tokenizer, s)) is not None}
        self.text, self.done = "", False
        self._anchor_text = tokenizer.decode([anchor], skip_special_tokens=True)

    def update(self, new_ids: list[int]) -> bool:
        """Take the new ids so far; True when the reply is complete (EOS or a stop text)."""
        cut = next((k for k, t in enumerate(new_ids) if t in self.eos), None)
        ids = new_ids if cut is None else new_ids[:cut]
        text = self.tok.decode([self.anchor] + ids, skip_special_tokens=True)[len(self._anchor_text):]
        if self.pending and text.startswith(self.pending):
            text = text[len(self.pending):]
        text = text.lstrip()
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        self.done = cut is not None or bool(hits)
        self.text = text[:min(hits)] if hits else text
        return self.done

    @property
    def shown(self) -> str:
        t = self.text
        if not self.done:  # hold back what may be the start of a stop text, and a half-decoded character
            hold = max((k for s in self.stops for k in range(1, len(s) + 1) if t.endswith(s[:k])), default=0)
            t = t[:len(t) - hold].rstrip("\ufffd")
        return t.rstrip()

    def result(self) -> str:
        return self.text.strip()


def generate_reply(model, tokenizer, ids: list[int], pending: str, fmt: ChatFormat, gen_kwargs: dict,
                   write: Callable[[str], None]) -> tuple[str, bool]:
    """Generate and print one reply; (its text, whether Ctrl-C stopped it). Streams with one beam (the
    reply is checked for EOS and the turn boundary at every token, generation stops there); beam search
    cannot stream, so its reply is printed whole at the end, trimmed the same way."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    eos = gen_kwargs["eos_token_id"]
    reply = ReplyText(tokenizer, ids[-1], pending, fmt.stops, set(eos if isinstance(eos, (list, tuple)) else [eos]))
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    printed = ""

    def show():
        nonlocal printed
        now = reply.shown
        if now.startswith(printed) and len(now) > len(printed):
            write(now[len(printed):])
            printed = now

    class Stream(StoppingCriteria):  # called with every new token, before generate's streamer would be
        def __call__(self, seqs, scores, **kw):
            done = reply.update(seqs[0, len(ids):].tolist())
            show()
            return torch.full((seqs.shape[0],), done, dtype=torch.bool, device=seqs.device)

    beams = gen_kwargs.get("num_beams", 1) > 1
    extra = {} if beams else {"stopping_criteria": StoppingCriteriaList([Stream()])}
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs,
                                 **extra)
    except KeyboardInterrupt:
        reply.done = True
        show()
        return reply.result(), True
    reply.update(out[0, len(ids):].tolist())
    reply.done = True
    show()
    return reply.result(), False


# -- the conversation ----------------------------------------------------------------------------------
@dataclass
class Session:
    """The conversation so far and the prompt for the next message. ``limit``: the model's context (prompt
    plus ``max_new`` new tokens must fit; the oldest exchanges are dropped to make room)."""

    fmt: ChatFormat
    tokenizer: Any
    system: str | None = None
    limit: int | None = None
    max_new: int = 256
    history: list[dict] = field(default_factory=list)
    dropped_once: bool = False

    def reset(self) -> None:
        self.history = []

    def _messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        past = self.history if self.fmt.multi_turn else []
        return head + past + [{"role": "user", "content": user}]

    def prompt(self, user: str, notify: Callable[[str], None]) -> tuple[list[int], str] | None:
        """(ids, the text they leave out) for ``user``'s message, or None (said through ``notify``) when the
        message alone does not fit the context."""
        while True:
            text = self.fmt.text(self.tokenizer, self._messages(user))
            ids, pending = prompt_ids(self.tokenizer, text)
            if not self.limit or len(ids) + self.max_new <= self.limit:
                return ids, pending
            if not self.history or not self.fmt.multi_turn:
                notify(f"(message not sent: {len(ids)} tokens of prompt leave no room for {self.max_new} new tokens "
                       f"in the model's context of {self.limit}; see --max-new-tokens)")
                return None
            if not self.dropped_once:
                notify(f"(the conversation no longer fits the model's context of {self.limit} tokens with "
                       f"{self.max_new} new ones: dropping the oldest turns from now on)")
                self.dropped_once = True
            self.history = self.history[2:]

    def add(self, user: str, reply: str) -> None:
        if self.fmt.multi_turn:
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


HELP = ("/reset  forget the conversation so far\n"
        "/exit   quit (also Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during a reply stops the reply)\n"
        "/help   this list")


def chat_loop(session: Session, reply_fn: Callable[[list[int], str, Callable[[str], None]], tuple[str, bool]],
              interactive: bool, stdin=None, stdout=None, stderr=None) -> None:
    """Read messages (one a line) and answer each. ``interactive``: a prompt, line editing and history on a
    terminal; otherwise stdout gets only the replies, one after each message, and notices go to stderr."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    def notify(s: str) -> None:
        (stdout if interactive else stderr).write(s + "\n")
        (stdout if interactive else stderr).flush()

    if interactive:
        try:
            import readline  # noqa: F401 - input() gets line editing and history
        except ImportError:  # pragma: no cover - e.g. Windows
            pass
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):
            if interactive:
                write("\n")
            return
        msg = line.rstrip("\r\n").strip()
        if not msg:
            continue
        word = msg.split()[0].lower()
        if word in ("/exit", "/quit"):
            return
        if word == "/reset":
            session.reset()
            notify("(history cleared)")
            continue
        if word == "/help":
            notify(HELP)
            continue
        if msg.startswith("/") and " " not in msg:
            notify(f"(unknown command {msg}; /help lists the commands)")
            continue
        prompt = session.prompt(msg, notify)
        if prompt is None:
            continue
        reply, stopped = reply_fn(*prompt, write)
        write("\n")
        if stopped:
            notify("(reply stopped)")
        if reply:  # an empty reply is not a turn the format knows: the message is left out of the history too
            session.add(msg, reply)


__all__ = ["ChatFormat", "Session", "ReplyText", "infer_format", "pieces_of", "conversation_format",
           "template_format", "entry_format", "run_format", "prompt_ids", "generate_reply", "chat_loop"]

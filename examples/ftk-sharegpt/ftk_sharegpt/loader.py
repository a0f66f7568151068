"""The ``sharegpt`` dataset loader: multi-turn conversations in ShareGPT or OpenAI-messages form.

Accepted records (JSON array file, or JSONL with one record a line)::

    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}   # ShareGPT
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   # OpenAI

ShareGPT speaker names are mapped to chat roles (human -> user, gpt -> assistant); passing them
through unmapped is a known bug in other tools that makes chat templates reject or mis-render the
conversation. Each example is rendered with a plain template, loss on the assistant turns only,
and also carries ``messages`` so a recipe's ``"template": "chat"`` renders it with the tokenizer's
own chat template instead.
"""
from __future__ import annotations

import json
from pathlib import Path

from ftk.components import Example, LoadedData, Segment
from ftk.errors import DataError

DESCRIPTION = "ShareGPT / OpenAI-messages conversations (JSON or JSONL), loss on assistant turns"

# Speaker names seen in public ShareGPT dumps, mapped to chat-template roles.
ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
}

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "format": "path",
                 "description": "JSON (array of records) or JSONL file, relative to the recipe."},
        "validation_path": {"type": ["string", "null"], "format": "path", "default": None,
                            "description": "Optional file with the validation conversations (same format)."},
        "format": {"enum": ["auto", "sharegpt", "openai"], "default": "auto",
                   "description": "auto: 'conversations' records are ShareGPT, 'messages' records OpenAI."},
        "template": {"enum": ["default", "chat"], "default": "default",
                     "description": "default: the plain template below; chat: the tokenizer's chat template."},
        "roles": {"type": "object", "default": {},
                  "additionalProperties": {"enum": ["user", "assistant", "system"]},
                  "description": "Extra speaker-name mappings, e.g. {\"customer\": \"user\", \"agent\": \"assistant\"}."},
        "system_prompt": {"type": ["string", "null"], "default": None,
                          "description": "System message for conversations that have none."},
        "user_prefix": {"type": "string", "default": "User: "},
        "assistant_prefix": {"type": "string", "default": "Assistant: "},
        "system_prefix": {"type": "string", "default": "System: "},
        "turn_separator": {"type": "string", "default": "\n"},
    },
}

_DEFAULTS = {k: v["default"] for k, v in SCHEMA["properties"].items() if "default" in v}


class _BadRecord(ValueError):
    """A record the loader cannot use; ``reason`` is the short key counted when skipping."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def load(options: dict, ctx) -> LoadedData:
    opts = {**_DEFAULTS, **options}
    base = Path(ctx.recipe_dir or ".")
    roles = {**ROLE_MAP, **{k.lower(): v for k, v in opts["roles"].items()}}
    skipped: dict[str, int] = {}
    files = [_resolve(opts["path"], base)]
    if opts.get("validation_path"):
        files.append(_resolve(opts["validation_path"], base))
    train = _load_file(files[0], opts, roles, ctx.on_error, skipped)
    validation = _load_file(files[1], opts, roles, ctx.on_error, skipped) if len(files) > 1 else None
    if not train:
        raise DataError(f"{opts['path']}: no usable conversations"
                        + (f" (skipped: {_fmt_counts(skipped)})" if skipped else ""))
    return LoadedData(train=train, validation=validation, skipped=skipped,
                      fingerprint=_fingerprint(opts, files))


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _fingerprint(opts: dict, files: list[Path]) -> str:
    """Changes when the options or the files' contents change (for ftk's data cache)."""
    import hashlib

    h = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


# -- reading ----------------------------------------------------------------------------------------
def _records(path: Path):
    """Yield (where, record index, record); ``where`` names the file and, for JSONL, the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        idx = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: record {idx}: JSON syntax error: {e.msg} (column {e.colno})") from None
            yield f"{path}:{lineno}", idx, rec
            idx += 1
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}") from None
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of conversation records, got {type(doc).__name__} "
                        f"(use a .jsonl file for one record a line)")
    for idx, rec in enumerate(doc):
        yield str(path), idx, rec


def _load_file(path: Path, opts: dict, roles: dict, on_error: str, skipped: dict) -> list[Example]:
    out = []
    for where, idx, rec in _records(path):
        try:
            messages = to_messages(rec, opts["format"], roles)
            out.append(render(messages, opts, meta={"file": str(path), "record": idx,
                                                    **({"id": rec["id"]} if "id" in rec else {})}))
        except _BadRecord as e:
            if on_error == "skip":
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            raise DataError(f"{where}: record {idx}: {e}") from None
    return out


# -- records -> messages ----------------------------------------------------------------------------
def to_messages(rec, fmt: str = "auto", roles: dict | None = None) -> list[dict]:
    """One record -> ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, checked.

    The result starts with an optional system message, then alternates user/assistant and ends
    with an assistant reply (a trailing unanswered user turn is dropped: it has nothing to learn).
    """
    roles = ROLE_MAP if roles is None else roles
    if not isinstance(rec, dict):
        raise _BadRecord("not an object", f"expected an object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = "sharegpt" if "conversations" in rec else "openai" if "messages" in rec else None
        if fmt is None:
            raise _BadRecord("no turns", f"has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI); "
                                         f"keys: {', '.join(sorted(rec)) or '(none)'}")
    list_key, who_key, text_key = (("conversations", "from", "value") if fmt == "sharegpt"
                                   else ("messages", "role", "content"))
    turns = rec.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise _BadRecord("no turns", f"'{list_key}' must be a non-empty list")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or who_key not in turn or text_key not in turn:
            raise _BadRecord("bad turn", f"{list_key}[{t}]: expected an object with '{who_key}' and '{text_key}'")
        who, text = turn[who_key], turn[text_key]
        if not isinstance(text, str):
            raise _BadRecord("bad turn", f"{list_key}[{t}].{text_key}: expected a string, got {type(text).__name__}")
        role = roles.get(str(who).lower())
        if role is None:
            raise _BadRecord("unknown role", f"{list_key}[{t}].{who_key}: unknown speaker {who!r}; known: "
                                             f"{', '.join(sorted(roles))} (map others with the 'roles' option)")
        messages.append({"role": role, "content": text})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for t, m in enumerate(body):
        want = "user" if t % 2 == 0 else "assistant"
        if m["role"] != want:
            pos = t + (len(messages) - len(body))
            raise _BadRecord("not alternating", f"{list_key}[{pos}]: expected a {want} turn, got {m['role']} "
                                                f"(turns must alternate user/assistant after an optional system turn)")
    if body and body[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("no assistant reply", "no assistant turn to train on")
    return messages


# -- messages -> example ----------------------------------------------------------------------------
def render(messages: list[dict], opts: dict | None = None, meta: dict | None = None) -> Example:
    """The plain template: prefixes and user/system text are masked, assistant replies are trained.

    ``prompt``/``reference`` (for generation metrics) are everything before the last reply, and
    that reply.
    """
    o = {**_DEFAULTS, **(opts or {})}
    sep = o["turn_separator"]
    if messages[0]["role"] != "system" and o["system_prompt"]:
        messages = [{"role": "system", "content": o["system_prompt"]}, *messages]
    segments: list[Segment] = []
    prefix = {"system": o["system_prefix"], "user": o["user_prefix"]}
    for m in messages:
        if m["role"] == "assistant":
            segments.append(Segment(o["assistant_prefix"], train=False))
            segments.append(Segment(m["content"] + sep, train=True))
        else:
            segments.append(Segment(prefix[m["role"]] + m["content"] + sep, train=False))
    last = max(i for i, s in enumerate(segments) if s.train)
    return Example(
        segments=_merge(segments),
        prompt="".join(s.text for s in segments[:last]),
        reference=messages[-1]["content"],
        messages=messages,
        meta=dict(meta or {}),
    )


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments with the same train flag (fewer, longer tokenization pieces)."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].train == s.train:
            out[-1] = Segment(out[-1].text + s.text, s.train)
        else:
            out.append(s)
    return out

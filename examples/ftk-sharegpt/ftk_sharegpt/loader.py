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

from pathlib import Path

from ftk.components import Example, LoadedData
from ftk.errors import DataError
from ftk.loaderkit import BadRecord, RecordPolicy, conversation_example, file_fingerprint, iter_records

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


def load(options: dict, ctx) -> LoadedData:
    opts = {**_DEFAULTS, **options}
    base = Path(ctx.recipe_dir or ".")
    roles = {**ROLE_MAP, **{k.lower(): v for k, v in opts["roles"].items()}}
    policy = RecordPolicy(ctx.on_error)  # on_error "raise": stop naming the record; "skip": count it
    files = [_resolve(opts["path"], base)]
    if opts.get("validation_path"):
        files.append(_resolve(opts["validation_path"], base))
    train = _load_file(files[0], opts, roles, policy)
    validation = _load_file(files[1], opts, roles, policy) if len(files) > 1 else None
    if not train:
        raise DataError(f"{opts['path']}: no usable conversations"
                        + (f" (skipped: {_fmt_counts(policy.skipped)})" if policy.skipped else ""))
    # changes when the files or the options change (for ftk's data cache)
    return LoadedData(train=train, validation=validation, skipped=policy.skipped,
                      fingerprint=f"sharegpt:{file_fingerprint(*files, options=opts)}")


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _load_file(path: Path, opts: dict, roles: dict, policy: RecordPolicy) -> list[Example]:
    """Records read by the kit (``where`` is ``file: record i`` for JSON, ``file:line`` for JSONL)."""
    fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "json"
    out = []
    for idx, (where, rec) in enumerate(iter_records(str(path), fmt, policy)):
        try:
            messages = to_messages(rec, opts["format"], roles)
            out.append(render(messages, opts, meta={"file": str(path), "record": idx,
                                                    **({"id": rec["id"]} if "id" in rec else {})}))
        except BadRecord as e:
            policy.bad(where, e)
    return out


# -- records -> messages ----------------------------------------------------------------------------
def to_messages(rec, fmt: str = "auto", roles: dict | None = None) -> list[dict]:
    """One record -> ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, checked.

    The result starts with an optional system message, then alternates user/assistant and ends
    with an assistant reply (a trailing unanswered user turn is dropped: it has nothing to learn).
    """
    roles = ROLE_MAP if roles is None else roles
    if not isinstance(rec, dict):
        raise BadRecord("not an object", f"expected an object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = "sharegpt" if "conversations" in rec else "openai" if "messages" in rec else None
        if fmt is None:
            raise BadRecord("no turns", f"has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI); "
                                         f"keys: {', '.join(sorted(rec)) or '(none)'}")
    list_key, who_key, text_key = (("conversations", "from", "value") if fmt == "sharegpt"
                                   else ("messages", "role", "content"))
    turns = rec.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord("no turns", f"'{list_key}' must be a non-empty list")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or who_key not in turn or text_key not in turn:
            raise BadRecord("bad turn", f"{list_key}[{t}]: expected an object with '{who_key}' and '{text_key}'")
        who, text = turn[who_key], turn[text_key]
        if not isinstance(text, str):
            raise BadRecord("bad turn", f"{list_key}[{t}].{text_key}: expected a string, got {type(text).__name__}")
        role = roles.get(str(who).lower())
        if role is None:
            raise BadRecord("unknown role", f"{list_key}[{t}].{who_key}: unknown speaker {who!r}; known: "
                                             f"{', '.join(sorted(roles))} (map others with the 'roles' option)")
        messages.append({"role": role, "content": text})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for t, m in enumerate(body):
        want = "user" if t % 2 == 0 else "assistant"
        if m["role"] != want:
            pos = t + (len(messages) - len(body))
            raise BadRecord("not alternating", f"{list_key}[{pos}]: expected a {want} turn, got {m['role']} "
                                                f"(turns must alternate user/assistant after an optional system turn)")
    if body and body[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant reply", "no assistant turn to train on")
    return messages


# -- messages -> example ----------------------------------------------------------------------------
def render(messages: list[dict], opts: dict | None = None, meta: dict | None = None) -> Example:
    """The plain template: prefixes and user/system text are masked, assistant replies are trained.

    ``prompt``/``reference`` (for generation metrics) are everything before the last reply, and
    that reply.
    """
    o = {**_DEFAULTS, **(opts or {})}
    if messages[0]["role"] != "system" and o["system_prompt"]:
        messages = [{"role": "system", "content": o["system_prompt"]}, *messages]
    prefixes = {"system": o["system_prefix"], "user": o["user_prefix"], "assistant": o["assistant_prefix"]}
    ex = conversation_example(messages, prefixes=prefixes, separator=o["turn_separator"], final_separator=True)
    ex.meta = dict(meta or {})
    return ex

"""The loader kit: the public helpers ftk's own dataset loaders are written with.

Everything a loader needs besides the contracts in :mod:`ftk.components`: reading records from
JSON/JSONL/CSV/TSV/Parquet files with ``file:line`` / ``file: record i`` locations, the bad-record
policy (``on_error``: stop naming the record, or skip and count by reason), fingerprints for the data
cache, prompt templates (Alpaca and ``{output}`` format strings), conversation rendering, examples
that come already tokenized (``tokenized_example``) and preference pairs (``preference_pair``).
The built-in loaders (``alpaca``, ``custom``, ``dailydialog``) import nothing else from ftk, so a
third party can write any of them again. Documented in ``docs/plugins/loaderkit.md``; part of the
versioned plugin surface (``docs/plugins/versions.md``).

Only the standard library is imported here (``datasets`` / ``pyarrow`` load inside the functions
that need them), so a plugin module may import this at module level.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ftk.components import DataContext, Example, LoadedData, PreferencePair, Segment
from ftk.errors import DataError

__all__ = [
    "ALPACA_TEMPLATE", "ALPACA_TEMPLATE_NO_INPUT", "DEFAULT_SPEAKERS", "FILE_OPTIONS", "ROLES_OPTION",
    "BadRecord", "RecordPolicy",
    "check_path", "decode_utf8", "read_text", "detect_format", "iter_records", "field_str",
    "file_fingerprint",
    "split_template", "instruction_example", "merge_segments", "conversation_example", "check_messages",
    "tokenized_example", "example_from_row", "loader_from_class", "load_hub", "preference_pair",
]

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n{output}"
DEFAULT_SPEAKERS = ("User", "Assistant")
# JSON-Schema properties for a loader's options (its SCHEMA's "properties": {**FILE_OPTIONS, ...}):
# one local data file read with iter_records, an optional validation file, the format
FILE_OPTIONS = {
    "path": {"type": "string", "minLength": 1, "format": "path",
             "description": "The data file (relative to the recipe)."},
    "validation_path": {"type": ["string", "null"], "format": "path", "default": None,
                        "description": "Optional file holding the validation split (same format and mapping)."},
    "format": {"enum": ["auto", "json", "jsonl", "csv", "tsv", "parquet"], "default": "auto",
               "description": "File format; auto = from the extension."},
}
# your role values -> system/user/assistant (the "roles" option of a loader of conversations)
ROLES_OPTION = {"type": "object", "additionalProperties": {"enum": ["system", "user", "assistant"]},
                "default": {}, "description": "Map your role values (e.g. human, gpt) to system/user/assistant."}
_IGNORE = -100  # a label that is not trained (ftk.tokens.IGNORE, not imported: that module needs numpy)
_TEXT_FIELDS = ("instruction", "prompt", "messages", "text")  # a row with any of these is formatted by ftk


# == files, records, bad-record policy ============================================================
class BadRecord(Exception):
    """Raised by record parsers; ``reason`` is the short key counted when on_error is 'skip'."""

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(message)


class RecordPolicy:
    """on_error 'raise': a bad record stops with ``where: problem``; 'skip': it is counted by reason."""

    def __init__(self, on_error: str = "raise"):
        self.on_error = on_error or "raise"
        self.skipped: dict[str, int] = {}

    def bad(self, where: str, err: BadRecord) -> None:
        if self.on_error == "skip":
            self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
            return
        raise DataError(f"{where}: {err.message}")


def check_path(path: str, what: str = "data file") -> Path:
    """``path`` as a Path, or DataError ``<path>: <what> not found``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: {what} not found")
    return p


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 (a BOM is dropped) bytes as text, or DataError ``<where>:<line>: not UTF-8 text (byte n)``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{where}:{line}: not UTF-8 text (byte {e.start})") from None


def read_text(path: str | Path) -> str:
    """A file's text (UTF-8), or DataError naming the file: not found, a folder, unreadable, not UTF-8."""
    p = check_path(str(path))
    if p.is_dir():
        raise DataError(f"{p}: is a folder, expected a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror}") from None
    return decode_utf8(data, str(p))


def file_fingerprint(*paths: str | Path, options: Any = None) -> str:
    """20 hex digits that change when any file's name or content changes (for
    ``LoadedData.fingerprint``). ``options``, when given, is hashed too (as sorted JSON): pass the
    loader options that change the examples made from the same files."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    if options is not None:
        h.update(b"\0options\0" + json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def detect_format(path: str, fmt: str | None = None) -> str:
    """``fmt`` unless it is None/"auto"; else json/jsonl/csv/tsv/parquet from the file's extension."""
    if fmt and fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    kinds = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in kinds:
        raise DataError(f"{path}: cannot tell the file format from {suffix or 'no extension'!r}; "
                        f"set \"format\" to one of json, jsonl, csv, tsv, parquet")
    return kinds[suffix]


def iter_records(path: str, fmt: str | None, policy: RecordPolicy) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) from a JSON array, JSONL, CSV/TSV or Parquet file.

    ``where`` names the file and the record index (JSON, Parquet) or line (JSONL, CSV). A JSONL line
    that does not parse goes through ``policy`` like any other bad record.
    """
    fmt = detect_format(path, fmt)
    p = check_path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder, expected a {fmt} file")
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - any pyarrow failure means the file is not usable
            raise DataError(f"{path}: not a readable Parquet file: {str(e).splitlines()[0]}") from None
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}: record {i}", rec
        return
    text = read_text(p)
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (one object per line? use a .jsonl file or \"format\": \"jsonl\")" if "Extra data" in e.msg else ""
            raise DataError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}{hint}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) == 1:
                data = data[lists[0]]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}: record {i}", rec
    elif fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                policy.bad(f"{path}:{n}", BadRecord("invalid_json", f"line does not parse as JSON: {e.msg}"))
                continue
            except RecursionError:
                policy.bad(f"{path}:{n}", BadRecord("invalid_json", "line is JSON nested too deeply to read"))
                continue
            yield f"{path}:{n}", rec
    elif fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty {fmt.upper()} file (no header row)")
        try:
            for rec in reader:
                yield f"{path}:{reader.line_num}", rec
        except csv.Error as e:  # e.g. a field over csv.field_size_limit()
            raise DataError(f"{path}:{reader.reader.line_num}: not valid {fmt.upper()}: {e}") from None
    else:
        raise DataError(f"{path}: unknown format {fmt!r}")


def field_str(rec: Any, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """The string at ``rec[key]``, or BadRecord saying what is wrong with it."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", f"expected an object with fields, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        if required:
            raise BadRecord(f"missing_{key}", f"missing field {key!r}")
        return ""
    val = rec[key]
    if not isinstance(val, str):
        raise BadRecord(f"non_string_{key}", f"field {key!r} must be a string, got {type(val).__name__}")
    if required and not allow_empty and not val.strip():
        raise BadRecord(f"empty_{key}", f"field {key!r} is empty")
    return val


# == prompt formats ===============================================================================
@functools.lru_cache(maxsize=64)
def split_template(template: str) -> tuple[str, str]:
    """Split a template at ``{output}``: the part before is the prompt, the rest is trained.

    The halves are rebuilt from the parsed template, so ``{output!s}``/``{output:>5}`` and escaped
    braces (``{{output}}``) split where the field really is."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # e.g. a lone '{'
        raise DataError(f"template {template!r}: {e}") from None
    if [f for _, f, _, _ in parsed].count("output") != 1:
        raise DataError(f"template {template!r}: must contain {{output}} exactly once (where the response goes)")
    halves: tuple[list[str], list[str]] = ([], [])
    side = 0
    for literal, name, spec, conv in parsed:
        halves[side].append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if name == "output":
            side = 1
        halves[side].append("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}")
    return "".join(halves[0]), "".join(halves[1])


def instruction_example(fields: dict, template: str | None = None) -> Example:
    """Alpaca-style example. ``template`` None/"default"/"chat": the Alpaca format (Input block left
    out when input is empty); otherwise a format string over the record's fields with ``{output}``."""
    instruction, inp, output = fields["instruction"], fields.get("input") or "", fields["output"]
    if template in (None, "default", "chat"):
        template = ALPACA_TEMPLATE if inp.strip() else ALPACA_TEMPLATE_NO_INPUT
    head, tail = split_template(template)
    values = {**fields, "input": inp}
    try:
        if template is ALPACA_TEMPLATE or template is ALPACA_TEMPLATE_NO_INPUT:  # fast path, same text
            prompt = (f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{inp}\n\n" if inp.strip() else "")
                      + "### Response:\n")
            response = output
        else:
            prompt, response = head.format_map(values), tail.format_map(values)
    except KeyError as e:
        raise BadRecord("template_field", f"template uses field {e.args[0]!r} that the record does not have") from None
    except (ValueError, IndexError) as e:
        raise DataError(f"template {template!r}: {e}") from None
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    return Example(segments=[Segment(prompt, False), Segment(response, True)], prompt=prompt, reference=output,
                   messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def merge_segments(segments: Iterable[Segment]) -> list[Segment]:
    """Join neighbouring segments with the same ``train`` flag (same text, fewer and longer pieces to
    tokenize). The segments passed in are not changed."""
    merged: list[Segment] = []
    for s in segments:
        if merged and merged[-1].train == s.train:
            merged[-1] = Segment(merged[-1].text + s.text, s.train)
        else:
            merged.append(s)
    return merged


def conversation_example(messages: list[dict], speakers: dict | None = None, *, prefixes: dict | None = None,
                         separator: str = "\n", final_separator: bool = False) -> Example:
    """A conversation rendered as ``Speaker: text`` lines; assistant turns (and the newline ending
    them) are trained, the speaker labels and other turns are not. The eval pair is everything
    before the last assistant turn -> that turn.

    ``speakers`` renames roles (``{"user": "Human"}`` -> ``Human: ``); ``prefixes`` gives a role's
    whole prefix instead (``{"user": "### Q: "}``). ``separator`` ends each turn but the last (the
    last too with ``final_separator``). BadRecord ``no_assistant_turn`` when there is nothing to train."""
    names = {"system": "System", "user": DEFAULT_SPEAKERS[0], "assistant": DEFAULT_SPEAKERS[1], **(speakers or {})}
    segs: list[Segment] = []
    last_prompt = last_ref = None
    for k, m in enumerate(messages):
        label = prefixes[m["role"]] if prefixes and m["role"] in prefixes else f"{names[m['role']]}: "
        sep = separator if final_separator or k < len(messages) - 1 else ""
        if m["role"] == "assistant":
            segs.append(Segment(label, False))
            last_prompt, last_ref = "".join(s.text for s in segs), m["content"]
            segs.append(Segment(m["content"] + sep, True))
        else:
            segs.append(Segment(label + m["content"] + sep, False))
    if last_ref is None:
        raise BadRecord("no_assistant_turn", "conversation has no assistant turn to train on")
    # merge neighbours with the same flag so the example stays small
    return Example(segments=merge_segments(segs), prompt=last_prompt, reference=last_ref, messages=list(messages))


def _turns(msgs: Any, what: str = "") -> list[dict]:
    """Messages checked one by one (roles system/user/assistant, non-empty string contents) and copied
    with only ``role`` and ``content``, or BadRecord; ``what`` ("field 'prompt': ") prefixes messages."""
    if not isinstance(msgs, list):
        raise BadRecord("bad_messages", f"{what}messages must be a list, got {type(msgs).__name__}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord("bad_messages", f"{what}message {j}: expected an object, got {type(m).__name__}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise BadRecord("bad_messages", f"{what}message {j}: role {m.get('role')!r} is not system/user/assistant "
                                            f"(map your role names with the 'roles' option)")
        if not isinstance(m.get("content"), str):
            raise BadRecord("bad_messages", f"{what}message {j}: content must be a string")
        if not m["content"].strip():
            raise BadRecord("empty_turn", f"{what}message {j} is empty")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_messages(msgs: Any) -> list[dict]:
    """``[{"role", "content"}, ...]`` checked (roles system/user/assistant, non-empty string contents,
    at least two non-system turns) and copied with only those two keys, or BadRecord."""
    out = _turns(msgs)
    if sum(m["role"] != "system" for m in out) < 2:
        raise BadRecord("too_few_turns", "conversation has fewer than two turns")
    return out


# == preference pairs =============================================================================
def _response(value: Any, name: str) -> list[dict]:
    """A conversational pair's response: one assistant message (a string is its content)."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"empty_{name}", f"field {name!r} is empty")
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise BadRecord(f"wrong_type_{name}", f"field {name!r} must be a string or a list of messages, "
                                              f"got {type(value).__name__}")
    msgs = _turns(value, f"field {name!r}: ")
    if [m["role"] for m in msgs] != ["assistant"]:
        raise BadRecord("bad_response", f"field {name!r} must be one assistant message, got roles "
                                        f"{[m['role'] for m in msgs]}")
    return msgs


def preference_pair(prompt: Any, chosen: Any, rejected: Any, *, names: dict | None = None) -> PreferencePair:
    """A :class:`~ftk.components.PreferencePair` checked, or BadRecord.

    Text form: three strings (the prompt may be empty, the responses may not). Conversational form
    (TRL's): ``prompt`` a list of ``{"role", "content"}`` messages holding a user turn and not ending
    with the assistant's; ``chosen``/``rejected`` one assistant message each, as a one-item list or a
    string (its content). ``prompt`` None is the implicit-prompt form: ``chosen`` and ``rejected`` are
    whole conversations and the prompt is the messages they share from the start (as TRL's
    ``extract_prompt``). ``names`` maps ``prompt``/``chosen``/``rejected`` to the record's own field
    names for the messages and reasons: ``missing_<field>``, ``empty_<field>``, ``wrong_type_<field>``,
    ``mixed_forms``, ``bad_messages``, ``empty_turn``, ``no_user_turn``, ``prompt_ends_with_assistant``,
    ``bad_response``, ``no_shared_prompt``, ``same_responses``."""
    n = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **(names or {})}
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise BadRecord(f"missing_{n[key]}", f"missing field {n[key]!r}")
    if prompt is None:  # implicit: the shared start of two whole conversations
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise BadRecord(f"missing_{n['prompt']}", f"missing field {n['prompt']!r} (without it, {n['chosen']!r} "
                                                      f"and {n['rejected']!r} must be conversations sharing a prompt)")
        c, r = _turns(chosen, f"field {n['chosen']!r}: "), _turns(rejected, f"field {n['rejected']!r}: ")
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        if not k:
            raise BadRecord("no_shared_prompt", f"fields {n['chosen']!r} and {n['rejected']!r} share no prompt "
                                                f"messages (and there is no {n['prompt']!r} field)")
        prompt, chosen, rejected = c[:k], c[k:], r[k:]
    if isinstance(prompt, str):
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, list):
                raise BadRecord("mixed_forms", f"field {n['prompt']!r} is text but {n[key]!r} is a list of "
                                               f"messages; give all three as text or as messages")
            if not isinstance(value, str):
                raise BadRecord(f"wrong_type_{n[key]}", f"field {n[key]!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise BadRecord(f"empty_{n[key]}", f"field {n[key]!r} is empty")
        same = chosen == rejected
    elif isinstance(prompt, list):
        prompt = _turns(prompt, f"field {n['prompt']!r}: ")
        if not any(m["role"] == "user" for m in prompt):
            raise BadRecord("no_user_turn", f"field {n['prompt']!r} has no user message")
        if prompt[-1]["role"] == "assistant":
            raise BadRecord("prompt_ends_with_assistant", f"field {n['prompt']!r} ends with an assistant message; "
                                                          f"the prompt must end before the response")
        chosen, rejected = _response(chosen, n["chosen"]), _response(rejected, n["rejected"])
        same = chosen[0]["content"] == rejected[0]["content"]
    else:
        raise BadRecord(f"wrong_type_{n['prompt']}", f"field {n['prompt']!r} must be a string or a list of messages, "
                                                     f"got {type(prompt).__name__}")
    if same:
        raise BadRecord("same_responses", f"fields {n['chosen']!r} and {n['rejected']!r} are the same response")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


# == already tokenized ============================================================================
def _int_list(value: Any, name: str) -> list[int]:
    """``value`` (a list, tuple, numpy array, tensor, ...) as a list of Python ints, or BadRecord
    ``non_int_<name>`` naming the first element that is not an int (bools and floats are not)."""
    if not isinstance(value, (list, tuple)) and hasattr(value, "tolist"):
        value = value.tolist()  # numpy arrays and torch tensors, as datasets' formats return them
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise BadRecord(f"non_int_{name}", f"{name} must be a list of ints, got {type(value).__name__}")
    out = list(value)
    for k, x in enumerate(out):
        if type(x) is not int:
            if isinstance(x, bool) or not hasattr(x, "__index__"):
                raise BadRecord(f"non_int_{name}", f"{name} must be a list of ints; {name}[{k}] is "
                                                   f"{repr(x)[:40]} ({type(x).__name__})")
            out[k] = x.__index__()  # a numpy integer, a 0-d integer tensor
    return out


def tokenized_example(input_ids: Any, labels: Any = None, attention_mask: Any = None, *,
                      vocab_size: int | None = None) -> Example:
    """An already-tokenized example (``Example.token_ids`` / ``token_labels``), checked.

    ``input_ids``, ``labels`` and ``attention_mask`` are lists of ints or anything list-like (numpy
    arrays, tensors). A label is its token's own id (trained) or -100 (not trained); no ``labels``
    trains every token. Positions where ``attention_mask`` is 0 (padding) are dropped. ``vocab_size``
    (``len(tokenizer)``) checks every id is in the vocabulary. Anything wrong is a BadRecord:
    ``non_int_input_ids``/``non_int_labels``/``non_int_attention_mask``, ``labels_length``,
    ``attention_mask_length``, ``bad_attention_mask`` (not 0/1), ``id_out_of_vocabulary``,
    ``labels_not_ids``, ``empty_input_ids``, ``no_trained_tokens``. Positions in messages count the
    lists as given."""
    ids = _int_list(input_ids, "input_ids")
    labs = None if labels is None else _int_list(labels, "labels")
    mask = None if attention_mask is None else _int_list(attention_mask, "attention_mask")
    for name, other in (("labels", labs), ("attention_mask", mask)):
        if other is not None and len(other) != len(ids):
            raise BadRecord(f"{name}_length", f"{name} has {len(other)} entries for {len(ids)} input_ids")
    if mask is not None and not set(mask) <= {0, 1}:
        raise BadRecord("bad_attention_mask", "attention_mask must hold only 0 (padding) and 1")
    limit = float("inf") if vocab_size is None else vocab_size
    if ids and not (min(ids) >= 0 and max(ids) < limit):
        k = next(k for k, t in enumerate(ids) if not 0 <= t < limit)
        within = "" if vocab_size is None else f" (0..{vocab_size - 1})"
        raise BadRecord("id_out_of_vocabulary",
                        f"input_ids[{k}] is {ids[k]}, outside the tokenizer's vocabulary{within}")
    if labs is not None:
        k = next((k for k, (t, lab) in enumerate(zip(ids, labs)) if lab != t and lab != _IGNORE), None)
        if k is not None:
            raise BadRecord("labels_not_ids", f"labels[{k}] is {labs[k]} but input_ids[{k}] is {ids[k]}: a label is "
                                              f"its token's own id (trained) or -100 (not trained), not shifted")
    if mask is not None and 0 in mask:  # the padding the user's tokenizer added
        ids = [t for t, m in zip(ids, mask) if m]
        labs = None if labs is None else [lab for lab, m in zip(labs, mask) if m]
    if not ids:
        raise BadRecord("empty_input_ids", "input_ids is empty" + (" where attention_mask is 1" if mask else ""))
    if (len(ids) - 1 if labs is None else sum(lab != _IGNORE for lab in labs[1:])) < 1:
        raise BadRecord("no_trained_tokens", "no token after the first is trained (the first token never is: "
                                             "nothing predicts it)")
    return Example(token_ids=ids, token_labels=labs)


def example_from_row(row: dict, template: str | None = None, *, vocab_size: int | None = None) -> Example:
    """A row from a user's DatasetDict: instruction/input/output, prompt/response(completion),
    messages, or text; or, without any of those, already tokenized: input_ids (labels, attention_mask),
    see :func:`tokenized_example` (``vocab_size`` is passed to it)."""
    if not isinstance(row, dict):
        raise BadRecord("not_an_object", f"expected a row of fields, got {type(row).__name__}")
    if "input_ids" in row and not any(k in row for k in _TEXT_FIELDS):
        return tokenized_example(row["input_ids"], row.get("labels"), row.get("attention_mask"), vocab_size=vocab_size)
    if "messages" in row:
        return conversation_example(check_messages(row["messages"]))
    if "instruction" in row:
        return instruction_example({"instruction": field_str(row, "instruction"),
                                    "input": field_str(row, "input", required=False),
                                    "output": field_str(row, "output")}, template)
    if "prompt" in row:
        resp_key = "response" if "response" in row else "completion"
        prompt, resp = field_str(row, "prompt", allow_empty=True), field_str(row, resp_key)
        return Example(segments=[Segment(prompt, False), Segment(resp, True)], prompt=prompt, reference=resp)
    if "text" in row:
        return Example(segments=[Segment(field_str(row, "text"), True)])
    raise BadRecord("unknown_shape", f"row has fields {sorted(row)}; expected instruction/output, "
                                     f"prompt/response, messages, text or input_ids")


def loader_from_class(cls) -> Callable[[dict, DataContext], LoadedData]:
    """Turn a seed-style loader class into a dataset factory.

    ``cls(tokenizer, max_length)`` must have ``load() -> datasets.DatasetDict`` with a ``train`` split
    (and optionally ``validation``) whose rows have text fields or are already tokenized (see
    :func:`example_from_row`; ids are checked against ``ctx.tokenizer``'s vocabulary when it is known).
    Register the result like any loader: ``register("mine", loader_from_class(MyLoader))``.
    """

    def factory(options: dict, ctx: DataContext) -> LoadedData:
        obj = cls(ctx.tokenizer, ctx.max_length)
        dd = obj.load()
        if not hasattr(dd, "keys") or not all(hasattr(dd[s], "__iter__") for s in dd.keys()):
            raise DataError(f"{cls.__name__}.load(): returned {type(dd).__name__}; a datasets.DatasetDict "
                            f"(or a dict of splits) with a 'train' split is required")
        if "train" not in dd:
            raise DataError(f"{cls.__name__}.load(): returned splits {list(dd)}; a 'train' split is required")
        policy = RecordPolicy(ctx.on_error)
        template = options.get("template")
        vocab_size = len(ctx.tokenizer) if ctx.tokenizer is not None else None

        def convert(split):
            out = []
            for i, row in enumerate(dd[split]):
                try:
                    out.append(example_from_row(row, template, vocab_size=vocab_size))
                except BadRecord as e:
                    policy.bad(f"{cls.__name__} {split} row {i}", e)
            return out

        train = convert("train")
        val = convert("validation") if "validation" in dd else None
        fp = hashlib.sha256(repr([getattr(dd[s], "_fingerprint", "") for s in dd]).encode()).hexdigest()[:20]
        # load() is arbitrary code: its result cannot be checked without running it
        return LoadedData(train=train, validation=val, skipped=policy.skipped, fingerprint=f"{cls.__name__}:{fp}",
                          reusable=False)

    factory.__doc__ = f"ftk loader wrapping {cls.__module__}.{cls.__qualname__}"
    return factory


def load_hub(path: str, ctx: DataContext, options: dict):
    """A hub dataset (``datasets.load_dataset(path, options["subset"], revision=options["revision"])``)
    as (train split, validation split or None, fingerprint); ``ctx.streaming`` streams it."""
    import datasets

    kw = {k: options[k] for k in ("revision",) if options.get(k)}
    try:
        dd = datasets.load_dataset(path, options.get("subset"), streaming=ctx.streaming, **kw)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, ...: one clear line
        raise DataError(f"{path}: not a local file and not loadable as a hub dataset: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if "train" not in dd:
        raise DataError(f"{path}: hub dataset has splits {list(dd)}; a 'train' split is required")
    val = next((dd[s] for s in ("validation", "valid", "dev") if s in dd), None)
    return dd["train"], val, getattr(dd["train"], "_fingerprint", "") or path

"""Built-in dataset loader `custom`: JSON/JSONL/CSV/TSV/Parquet with a field mapping and a template.

Two shapes:
- ``instruction`` (default): ``fields`` maps ``instruction`` / ``input`` / ``output`` onto your
  columns; rendered in the Alpaca format, or with ``template`` (a format string over the mapped
  names and your own columns, containing ``{output}``: from there on is trained).
- ``conversation``: ``fields.messages`` names a list of turns, ``fields.role`` / ``fields.content``
  the keys inside a turn, ``roles`` maps your role values onto system/user/assistant; assistant
  turns are trained. ``"template": "chat"`` renders with the tokenizer's chat template.
"""
from ftk.hookspecs import hookimpl
from ftk.loaderkit import FILE_OPTIONS, ROLES_OPTION

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        **FILE_OPTIONS,
        "shape": {"enum": ["instruction", "conversation"], "default": "instruction"},
        "fields": {
            "type": "object", "default": {},
            "properties": {
                "instruction": {"type": "string"}, "input": {"type": ["string", "null"]}, "output": {"type": "string"},
                "messages": {"type": "string"}, "role": {"type": "string"}, "content": {"type": "string"},
            },
            "additionalProperties": False,
            "description": "Your column names for instruction/input/output, or messages/role/content.",
        },
        "roles": ROLES_OPTION,
    },
}

_DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "output": "output",
                   "messages": "messages", "role": "role", "content": "content"}


def _instruction(rec, fields, template):
    from ftk.loaderkit import field_str, instruction_example

    vals = {"instruction": field_str(rec, fields["instruction"]),
            "input": field_str(rec, fields["input"], required=False) if fields.get("input") else "",
            "output": field_str(rec, fields["output"])}
    extra = {k: v for k, v in rec.items() if isinstance(k, str) and isinstance(v, str)}
    return instruction_example({**extra, **vals}, template)


def _conversation(rec, fields, roles):
    from collections.abc import Hashable

    from ftk.loaderkit import BadRecord, check_messages, conversation_example

    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", f"expected an object with fields, got {type(rec).__name__}")
    turns = rec.get(fields["messages"])
    if isinstance(turns, str):  # CSV/Parquet cells may hold the list as JSON text
        import json

        try:
            turns = json.loads(turns)
        except (json.JSONDecodeError, RecursionError):
            raise BadRecord("bad_messages", f"field {fields['messages']!r} is not a JSON list") from None
    if not isinstance(turns, list):
        raise BadRecord(f"missing_{fields['messages']}", f"missing list field {fields['messages']!r}")
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRecord("bad_messages", f"turn {j} is not an object")
        role = t.get(fields["role"])
        if isinstance(role, Hashable):  # a list or object here is a bad role, reported by check_messages
            role = roles.get(role, role)
        msgs.append({"role": role, "content": t.get(fields["content"])})
    return conversation_example(check_messages(msgs))


def _examples(path, options, policy):
    from ftk.loaderkit import BadRecord, iter_records

    fields = {**_DEFAULT_FIELDS, **(options.get("fields") or {})}
    template = options.get("template")
    shape = options["shape"]
    for where, rec in iter_records(path, options["format"], policy):
        try:
            if shape == "conversation":
                ex = _conversation(rec, fields, options.get("roles") or {})
            else:
                ex = _instruction(rec, fields, template)
        except BadRecord as e:
            policy.bad(where, e)
            continue
        ex.meta["where"] = where
        yield ex


def load(options, ctx):
    from ftk.components import LoadedData
    from ftk.errors import DataError
    from ftk.loaderkit import RecordPolicy, file_fingerprint

    tmpl = options.get("template") or "default"
    if options.get("shape") == "conversation" and tmpl not in ("default", "chat"):
        raise DataError("custom: a template string applies to shape 'instruction'; conversations use "
                        "\"default\" or \"chat\"")
    policy = RecordPolicy(ctx.on_error)
    train = _examples(options["path"], options, policy)
    if not ctx.streaming:
        train = list(train)
    vp = options.get("validation_path")
    val = list(_examples(vp, options, policy)) if vp else None
    fp = file_fingerprint(*[p for p in (options["path"], vp) if p])
    return LoadedData(train=train, validation=val, skipped=policy.skipped, fingerprint=f"custom:{fp}")


@hookimpl
def ftk_register_datasets(register):
    register("custom", load, description="Your own JSON/JSONL/CSV/Parquet files with a field mapping",
             options_schema=SCHEMA)

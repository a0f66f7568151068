"""Built-in dataset loader `preference`: preference pairs (prompt, chosen, rejected) from JSON/JSONL/CSV/TSV/
Parquet files, for trainers of the "pairs" data form (DPO, ORPO, KTO).

Values are text (each response continues the prompt) or conversations in TRL's format: ``prompt`` a list
of ``{"role", "content"}`` messages ending before the response, ``chosen``/``rejected`` one assistant
message each (a one-item list, or a string). Without a ``prompt`` field, ``chosen`` and ``rejected`` may be
whole conversations: the prompt is the messages they share from the start (TRL's implicit prompt).
``fields`` maps prompt/chosen/rejected onto your column names, ``roles`` your role values onto
system/user/assistant. The core renders, tokenizes and truncates the pairs (docs/data.md).
"""
from ftk.hookspecs import hookimpl
from ftk.loaderkit import FILE_OPTIONS, ROLES_OPTION

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        **FILE_OPTIONS,
        "fields": {
            "type": "object", "default": {},
            "properties": {"prompt": {"type": "string", "minLength": 1}, "chosen": {"type": "string", "minLength": 1},
                           "rejected": {"type": "string", "minLength": 1}},
            "additionalProperties": False,
            "description": "Your column names for prompt/chosen/rejected.",
        },
        "roles": ROLES_OPTION,
    },
}

_DEFAULT_FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def _mapped(value, roles):
    """Messages with their role values mapped (anything else as it is, for the kit to judge)."""
    if not roles or not isinstance(value, list):
        return value
    out = []
    for m in value:
        if isinstance(m, dict) and isinstance(m.get("role"), str):
            m = {**m, "role": roles.get(m["role"], m["role"])}
        out.append(m)
    return out


def _pair(rec, fields, roles):
    from ftk.loaderkit import BadRecord, preference_pair

    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", f"expected an object with fields, got {type(rec).__name__}")
    vals = {k: _mapped(rec.get(name), roles) for k, name in fields.items()}
    return preference_pair(vals["prompt"], vals["chosen"], vals["rejected"], names=fields)


def _pairs(path, options, policy):
    from ftk.loaderkit import BadRecord, iter_records

    fields = {**_DEFAULT_FIELDS, **(options.get("fields") or {})}
    roles = options.get("roles") or {}
    for where, rec in iter_records(path, options["format"], policy):
        try:
            pair = _pair(rec, fields, roles)
        except BadRecord as e:
            policy.bad(where, e)
            continue
        pair.meta["where"] = where
        yield pair


def load(options, ctx):
    from ftk.components import LoadedData
    from ftk.loaderkit import RecordPolicy, file_fingerprint

    policy = RecordPolicy(ctx.on_error)
    train = _pairs(options["path"], options, policy)
    if not ctx.streaming:
        train = list(train)
    vp = options.get("validation_path")
    val = list(_pairs(vp, options, policy)) if vp else None
    fp = file_fingerprint(*[p for p in (options["path"], vp) if p],
                          options={k: options.get(k) for k in ("fields", "roles", "format")})
    return LoadedData(train=train, validation=val, skipped=policy.skipped, fingerprint=f"preference:{fp}")


@hookimpl
def ftk_register_datasets(register):
    register("preference", load, description="Preference pairs (prompt/chosen/rejected, text or conversations) "
                                             "for DPO/ORPO/KTO", options_schema=SCHEMA)

"""Built-in dataset loader `alpaca`: instruction / input / output records.

Local JSON (a list of records) or JSONL file, or a hub dataset id loaded through `datasets`.
Rendered in the Alpaca format (the Input block left out when input is empty), or with the
recipe's own template string containing ``{output}``; the response (and EOS) is what is trained.
"""
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "format": "path-or-hub-id",
                 "description": "JSON or JSONL file (relative to the recipe), or a hub dataset id (e.g. tatsu-lab/alpaca)."},
        "format": {"enum": ["auto", "json", "jsonl"], "default": "auto",
                   "description": "File format; auto = from the extension (.json list of records, .jsonl one per line)."},
        "validation_path": {"type": ["string", "null"], "format": "path", "default": None,
                            "description": "Optional file holding the validation split (else data.validation_size)."},
        "subset": {"type": ["string", "null"], "default": None, "description": "Hub dataset configuration name."},
        "revision": {"type": ["string", "null"], "default": None, "description": "Hub dataset revision."},
    },
}


def _examples(located, policy, template):
    """(where, record) pairs -> Examples; bad records go through the on_error policy."""
    from ftk.loaderkit import BadRecord, field_str, instruction_example

    for where, rec in located:
        try:
            fields = {"instruction": field_str(rec, "instruction"),
                      "input": field_str(rec, "input", required=False),  # may be omitted or empty
                      "output": field_str(rec, "output")}
            ex = instruction_example({**rec, **fields}, template)
        except BadRecord as e:
            policy.bad(where, e)
            continue
        ex.meta["where"] = where
        yield ex


def _records(path, fmt, policy, template):
    from ftk.loaderkit import iter_records

    return _examples(iter_records(path, fmt, policy), policy, template)  # detect_format reads "auto"


def _hub_rows(rows, name, policy, template):
    return _examples(((f"{name} record {i}", rec) for i, rec in enumerate(rows)), policy, template)


def load(options, ctx):
    from pathlib import Path

    from ftk.components import LoadedData
    from ftk.loaderkit import RecordPolicy, file_fingerprint, load_hub

    policy = RecordPolicy(ctx.on_error)
    path, template, fmt = options["path"], options.get("template"), options["format"]
    if Path(path).exists() or path.startswith((".", "/", "~")):
        train = _records(path, fmt, policy, template)
        if not ctx.streaming:
            train = list(train)
        val = None
        if options.get("validation_path"):
            val = list(_records(options["validation_path"], fmt, policy, template))
        fp = file_fingerprint(*[p for p in (path, options.get("validation_path")) if p])
        return LoadedData(train=train, validation=val, skipped=policy.skipped, fingerprint=f"alpaca:{fp}")
    train_rows, val_rows, fp = load_hub(path, ctx, options)
    train = _hub_rows(train_rows, f"{path} train", policy, template)
    val = list(_hub_rows(val_rows, f"{path} validation", policy, template)) if val_rows is not None else None
    return LoadedData(train=train if ctx.streaming else list(train), validation=val, skipped=policy.skipped,
                      fingerprint=f"alpaca:{fp}")


@hookimpl
def ftk_register_datasets(register):
    register("alpaca", load, description="Alpaca instruction/input/output records (JSON, JSONL or hub id)",
             options_schema=SCHEMA)

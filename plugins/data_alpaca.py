"""Built-in dataset loader `alpaca`: instruction / input / output records."""
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "format": "path-or-hub-id",
                 "description": "JSON or JSONL file (relative to the recipe), or a hub dataset id."},
    },
}


def load(options, ctx):
    raise NotImplementedError("alpaca loader lands with the data pipeline")


@hookimpl
def ftk_register_datasets(register):
    register("alpaca", load, description="Alpaca instruction/input/output records (JSON, JSONL or hub id)",
             options_schema=SCHEMA)

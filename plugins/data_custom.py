"""Built-in dataset loader `custom`: JSON/JSONL/CSV/Parquet with a field mapping and a template."""
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "format": "path"},
    },
}


def load(options, ctx):
    raise NotImplementedError("custom loader lands with the data pipeline")


@hookimpl
def ftk_register_datasets(register):
    register("custom", load, description="Your own JSON/JSONL/CSV/Parquet files with a field mapping",
             options_schema=SCHEMA)

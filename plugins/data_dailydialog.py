"""Built-in dataset loader `dailydialog`: multi-turn conversations."""
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "format": "path-or-hub-id",
                 "description": "Native-layout folder, a split zip, or a hub dataset id."},
    },
}


def load(options, ctx):
    raise NotImplementedError("dailydialog loader lands with the data pipeline")


@hookimpl
def ftk_register_datasets(register):
    register("dailydialog", load, description="DailyDialog conversations (native folders, original zips, hub id)",
             options_schema=SCHEMA)

"""Built-in trainer `sft`: supervised fine-tuning on the rows ftk.data prepares (prompt tokens masked,
the response trained with next-token cross-entropy), with transformers' own loss. The core's FtkTrainer,
callbacks, checkpoints and adapter save do the rest, as for every trainer."""
from ftk.components import TrainerPlan
from ftk.hookspecs import hookimpl

SCHEMA = {"type": "object", "properties": {}}


def plan_sft(options, ctx) -> TrainerPlan:
    return TrainerPlan(data="rows")


@hookimpl
def ftk_register_trainers(register):
    register("sft", plan_sft, description="Supervised fine-tuning: next-token loss on the response tokens",
             options_schema=SCHEMA)

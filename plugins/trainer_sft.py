"""Built-in trainer `sft`: supervised fine-tuning on the rows ftk.data prepares (prompt tokens masked,
the response trained with next-token cross-entropy). The core's FtkTrainer, callbacks, checkpoints and
adapter save do the rest, as for every trainer.

The loss is transformers' own, or with ``chunked_loss`` (the default) the same loss computed by
``ftk.losses`` from the final hidden states a chunk at a time and only where a label is, so the whole
batch's logits never exist (docs/training.md, "Memory")."""
import functools

from ftk.components import TrainerPlan
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "properties": {
        "chunked_loss": {
            "enum": ["auto", True, False], "default": "auto",
            "description": "Compute the cross-entropy without materializing the batch's logits: chunk_tokens "
                           "labelled positions at a time, each chunk's logits recomputed in the backward pass. "
                           "Same loss and gradients as the plain loss. auto and true: on (also under FSDP "
                           "sharding); false: transformers' loss."},
        "chunk_tokens": {"type": "integer", "minimum": 1, "default": 1024,
                         "description": "Positions per chunk of the chunked loss (logits alive at a time)."},
    },
    "additionalProperties": False,
}


def plan_sft(options, ctx) -> TrainerPlan:
    if options["chunked_loss"] is False:
        return TrainerPlan(data="rows")
    from ftk.losses import causal_lm_loss_chunked

    chunk = options["chunk_tokens"]
    return TrainerPlan(data="rows", compute_loss=functools.partial(causal_lm_loss_chunked, chunk_tokens=chunk),
                       logits_positions=chunk)


@hookimpl
def ftk_register_trainers(register):
    register("sft", plan_sft, description="Supervised fine-tuning: next-token loss on the response tokens",
             options_schema=SCHEMA)

"""Causal-LM cross-entropy that never holds the whole batch's logits.

A LLaMA with a 32,000-token vocabulary turns a 4 x 2,048-token batch into 262M logits: 1 GiB in fp32,
kept for the backward pass, plus its float upcast and its gradient. :func:`chunked_causal_lm_loss`
computes the loss from the final hidden states a chunk of positions at a time, each chunk's logits
recomputed in the backward pass (activation checkpointing of the output layer only), and only at the
positions that have a label, so the prompt tokens a supervised run masks cost nothing. The output layer's
own forward computes each chunk, so a LoRA-adapted or quantized head works as it does in the model.

It equals transformers' ``ForCausalLMLoss`` (labels shifted left, ``-100`` ignored, a sum divided by
``num_items_in_batch`` when the Trainer passes it, else the mean) in value and in gradients.
"""
from __future__ import annotations

IGNORE_INDEX = -100


def shift_labels(labels):
    """Position i is scored on token i + 1, the last position on nothing (as transformers shifts)."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_sum(head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # head: the layer or its forward


def chunked_causal_lm_loss(hidden, head, labels, *, chunk_tokens: int = 1024, num_items_in_batch=None,
                           shifted=None):
    """The causal-LM loss of ``head(hidden)`` against ``labels`` (not yet shifted; or give ``shifted``),
    ``chunk_tokens`` positions of logits alive at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = (shifted if shifted is not None else shift_labels(labels)).reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    flat, targets = flat.index_select(0, keep), targets.index_select(0, keep)
    total = flat.new_zeros((), dtype=torch.float32)
    # split, not slices: each slice's backward would write its gradient into a zero tensor of all of ``flat``
    for h, y in zip(flat.split(chunk_tokens), targets.split(chunk_tokens)):
        total = total + checkpoint(_chunk_sum, head, h, y, use_reentrant=False)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    # the mean over no labelled position is NaN, as the plain loss's is
    return total / targets.numel() if targets.numel() else total * float("nan")


class _ChunkedHead:
    """Stands in for a model's output layer during one forward: computes the chunked loss from the hidden
    states it is given, where the real layer would have run (so under the forward's autocast, and inside
    a wrapper's forward), and returns no logits. Each chunk calls the real layer's forward."""

    def __init__(self, forward, labels, shifted, chunk_tokens, num_items_in_batch):
        self.forward, self.labels, self.shifted = forward, labels, shifted
        self.chunk_tokens, self.num_items_in_batch, self.loss = chunk_tokens, num_items_in_batch, None

    def __call__(self, hidden):
        self.loss = chunked_causal_lm_loss(hidden, self.forward, self.labels, chunk_tokens=self.chunk_tokens,
                                           num_items_in_batch=self.num_items_in_batch, shifted=self.shifted)
        # no logits, but an (empty) output that depends on the loss: causal_lm_loss_chunked adds it to the
        # loss, so the backward pass reaches the chunks' recomputation only through the model's output,
        # where a wrapper that hooks it (FSDP: all-gather the sharded output layer) has run first
        return hidden[..., :0] + self.loss * 0


def output_layer(model):
    """The output layer (``get_output_embeddings()``) of ``model`` or of the model a DDP/accelerate wrapper holds."""
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output layer (get_output_embeddings() is None)")
    return head


def causal_lm_loss_chunked(trainer, model, inputs, return_outputs=False, num_items_in_batch=None,
                           chunk_tokens: int = 1024):
    """A ``TrainerPlan.compute_loss``: the model's forward with its output layer replaced for that call by
    :func:`chunked_causal_lm_loss`; scaled as ``transformers.Trainer.compute_loss`` scales its loss."""
    if not getattr(trainer, "model_accepts_loss_kwargs", True):
        num_items_in_batch = None  # the Trainer then averages per batch and divides by accumulation itself
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    shifted = inputs.pop("shift_labels", None)
    head = output_layer(model)
    chunked = _ChunkedHead(head.forward, labels, shifted, chunk_tokens, num_items_in_batch)
    head.forward = chunked  # an instance attribute for this call: the module, its parameters and hooks stay
    try:
        outputs = model(**inputs)
    finally:
        del head.forward
    if chunked.loss is None:
        raise RuntimeError(f"the model's forward did not call its output layer {type(head).__name__}")
    loss = chunked.loss + outputs["logits"].sum()  # + 0, through the model's output (see _ChunkedHead)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    if return_outputs:
        outputs["logits"] = None
        return loss, outputs
    return loss

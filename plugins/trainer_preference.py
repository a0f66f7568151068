"""Built-in trainers `dpo`, `orpo` and `kto`: preference tuning of the adapter with TRL's own trainers,
losses, reference handling and metrics (trl 1.16, installed by the `preference` extra and imported only
when a run trains). Everything around the Trainer is ftk's, as for `sft`: model loading and quantization,
the adapter, callbacks, checkpoints and resume, the learning guard, DDP, the adapter save and the report.

The core prepares the preference pairs (``data`` form ``"pairs"``: ``prompt_ids``/``chosen_ids``/
``rejected_ids`` per pair, truncated to data.max_length); each trainer class turns them into the columns
its TRL trainer reads after its own tokenization (which is skipped), and TRL's own collator batches them:

* ``dpo``: TRL's DPOTrainer as it is, reference = the base model (the adapter disabled, no second copy).
* ``orpo``: TRL's (experimental) ORPOTrainer: reference-free, odds-ratio term plus the chosen response's NLL.
* ``kto``: TRL's KTOTrainer on unpaired examples: each pair gives a desirable (chosen) and an undesirable
  (rejected) example, so the same pairs serve all three.

Padding-free batches (``dpo`` and ``kto``, option ``padding_free``, on by default): TRL's collator pads
every sequence of a batch to the longest one (for DPO the B prompt + chosen rows, then the B prompt +
rejected rows), and its loss reads per-token log-probs in that padded layout. ftk keeps the collator and
the loss code as they are and changes only the model call they make: the padded batch is packed (its
non-padding tokens, each sequence's ``position_ids`` restarting at 0, no attention mask, so transformers
builds a block-diagonal causal mask), run through TRL's fused LM head, and every per-token output is put
back where the padded call would have returned it (0 at padding, as there). The policy, the reference and
KTO's KL passes all go through it. ORPO reads the full logits (its ``logits/*`` metrics average them over
the padding too), so it stays padded.

What ftk changes on TRL's trainers, and why: TRL casts a quantized model's trainable adapter weights to
bf16 (QLoRA's recipe) -- ftk keeps its own precision, so weights stay as loaded and resume is exact; TRL
adds a "ref" copy of a PeftModel's adapter -- ftk deletes it, so the reference is the adapter disabled and
checkpoints and the saved adapter hold only "default"; TRL toggles gradient checkpointing off and on around
each reference pass, which registers one more input hook every step -- ftk's non-reentrant checkpointing
needs no toggle (no checkpoint runs without grad), so it is left alone; TRL sends a usage ping to the Hub
from every trainer -- ftk's never do; TRL writes a model card next to the checkpoints -- ftk writes its
report instead.
"""
from __future__ import annotations

import contextlib
import functools

from ftk.components import TrainerPlan, needs_package
from ftk.errors import FtkError
from ftk.hookspecs import hookimpl

# ftk overrides TRL's private dataset preparation (DPO/KTO ``_prepare_dataset``, ORPO ``tokenize_row``),
# so it supports the one minor series it is tested with
TRL_VERSIONS = ">=1.16,<1.17"
INSTALL = "pip install 'ftk[preference]'"

_DROPOUT = {"disable_dropout": {
    "type": "boolean", "default": True,
    "description": "Set every dropout probability to 0 while training, as TRL does by default (the adapter's "
                   "dropout too; a note says so); false keeps adapter.dropout."}}
_PADDING_FREE = {"padding_free": {
    "type": "boolean", "default": True,
    "description": "Pack each batch's sequences without padding (position ids restarting per sequence) for the "
                   "model call; the log-probs, loss and metrics are those of the padded batch. false: TRL's padded "
                   "batches as they are."}}
DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
DPO_SCHEMA = {"type": "object", "properties": {
    "beta": {"type": "number", "exclusiveMinimum": 0, "default": 0.1,
             "description": "How far the adapter may move from the reference (the base): larger keeps it closer."},
    "loss_type": {"enum": DPO_LOSSES, "default": "sigmoid",
                  "description": "TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, exo_pair, ... (trl.DPOConfig)."},
    "label_smoothing": {"type": "number", "minimum": 0, "exclusiveMaximum": 0.5, "default": 0.0,
                        "description": "Assumed share of flipped preference labels (robust, exo_pair, "
                                       "conservative DPO)."},
    **_PADDING_FREE, **_DROPOUT}}
ORPO_SCHEMA = {"type": "object", "properties": {
    "beta": {"type": "number", "exclusiveMinimum": 0, "default": 0.1,
             "description": "Weight of the odds-ratio term next to the chosen response's NLL (lambda in the paper)."},
    **_DROPOUT}}
KTO_SCHEMA = {"type": "object", "properties": {
    "beta": {"type": "number", "exclusiveMinimum": 0, "default": 0.1,
             "description": "How far the adapter may move from the reference (the base): larger keeps it closer."},
    "loss_type": {"enum": ["kto", "apo_zero_unpaired"], "default": "kto",
                  "description": "kto (with its KL estimate, needs training.batch_size >= 2) or apo_zero_unpaired."},
    "desirable_weight": {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                         "description": "Loss weight of the desirable (chosen) examples."},
    "undesirable_weight": {"type": "number", "exclusiveMinimum": 0, "default": 1.0,
                           "description": "Loss weight of the undesirable (rejected) examples."},
    **_PADDING_FREE, **_DROPOUT}}

# method -> (TRL module, trainer class, config class, sequences with gradient / without, per example)
_TRL = {"dpo": ("trl.trainer.dpo_trainer", "DPOTrainer", "DPOConfig", 2, 2),
        "orpo": ("trl.experimental.orpo.orpo_trainer", "ORPOTrainer", "ORPOConfig", 2, 0),
        "kto": ("trl.trainer.kto_trainer", "KTOTrainer", "KTOConfig", 1, 1)}
# the positions TRL's fused LM head (DPO, KTO) projects at once: trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# (a test keeps the two equal; ftk plan must not import TRL)
FUSED_HEAD_POSITIONS = 32768
_CONFIGS = {"dpo": "trl.trainer.dpo_config", "orpo": "trl.experimental.orpo.orpo_config",
            "kto": "trl.trainer.kto_config"}


def trl_unavailable() -> str | None:
    """Why trl cannot serve here (None: it can); package metadata only."""
    return needs_package("trl", TRL_VERSIONS, INSTALL)


# -- the pairs as each TRL trainer reads them --------------------------------------------------------
def _ids(seq) -> list[int]:
    return [int(t) for t in seq]


def dpo_rows(pairs) -> list[dict]:
    """DPOTrainer's tokenized columns: the core's pairs as they are."""
    return [{k: _ids(p[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]


def orpo_rows(pairs) -> list[dict]:
    """ORPOTrainer's tokenized columns (what its ``tokenize_row`` builds): prompt + response ids, their
    attention masks, and labels with the prompt masked (-100)."""
    out = []
    for p in pairs:
        prompt = _ids(p["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for k in ("chosen", "rejected"):
            response = _ids(p[f"{k}_ids"])
            row[f"{k}_input_ids"] = prompt + response
            row[f"{k}_attention_mask"] = [1] * (len(prompt) + len(response))
            row[f"{k}_labels"] = [-100] * len(prompt) + response
        out.append(row)
    return out


def kto_rows(pairs, batch_size: int, seed: int | None = None) -> list[dict]:
    """KTOTrainer's unpaired columns from pairs: each pair gives a desirable (its chosen response, label
    True) and an undesirable example (its rejected one). KTO reads its rows in order (sequential
    sampling), ``batch_size`` to a micro-batch, so the order is built here: the pairs shuffled with
    ``seed`` (None: kept in order), then taken ``batch_size`` at a time and split into two micro-batches
    that each hold one response of every pair, chosen and rejected alternating -- every micro-batch mixes
    both labels and no two of its examples share a prompt. ``KL_completion_ids``: the responses rotated
    by one within each micro-batch, as TRL does (the mismatched prompt/response pairs of KTO's KL estimate)."""
    order = list(range(len(pairs)))
    if seed is not None:
        import random

        random.Random(seed).shuffle(order)
    rows = []
    for start in range(0, len(order), batch_size):
        group = [pairs[i] for i in order[start:start + batch_size]]
        for first in (0, 1):
            for i, p in enumerate(group):
                good = (i + first) % 2 == 0
                rows.append({"prompt_ids": _ids(p["prompt_ids"]),
                             "completion_ids": _ids(p["chosen_ids" if good else "rejected_ids"]), "label": good})
    for start in range(0, len(rows), batch_size):  # TRL's rotation, on the micro-batches as they will run
        chunk = rows[start:start + batch_size]
        for row, kl in zip(chunk, [chunk[-1]] + chunk[:-1]):
            row["KL_completion_ids"] = kl["completion_ids"]
    return rows


# -- padding-free model calls -----------------------------------------------------------------------
# the per-token fields of TRL's FusedCausalLMOutput, (rows, length - 1) each, 0 where the label is -100
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
# what TRL's calls pass besides these (PEFT passes its optional arguments as None)
_CALL_KEYS = {"input_ids", "attention_mask", "labels", "use_cache", "num_items_in_batch"}


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequences (longest first) into rows of ``capacity`` tokens, each into the first row it fits."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if k == len(rows):
            rows.append([])
            room.append(capacity)
        rows[k].append(i)
        room[k] -= lengths[i]
    return rows


class PackedBatch:
    """Where each token of a right-padded batch (``attention_mask`` (R, L): ones, then zeros) sits once
    its R sequences are packed without padding: into one row when ``one_row`` (for flash attention, which
    reads the sequence starts from the position ids of a single row), else into rows no wider than the
    longest sequence (best fit, longest first; sdpa and eager then mask R small blocks, not one R x R
    square). A row's unused end is a sequence of its own (positions from 0, labels -100), so it attends
    to nothing real."""

    def __init__(self, attention_mask, one_row: bool = False):
        import torch


        dev = attention_mask.device
        self.shape = tuple(attention_mask.shape)
        self.lengths = attention_mask.sum(1)
        lengths = self.lengths.tolist()
        bins = _first_fit(lengths, sum(lengths) if one_row else max(lengths))
        row_of, start_of, fill = [0] * len(lengths), [0] * len(lengths), []
        for b, members in enumerate(bins):
            used = 0
            for r in members:
                row_of[r], start_of[r] = b, used
                used += lengths[r]
            fill.append(used)
        width = max(fill)
        self.r, self.t = attention_mask.bool().nonzero(as_tuple=True)  # every real token, row-major
        self.row = torch.tensor(row_of, device=dev)[self.r]
        self.col = torch.tensor(start_of, device=dev)[self.r] + self.t
        self.size = (len(bins), width)
        pos = torch.arange(width, device=dev).expand(len(bins), width) - torch.tensor(fill, device=dev)[:, None]
        self.position_ids = pos.index_put((self.row, self.col), self.t)  # each row's unused end counts from 0
        self.scored = self.t < self.lengths[self.r] - 1  # tokens that have a next token in their own sequence

    def pack(self, x, fill_value):
        return x.new_full(self.size, fill_value).index_put((self.row, self.col), x[self.r, self.t])

    def shift_labels(self, labels):
        """The next token's label at each packed position (-100 at a sequence's last token and beyond)."""
        k = self.scored
        return labels.new_full(self.size, -100).index_put((self.row[k], self.col[k]), labels[self.r[k], self.t[k] + 1])

    def unpack(self, x):
        """(rows, width) per-token values -> the padded call's (R, L - 1) layout, zeros elsewhere."""
        k = self.scored
        out = x.new_zeros((self.shape[0], self.shape[1] - 1))
        return out.index_put((self.r[k], self.t[k]), x[self.row[k], self.col[k]])


def _packable(kw: dict) -> bool:
    """A call of TRL's fused LM head on a right-padded batch whose padding is not scored, with nothing
    else that depends on the layout (router logits, position ids, embeddings, images)."""
    ids, mask, labels = kw.get("input_ids"), kw.get("attention_mask"), kw.get("labels")
    if any(v is not None and v is not False and k not in _CALL_KEYS for k, v in kw.items()):
        return False
    if ids is None or mask is None or labels is None or ids.dim() != 2 or mask.shape != ids.shape \
            or labels.shape != ids.shape:
        return False
    import torch

    lengths = mask.sum(1)
    right_padded = torch.equal(mask.bool(), torch.arange(ids.size(1), device=mask.device) < lengths[:, None])
    return bool(right_padded and lengths.min() > 0 and (labels[~mask.bool()] == -100).all())


def packed_forward(fused, one_row: bool = False, bounds: bool = False):
    """Wrap TRL's fused-head forward (``add_fused_lm_head``): a padded ``fused_lm_head=True`` call runs on
    the packed batch and returns its per-token outputs in the padded layout; every other call, and a
    batch that is not right padded, goes to ``fused`` unchanged. ``bounds``: the call also gets the
    packed sequences' ``cu_seq_lens_q`` (ftk's ``sdpa_packed`` attention reads them)."""

    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, **kw):
        if not fused_lm_head or args or not _packable(kw):
            return fused(*args, fused_lm_head=fused_lm_head, **kw)
        p = PackedBatch(kw["attention_mask"], one_row)
        extra = {}
        if bounds:
            from ftk.attention import sequence_bounds

            extra["cu_seq_lens_q"] = extra["cu_seq_lens_k"] = sequence_bounds(p.position_ids)
        out = fused(input_ids=p.pack(kw["input_ids"], 0), position_ids=p.position_ids,
                    shift_labels=p.shift_labels(kw["labels"]), num_items_in_batch=kw.get("num_items_in_batch"),
                    use_cache=False, fused_lm_head=True, **extra)
        return type(out)(**{k: p.unpack(v) if k in _PER_TOKEN else v for k, v in out.items()})

    forward.ftk_packed = "one row" if one_row else "rows"
    return forward


def pack_model_calls(model) -> str | None:
    """Make the fused-head calls on ``model`` (a PeftModel or a model TRL gave a fused LM head) padding-
    free; returns the layout ("rows" or "one row"), or None where the attention cannot mask packed
    sequences (the calls stay padded)."""
    from ftk.attention import NAME as PACKED_ATTENTION

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = str(getattr(base.config, "_attn_implementation", None) or "")
    if getattr(base.forward, "ftk_packed", None):
        return base.forward.ftk_packed
    if impl.startswith("flash_attention"):
        one_row = True
    elif impl in ("sdpa", PACKED_ATTENTION, "eager", "flex_attention"):
        one_row = False
    else:
        return None
    base.forward = packed_forward(base.forward, one_row, bounds=impl == PACKED_ATTENTION)
    return base.forward.ftk_packed


# -- the Trainer classes ----------------------------------------------------------------------------
@contextlib.contextmanager
def _no_context(*args, **kwargs):
    yield


@contextlib.contextmanager
def _checkpointing_left_alone(module):
    """TRL 1.16 turns gradient checkpointing off and on around each reference pass (``disable_gradient_
    checkpointing``); each turn-on registers another input-grad hook on the embeddings. With ftk's
    non-reentrant checkpointing a pass without grad checkpoints nothing, so the toggle is skipped."""
    if module is None or not hasattr(module, "disable_gradient_checkpointing"):
        yield
        return
    saved = module.disable_gradient_checkpointing
    module.disable_gradient_checkpointing = _no_context
    try:
        yield
    finally:
        module.disable_gradient_checkpointing = saved


class _FtkPreference:
    """Mixed in before ftk's FtkTrainer and TRL's trainer: ``class FtkDPOTrainer(_FtkPreference, base,
    DPOTrainer)``. Converts the core's pairs, and undoes what TRL would change behind ftk's back."""

    ftk_method = ""
    ftk_padding_free = False  # pack the fused-head model calls (DPO, KTO); set by trainer_class
    _trl_module = None  # the TRL module whose disable_gradient_checkpointing its loss calls

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, **kwargs):
        train_dataset = self._ftk_dataset(train_dataset, args, train=True)
        eval_dataset = self._ftk_dataset(eval_dataset, args, train=False)
        import torch

        dropout = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0})
        kept = [(p, p.data) for p in model.parameters() if p.requires_grad]
        super().__init__(model=model, args=args, data_collator=None, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, **kwargs)
        for p, data in kept:  # TRL's bf16 cast of a quantized model's trainable weights, undone exactly
            if p.data.dtype != data.dtype:
                p.data = data
        if "ref" in (getattr(model, "peft_config", None) or {}):
            model.delete_adapter("ref")  # the reference is the adapter disabled: the base itself
        self.ftk_packing = pack_model_calls(model) if self.ftk_padding_free else None
        if self.ftk_padding_free and self.ftk_packing is None and self.is_world_process_zero():
            print(f"note: trainer.padding_free: attention {model.config._attn_implementation!r} cannot mask packed "
                  f"sequences; {self.ftk_method}'s batches stay padded", flush=True)
        if dropout and args.disable_dropout and self.is_world_process_zero():
            print(f"note: trainer.disable_dropout: dropout p={', '.join(f'{p:g}' for p in dropout)} (adapter.dropout "
                  f"included) is 0 while training {self.ftk_method}, as TRL does; set trainer.disable_dropout to "
                  f"false to keep it", flush=True)

    def _ftk_dataset(self, rows, args, train: bool):
        """The core's pairs (a list) as the datasets.Dataset TRL requires, in this method's columns; a
        datasets.Dataset is passed on (raw text pairs go through TRL's own tokenization)."""
        if rows is None:
            return None
        from datasets import Dataset

        if isinstance(rows, Dataset):
            return rows
        if not hasattr(rows, "__len__"):
            raise FtkError(f"trainer {self.ftk_method!r}: preference pairs must be a list (streaming is not "
                           f"supported for them)")
        pairs = list(rows)
        if self.ftk_method == "kto":
            built = kto_rows(pairs, args.per_device_train_batch_size, args.seed if train else None)
        else:
            built = (orpo_rows if self.ftk_method == "orpo" else dpo_rows)(pairs)
        return Dataset.from_list(built)

    # DPO/KTO: columns ftk built are used as they are (TRL's _prepare_dataset would look for text)
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    # ORPO: the same, one row at a time
    def tokenize_row(self, feature, model=None):
        if "chosen_input_ids" in feature:
            return {}
        return super().tokenize_row(feature, model)

    def compute_loss(self, model, inputs, *args, **kwargs):
        with _checkpointing_left_alone(self._trl_module):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _track_num_input_tokens(self, inputs):
        # ORPO's batches hold chosen_/rejected_ ids, no input_ids: count their tokens for metrics' "tokens"
        if "input_ids" not in inputs and "chosen_attention_mask" in inputs:
            import torch

            mask = torch.cat([inputs["chosen_attention_mask"].flatten(), inputs["rejected_attention_mask"].flatten()])
            inputs = {"input_ids": mask, "attention_mask": mask}
        return super()._track_num_input_tokens(inputs)

    def _send_telemetry(self):
        """TRL pings the Hub from every trainer unless HF_HUB_DISABLE_TELEMETRY; ftk runs offline-first."""

    def create_model_card(self, *args, **kwargs):
        """TRL writes README.md next to the checkpoints at every save; ftk's run writes report.md."""


def _trl(module_name: str):
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO is in trl.experimental; the version is pinned
    return importlib.import_module(module_name)


def trainer_class(method: str, base: type, padding_free: bool = False) -> type:
    """``class FtkDPOTrainer(_FtkPreference, base, trl.DPOTrainer)`` (likewise ORPO, KTO); imports TRL.
    ``padding_free``: the model calls of TRL's loss run on packed batches (DPO and KTO)."""
    module_name, cls_name, _, _, _ = _TRL[method]
    module = _trl(module_name)
    trl_cls = getattr(module, cls_name)
    name = f"Ftk{cls_name}"
    return type(name, (_FtkPreference, base, trl_cls),
                {"ftk_method": method, "_trl_module": module if method != "orpo" else None,
                 "ftk_padding_free": bool(padding_free) and method != "orpo",
                 "__module__": __name__, "__qualname__": name})


def trl_config(method: str, args, **fields):
    """The TRL config class for ``method`` carrying every TrainingArguments value ftk set (TRL's configs
    have other defaults: learning rate 1e-6, gradient checkpointing on, bf16, ...) plus ``fields``."""
    import dataclasses

    from transformers import TrainingArguments

    cls = getattr(_trl(_CONFIGS[method]), _TRL[method][2])
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    kw.update(fields)
    return cls(**kw)


# -- the plans --------------------------------------------------------------------------------------
def _check(method: str, options: dict, recipe: dict) -> None:
    """What cannot work, refused before anything loads (``ftk validate``, ``ftk plan``)."""
    t = recipe["training"]
    if t["group_by_length"]:
        raise FtkError(f"training.group_by_length: trainer {method!r} batches preference pairs, which have no "
                       f"single length to group by; set it to false")
    if method == "kto" and options["loss_type"] == "kto" and int(t["batch_size"]) < 2:
        raise FtkError(f"training.batch_size: trainer 'kto' needs at least 2 examples per micro-batch (its KL "
                       f"estimate pairs each prompt with another example's response); got {t['batch_size']}")
    if method == "dpo" and options["loss_type"] == "exo_pair" and options["label_smoothing"] == 0:
        raise FtkError("trainer.label_smoothing: loss_type 'exo_pair' needs it above 0 (the EXO paper uses 1e-3)")


def _plan(method: str, options: dict, ctx, fields: dict, notes: list[str]) -> TrainerPlan:
    recipe = ctx.recipe
    _check(method, options, recipe)
    fields = {**fields, "max_length": int(recipe["data"]["max_length"]),
              "disable_dropout": bool(options["disable_dropout"])}
    _, _, _, seqs, ref_seqs = _TRL[method]
    padding_free = bool(options.get("padding_free"))  # orpo has no such option: always padded
    return TrainerPlan(data="pairs", trainer_class=lambda base: trainer_class(method, base, padding_free),
                       training_arguments=lambda args: trl_config(method, args, **fields),
                       sequences_per_example=seqs, reference_sequences_per_example=ref_seqs, notes=notes,
                       logits_positions=None if method == "orpo" else FUSED_HEAD_POSITIONS)


def _batches(options) -> str:
    return "padding-free batches" if options["padding_free"] else "padded batches (trainer.padding_free false)"


def plan_dpo(options, ctx) -> TrainerPlan:
    return _plan("dpo", options, ctx, {"beta": options["beta"], "loss_type": [options["loss_type"]],
                                       "label_smoothing": options["label_smoothing"]},
                 [f"dpo: beta {options['beta']}, loss {options['loss_type']}; the reference is the base model "
                  f"(adapter disabled); {_batches(options)}"])


def plan_orpo(options, ctx) -> TrainerPlan:
    return _plan("orpo", options, ctx, {"beta": options["beta"]},
                 [f"orpo: beta {options['beta']}; no reference model"])


def plan_kto(options, ctx) -> TrainerPlan:
    fields = {k: options[k] for k in ("beta", "loss_type", "desirable_weight", "undesirable_weight")}
    fields["train_sampling_strategy"] = "sequential"  # the KL estimate's micro-batches are built in order
    return _plan("kto", options, ctx, fields,
                 [f"kto: beta {options['beta']}, loss {options['loss_type']}; each pair gives a desirable and an "
                  f"undesirable example, in one shuffled order (training.seed) for every epoch; {_batches(options)}"])


@hookimpl
def ftk_register_trainers(register):
    why = trl_unavailable()
    register("dpo", plan_dpo, description="Direct Preference Optimization on preference pairs (TRL's DPOTrainer); "
             "the reference is the base model", options_schema=DPO_SCHEMA, unavailable=why)
    register("orpo", plan_orpo, description="Odds-Ratio Preference Optimization, reference-free (TRL's ORPOTrainer)",
             options_schema=ORPO_SCHEMA, unavailable=why)
    register("kto", plan_kto, description="Kahneman-Tversky Optimization on unpaired good/bad examples; a pair "
             "gives one of each (TRL's KTOTrainer)", options_schema=KTO_SCHEMA, unavailable=why)

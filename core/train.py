"""Training on transformers' Trainer: recipe -> TrainingArguments, the recipe's trainer plugin (its
TrainerPlan: Trainer class, loss, data form), our callbacks (JSONL log, NaN stop, the learning guard,
TensorBoard into OUTPUT_DIR/logs), checkpoints/resume, Ctrl-C checkpointing, atomic adapter save: the
same machinery for every trainer."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import shutil
import time
from pathlib import Path

from ftk.defaults import schema_default, section
from ftk.errors import FtkError, PluginError, RunError
from ftk.io import append_jsonl, atomic_write_text, temp_dir
from ftk.run import is_main_process as _is_main  # one definition of "rank 0"
from ftk.distributed import DCP_DIR

CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"


def _callback_classes():
    """Built lazily so importing ftk.train stays cheap (no transformers import)."""
    from transformers import TrainerCallback

    class JsonlLogCallback(TrainerCallback):
        """One JSON line per logging step (loss, lr, grad_norm) and per evaluation (eval_loss), each with
        every other number the trainer logs there (a preference trainer's rewards/*, logps/*, kl, ...)."""

        def __init__(self, path: Path):
            self.path = path

        def on_train_begin(self, args, state, control, **kw):
            # On resume, lines past the checkpoint's step would be logged twice: drop them.
            if state.is_world_process_zero and self.path.exists():
                import json

                keep = []
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= state.global_step:
                            keep.append(line)
                    except ValueError:  # a torn last line from a crash
                        continue
                atomic_write_text(self.path, "".join(k + "\n" for k in keep))

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
            elif "eval_loss" in logs:
                row["eval_loss"] = logs["eval_loss"]
            else:
                return  # the end-of-training summary goes to metrics.json instead
            row.update({k: v for k, v in logs.items() if k not in row and _extra_logged(k, v)})
            append_jsonl(self.path, row)

    class NanStopCallback(TrainerCallback):
        """Stop at the first non-finite loss or gradient norm; checkpoints saved so far stay valid."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            for key in ("loss", "grad_norm"):
                v = logs.get(key)
                if isinstance(v, (int, float)) and not math.isfinite(v):
                    ckpt = _last_checkpoint(Path(args.output_dir))
                    hint = (f"; the last good checkpoint is {ckpt}" if ckpt else "; no checkpoint was saved yet")
                    raise RunError(f"training stopped at step {state.global_step}: {key} is {v} "
                                   f"(lower training.learning_rate or check the data){hint}")

    class LearningGuard(TrainerCallback):
        """Stops a run that cannot learn, whatever the cause (a kernel without backward, a frozen model,
        targets off the loss path, a library change): no gradient at the first optimizer step, or
        trainable weights bit-identical to where they started after the run. See docs/reliability.md."""

        def __init__(self, params: list, precision: str):
            self.params = params  # [(name, tensor)] that require grad
            self.precision = precision
            self.checked = False
            self.start_step = 0
            self.initial: list | None = None

        def on_train_begin(self, args, state, control, **kw):
            # after a resume's weights are loaded: "changed" means changed by this call's steps
            from ftk.distributed import full

            self.start_step = state.global_step
            self.initial = [full(p.detach()).to("cpu", copy=True) for _, p in self.params]

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if self.checked:
                return
            self.checked = True
            import torch

            from ftk.distributed import full

            # whole gradients under FSDP (every rank gathers the same ones, so every rank decides alike)
            grads = [full(p.grad) for _, p in self.params if p.grad is not None]
            norm = (float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
                    if grads else 0.0)
            if norm == 0.0:
                raise RunError(f"training cannot learn: the {len(self.params)} trainable tensors got no gradient at "
                               f"the first optimizer step (global norm 0); nothing flows back from the loss to the "
                               f"adapter: check adapter.target_modules and the quantizer "
                               f"(docs/reliability.md, \"Training that cannot learn\")")
            # fp16's loss scaler skips overflowing steps by design; NanStopCallback stops persistent ones
            if not math.isfinite(norm) and self.precision != "fp16":
                raise RunError(f"training cannot learn: the gradient norm is {norm} at the first optimizer step; "
                               f"check the data and training.learning_rate")

        def unchanged(self, state) -> bool:
            if self.initial is None or state.global_step <= self.start_step:
                return False
            import torch

            from ftk.distributed import full

            now = [full(p.detach()).cpu() for _, p in self.params]  # every rank gathers every tensor
            return all(torch.equal(a, b) for a, b in zip(self.initial, now))

    return JsonlLogCallback, NanStopCallback, LearningGuard


def _extra_logged(key: str, value) -> bool:
    """A logged value train_log.jsonl keeps besides loss/lr/grad_norm/eval_loss: any number except what
    the row holds under another name and transformers' timing figures (runtime, per-second rates)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and key not in ("learning_rate", "epoch", "step") and not key.endswith(("_runtime", "_per_second", "_time")))


def _trainer_class():
    import torch
    from transformers import Trainer

    class FtkTrainer(Trainer):
        ftk_compute_loss = None  # a TrainerPlan's compute_loss, set on the instance
        ftk_strategy = None  # distributed.strategy asked for: checked against the wrapper at the first step
        ftk_sharding = None  # the FSDP settings ftk applied (ftk.distributed.shard)
        ftk_ran = None  # what ftk.distributed.check_ran found
        ftk_offload = False  # model.activation_offloading

        def training_step(self, model, inputs, *args, **kwargs):
            if self.ftk_ran is None and self.ftk_strategy is not None:
                from ftk.distributed import check_ran, describe

                # ``model`` is the wrapped model that trains (DDP, FSDP, or the model itself)
                self.ftk_ran = check_ran(model, self.ftk_strategy, self.ftk_sharding)
                if self.is_world_process_zero():
                    print(describe(self.ftk_ran), flush=True)
            from ftk.model import offloading_context

            with offloading_context(self.ftk_offload):  # forward and backward: TRL and torchtune do the same
                return super().training_step(model, inputs, *args, **kwargs)

        def evaluate(self, *args, **kwargs):
            # An evaluation before training prepares the model for evaluation only (autocast) and marks it
            # prepared, so accelerate never wraps it for training afterwards: measured (transformers 5.24,
            # accelerate 1.15), 2 torchrun processes then trained 2 separate adapters, without DDP and
            # without a word. Undo the marking; the training's own preparation then applies.
            first = not self.accelerator._models
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                if first:
                    _unprepare(self.accelerator, self.model)

        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            # rank 0 writes trainer_state.json, which marks the checkpoint complete, after every rank's files
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.ftk_compute_loss is not None:
                out = self.ftk_compute_loss(self, model, inputs, *args, **kwargs)
            else:
                out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            # torch's own error for this ("element 0 of tensors does not require grad") names no cause
            if model.training and torch.is_grad_enabled() and not loss.requires_grad:
                raise RunError("training cannot learn: the training loss does not depend on any trainable "
                               "parameter (no gradient can flow back from it); check adapter.target_modules "
                               "and the quantizer (docs/reliability.md, \"Training that cannot learn\")")
            return out

    return FtkTrainer


def _unprepare(accelerator, model) -> None:
    """Undo ``accelerator.prepare_model(model, evaluation_mode=True)``: its mark and its autocast forward."""
    model.__dict__.pop("_is_accelerate_prepared", None)
    if model in accelerator._models:
        accelerator._models.remove(model)
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is getattr(type(model), "forward", None):
            model.__dict__.pop("forward", None)  # back to the class's own forward
        else:
            model.forward = original


def trainer_section(recipe: dict) -> dict:
    """The recipe's ``trainer`` section; a recipe that did not go through load_recipe gets the schema's
    default (the core names no training method of its own)."""
    sec = recipe.get("trainer")
    if isinstance(sec, dict) and sec.get("method"):
        return sec
    return schema_default("trainer")


# the Trainer's constructor arguments train() sets; a TrainerPlan's trainer_kwargs adds others
_CORE_TRAINER_KWARGS = ("model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class",
                        "callbacks")


def trainer_plan(recipe: dict, manager, output_dir: str):
    """The chosen trainer's TrainerPlan (its factory called with its options), its data form checked."""
    from ftk.components import DATA_FORMS, TrainerContext, TrainerPlan

    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    from ftk.recipe import filled_recipe

    # a partial recipe (the API's, ftk plan's, a check before loading) gets what load_recipe fills: the factory
    # always sees its options and the recipe whole, as the docs promise
    recipe = filled_recipe(recipe, manager)
    sec = trainer_section(recipe)
    name = sec["method"]
    comp = manager.get("trainer", name)
    options = {k: v for k, v in sec.items() if k != "method"}
    with manager.calling(comp, "planning training"):
        plan = comp.factory(options, TrainerContext(recipe=recipe, output_dir=str(output_dir)))
    who = f"trainer {name!r} (plugin {comp.plugin!r}, package {comp.package})"
    if not isinstance(plan, TrainerPlan):
        raise PluginError(f"{who}: its factory returned {type(plan).__name__}, not ftk.components.TrainerPlan")
    # the plan's own code runs later, inside training: its failures name the plugin too
    manager.wrap_fields(comp, plan, {"trainer_class": "building its Trainer class", "compute_loss": "computing the loss",
                                     "training_arguments": "setting training arguments"})
    if plan.data not in DATA_FORMS:
        raise FtkError(f"trainer.method: {who} trains on {plan.data!r} data, which this ftk cannot prepare "
                       f"(it prepares: {', '.join(DATA_FORMS)})")
    taken = [k for k in _CORE_TRAINER_KWARGS if k in plan.trainer_kwargs]
    if taken:
        raise PluginError(f"{who}: trainer_kwargs may not set {', '.join(taken)} (ftk sets them)")
    for attr, least in (("sequences_per_example", 1), ("reference_sequences_per_example", 0)):
        n = getattr(plan, attr)
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise PluginError(f"{who}: TrainerPlan.{attr} must be a whole number >= {least}, got {n!r}")
    n = plan.logits_positions
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PluginError(f"{who}: TrainerPlan.logits_positions must be None or a whole number >= 1, got {n!r}")
    return plan


def _plan_trainer_class(plan, recipe: dict):
    """ftk's FtkTrainer, or the subclass of it the plan's ``trainer_class`` returns."""
    base = _trainer_class()
    cls = plan.trainer_class(base) if plan.trainer_class is not None else base
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"trainer {trainer_section(recipe)['method']!r}: trainer_class returned {cls!r}, which is "
                          f"not a subclass of the class it was given (ftk's FtkTrainer)")
    return cls


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint is complete once trainer_state.json parses: the Trainer writes it after the model,
    optimizer, scheduler and RNG state (of every rank), and rotates older checkpoints only after that. A
    crash during a save therefore leaves the previous checkpoint intact and this one incomplete. An fsdp
    run's sharded state (dcp/) must also have its metadata and every file it names."""
    import json

    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (path / DCP_DIR).is_dir():
        from ftk.distributed import dcp_missing

        if dcp_missing(path / DCP_DIR):
            return False
    return any(path.glob("adapter_model.*")) or any(path.glob("model*.safetensors"))


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint; incomplete ones (a crash mid-save) are skipped with a note."""
    if not ckpt_dir.is_dir():
        return None
    import re

    found = sorted(((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, p in found:
        if checkpoint_complete(p):
            return str(p)
        if _is_main():
            print(f"note: skipping incomplete checkpoint {p} (interrupted while saving)", flush=True)
    return None


def resolve_resume(resume: str | None, output_dir: str, recipe: dict | None = None) -> str | None:
    """``"latest"`` -> newest checkpoint in OUTPUT_DIR/checkpoints; a path must be a checkpoint folder.
    With ``recipe``: its distributed.strategy must be the one the checkpoint was saved with."""
    if not resume:
        return None
    if resume == "latest":
        ckpt = _last_checkpoint(Path(output_dir) / CHECKPOINTS)
        if ckpt is None:
            raise FtkError(f"--resume: no checkpoint in {Path(output_dir) / CHECKPOINTS} "
                           f"(set training.save_steps to save some)")
    else:
        p = Path(resume)
        if not (p / "trainer_state.json").is_file():
            raise FtkError(f"--resume: {p} is not a training checkpoint (no trainer_state.json)")
        if not checkpoint_complete(p):
            raise FtkError(f"--resume: {p} is incomplete (interrupted while saving); use an earlier checkpoint")
        ckpt = str(p)
    if recipe is not None:
        from ftk.distributed import resume_errors

        errors = resume_errors(ckpt, recipe)
        if errors:
            raise FtkError(errors)
    return ckpt


def training_arguments(recipe: dict, output_dir: str, has_eval: bool):
    """The recipe's training section as TrainingArguments (transformers 5 names)."""
    import torch
    from transformers import TrainingArguments

    from ftk.model import resolve_precision

    t = section(recipe, "training")
    precision = resolve_precision(t["precision"])
    report = [r for r in (t["report_to"] or []) if r not in ("none", "tensorboard")]
    eval_steps = t["eval_steps"]
    return TrainingArguments(
        output_dir=str(Path(output_dir) / CHECKPOINTS),
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["eval_batch_size"] or t["batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        num_train_epochs=float(t["epochs"]),
        max_steps=int(t["max_steps"]),
        learning_rate=t["learning_rate"],
        weight_decay=t["weight_decay"],
        warmup_steps=float(t["warmup_ratio"]),  # a float < 1 is a ratio in transformers 5
        max_grad_norm=t["max_grad_norm"],
        lr_scheduler_type=t["lr_scheduler"],
        optim=t["optimizer"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=int(t["seed"]),
        logging_steps=t["logging_steps"],
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach NanStopCallback, not be averaged away
        save_strategy="steps" if t["save_steps"] else "no",
        save_steps=t["save_steps"] or 500,  # unused when saving is off, but TrainingArguments wants a number
        save_total_limit=t["save_total_limit"],
        eval_strategy="steps" if (eval_steps and has_eval) else "no",
        eval_steps=eval_steps,
        train_sampling_strategy="group_by_length" if t["group_by_length"] else "random",
        dataloader_num_workers=t["dataloader_num_workers"],
        remove_unused_columns=False,  # our collator needs every column (position_ids for packed rows)
        report_to=report or "none",
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        # only under torchrun: naming a backend in a single process makes accelerate expect a process group
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=not _is_main(),
    )


def _tensorboard_callback(logging_dir: Path):
    """transformers' TensorBoard callback writing into OUTPUT_DIR/logs; None with a note when no
    TensorBoard writer is installed (it is a dependency, but an environment may lack it)."""
    from transformers.integrations import TensorBoardCallback

    try:
        tb = TensorBoardCallback()
    except RuntimeError:
        if _is_main():
            print("note: training.report_to names tensorboard but it is not installed (pip install tensorboard); "
                  "no TensorBoard logs are written (train_log.jsonl has the same values)", flush=True)
        return None
    tb.logging_dir = str(logging_dir)
    return tb


def _as_dataset(rows):
    """Lists work as map-style datasets; anything without len() (streaming) becomes an IterableDataset."""
    if rows is None or hasattr(rows, "__len__"):
        return rows
    import torch

    class _Iter(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    return _Iter()


def save_adapter(model, tokenizer, output_dir: str, state_dict: dict | None = None) -> Path:
    """OUTPUT_DIR/adapter in PEFT format plus the tokenizer, swapped in atomically (rank 0 only).
    ``state_dict``: the adapter's tensors when the model cannot give them itself (gathered from FSDP)."""
    out = Path(output_dir) / "adapter"
    tmp = temp_dir(output_dir, ".adapter.")
    old = None
    try:
        model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".adapter.old.{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _attention(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(getattr(base, "config", None), "_attn_implementation", None) or "")


def compile_layers(model) -> list:
    """torch.compile every decoder layer (transformers' GradientCheckpointingLayer) in place; returns the
    layers. Per-layer graphs are shared by identical layers and avoid the graph breaks of a whole-model
    compile (mask building, PEFT wrappers). Only the layer's own forward is compiled: gradient
    checkpointing stays an eager wrapper around it, because compiling the checkpoint into the graph
    leaves the recompute decision to the partitioner, which (torch 2.11, H200) kept every 4-bit matmul
    output: 9.7 GiB instead of 5 GiB for a 7B model. Training runs under dynamo_settings()."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    compiled: dict = {}
    for layer in layers:
        # transformers wraps each layer class's forward in its checkpointing wrapper (functools.wraps)
        raw = getattr(type(layer).forward, "__wrapped__", None)
        if raw is None:
            layer.compile()
            continue
        if raw not in compiled:
            compiled[raw] = torch.compile(raw)
        layer.forward = functools.partial(_layer_forward, compiled[raw], layer)
    return layers


def dynamo_settings(recipe: dict, compiled: list):
    """The dynamo settings that compiled layers train under, restored afterwards (notebooks keep theirs)."""
    if not compiled:
        return contextlib.nullcontext()
    import torch

    return torch._dynamo.config.patch(
        # "auto" must never cost a run: a layer that fails to compile runs eagerly
        suppress_errors=section(recipe, "training")["compile"] == "auto",
        # identical layers share one graph; layer 0 (input without grad) and evaluation add variants
        cache_size_limit=max(torch._dynamo.config.cache_size_limit, 16))


def _layer_forward(fn, layer, *args, **kwargs):
    """What transformers' checkpointing wrapper does, around the compiled forward."""
    import torch

    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(functools.partial(fn, layer, **kwargs), *args)
    return fn(layer, *args, **kwargs)


def uncompile_layers(layers: list) -> None:
    """Back to eager code after training: generation's growing KV cache would recompile every step."""
    for layer in layers:
        layer.__dict__.pop("forward", None)  # the instance attribute compile_layers set
        layer._compiled_call_impl = None  # what nn.Module.compile() sets


def _loss_rows(history: list[dict]) -> list[dict]:
    return [h for h in history if "loss" in h and "eval_loss" not in h]


def train(model, tokenizer, prepared, recipe: dict, manager, output_dir: str, resume: str | None = None,
          plan=None) -> dict:
    """Train the adapter with the recipe's trainer (``plan``: its TrainerPlan, built here when not given)
    on transformers' Trainer; returns the training metrics."""
    from ftk import distributed
    from ftk import model as model_mod

    offload = model_mod.activation_offloading_on(recipe)
    model_mod._check_offloading(offload)  # also for a model load_model did not build
    out = Path(output_dir)
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_resume(resume, output_dir, recipe)
    if plan is None:
        plan = trainer_plan(recipe, manager, output_dir)
    trainer_cls = _plan_trainer_class(plan, recipe)
    strategy = distributed.strategy(recipe)
    if strategy == "fsdp":  # it shards the model once built: after a method's own set-up (a reference adapter)
        trainer_cls = distributed.fsdp_trainer_class(trainer_cls, recipe)
    train_ds, eval_ds = _as_dataset(prepared.train), _as_dataset(prepared.validation)
    if eval_ds is not None and hasattr(eval_ds, "__len__") and len(eval_ds) == 0:
        eval_ds = None
    args = training_arguments(recipe, output_dir, eval_ds is not None)
    if plan.training_arguments is not None:
        args = plan.training_arguments(args)
    JsonlLogCallback, NanStopCallback, LearningGuard = _callback_classes()
    t, d = section(recipe, "training"), section(recipe, "data")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise RunError("training cannot learn: no parameter of the model requires a gradient "
                       "(check the adapter section of the recipe)")
    guard = LearningGuard(trainable, "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
    callbacks = [guard, JsonlLogCallback(out / TRAIN_LOG)]
    if t["stop_on_nan"]:
        callbacks.insert(0, NanStopCallback())
    if "tensorboard" in (t["report_to"] or []):
        tb = _tensorboard_callback(out / "logs")
        if tb is not None:
            callbacks.append(tb)
    callbacks += manager.trainer_callbacks(recipe, output_dir) if manager is not None else []
    # rows come with ftk's collator; a trainer of another data form brings its own (PreparedData.collator
    # then batches the validation rows for perplexity, not what the trainer trains on)
    collator = prepared.collator if plan.data == "rows" else None
    from ftk.model import compile_on

    compiling = compile_on(recipe)
    if compiling and collator is not None and d["packing"] and not collator.pad_to:
        # packed rows are nearly full: padding them to max_length costs little and gives every batch
        # one shape, so the layers compile once instead of again for dynamic lengths
        collator = copy.copy(collator)
        collator.pad_to = int(d["max_length"])
    from ftk import attention

    if collator is not None and d["packing"] and _attention(model) == attention.NAME:
        collator = copy.copy(collator)
        collator.sequence_bounds = True  # the sequences ftk's packed attention computes one by one
    trainer = trainer_cls(model=model, args=args, data_collator=collator, train_dataset=train_ds,
                          eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks, **plan.trainer_kwargs)
    from ftk.console import replace_console

    replace_console(trainer, args.disable_tqdm, _is_main())  # compact lines, not transformers' raw dicts
    if plan.compute_loss is not None:
        trainer.ftk_compute_loss = plan.compute_loss
    trainer.ftk_strategy = strategy
    trainer.ftk_offload = offload
    guard.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # sharding replaced them
    if _is_main():
        for note in plan.notes:
            print(f"note: {note}", flush=True)
    metrics: dict = {}
    if eval_ds is not None and ckpt is None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    compiled = compile_layers(model) if compiling else []  # after the eager evaluation: no no-grad graphs
    started = time.time()
    try:
        with dynamo_settings(recipe, compiled):
            result = trainer.train(resume_from_checkpoint=ckpt)
    except KeyboardInterrupt:
        step = trainer.state.global_step
        saved = _last_checkpoint(Path(args.output_dir))
        if step > 0 and (saved is None or not saved.endswith(f"-{step}")):
            trainer._save_checkpoint(trainer.model, trial=None)
            saved = _last_checkpoint(Path(args.output_dir))
        where = recipe.get("output_dir", output_dir)
        if saved:
            raise RunError(f"interrupted at step {step}; checkpoint saved in {saved}; continue with "
                           f"`ftk run RECIPE --resume` (output_dir {where})") from None
        raise RunError(f"interrupted at step {step} before any optimizer step; nothing to resume") from None
    finally:
        uncompile_layers(compiled)  # eager again for evaluation and generation, and when a run stops
    if guard.unchanged(trainer.state):
        raise RunError(f"training changed nothing: after {trainer.state.global_step - guard.start_step} optimizer "
                       f"step(s) every trainable weight is bit-identical to where it started; check "
                       f"training.learning_rate and the gradient norms in {out / TRAIN_LOG}")
    history = trainer.state.log_history
    losses = _loss_rows(history)
    metrics.update({
        "train_loss": result.training_loss,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "runtime_s": round(time.time() - started, 3),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "resumed_from": ckpt,
        "compiled_layers": len(compiled),
        "distributed": trainer.ftk_ran,
    })
    if eval_ds is not None:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        if "eval_loss_before" in metrics:
            metrics["eval_loss_delta"] = metrics["eval_loss_after"] - metrics["eval_loss_before"]
    # sharded: every rank joins gathering the adapter (rank 0 gets it); other models hold theirs whole
    gathered = distributed.adapter_state(model, True) if distributed.is_sharded(model) else None
    if trainer.is_world_process_zero():
        save_adapter(trainer.model if not hasattr(trainer.model, "module") else trainer.model.module,
                     tokenizer, output_dir, state_dict=gathered)
        print(f"adapter saved to {out / 'adapter'}", flush=True)
    return metrics

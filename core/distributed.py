"""Distributed training: the recipe's ``distributed`` section (docs/multi-gpu.md).

The launchers are the usual ones (``torchrun``, ``accelerate launch``); ftk reads what they set
(``WORLD_SIZE``, ``RANK``). Two strategies:

- ``ddp``: transformers' Trainer wraps the model in DistributedDataParallel, as it always has.
- ``fsdp``: ftk shards the prepared model itself with FSDP2 (``fully_shard`` on each decoder layer, then
  on the root), after the quantizer, the k-bit preparation and the adapter, and keeps accelerate from
  wrapping it again. It never hands ``fsdp=`` to TrainingArguments: measured (torch 2.13, transformers
  5.24, accelerate 1.15), Trainer given ``fsdp="full_shard auto_wrap"`` with ``use_cpu`` under torchrun
  silently trains in DDP (accelerate drops the FSDP plugin for a multi-CPU state). Checkpoints hold the
  adapter and the optimizer as torch.distributed.checkpoint (DCP) shards, which load on any number of
  processes, sharded or not; the adapter itself is gathered into one normal PEFT adapter.

Whatever the strategy, the first training step checks the wrapper that actually runs (``check_ran``)
and stops on anything else, since a fallback would train correctly-looking but with other memory and
other numbers than the recipe asked for.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ftk.defaults import section, section_defaults
from ftk.errors import FtkError, RunError

STRATEGIES = ("ddp", "fsdp")
# Optimizers that step FSDP's sharded (DTensor) parameters. Measured on 2 gloo processes: bitsandbytes'
# (paged_adamw_32bit, paged_adamw_8bit, adamw_8bit) fail ("Operator bitsandbytes.optimizer_update_32bit
# .default does not have a sharding strategy registered"), and so does transformers' Adafactor ("aten.add_
# got mixed torch.Tensor and DTensor").
FSDP_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")
DCP_DIR = "dcp"  # inside a checkpoint of an fsdp run: the adapter and optimizer shards
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def settings(recipe: dict) -> dict:
    """The ``distributed`` section with the schema's defaults, ``fsdp`` included."""
    d = section(recipe, "distributed")
    d["fsdp"] = {**section_defaults("distributed.fsdp"), **(d.get("fsdp") or {})}
    return d


def strategy(recipe: dict) -> str:
    return settings(recipe)["strategy"]


# -- checks before anything loads -----------------------------------------------------------------
def recipe_errors(recipe: dict) -> list[str]:
    """Combinations the schema cannot refuse (``ftk validate``): FSDP options without FSDP, an optimizer
    that cannot step sharded parameters, mixed precision without a half-precision training dtype."""
    raw = recipe.get("distributed")
    if not isinstance(raw, dict) or not isinstance(raw.get("fsdp", {}), dict):
        return []  # the schema reports it
    asked = raw.get("strategy", section_defaults("distributed")["strategy"])
    fs, defaults = raw.get("fsdp", {}), section_defaults("distributed.fsdp")
    if asked != "fsdp":  # options that would be ignored (defaults may be filled in)
        return [f"distributed.fsdp.{k}: applies to distributed.strategy \"fsdp\" only (the strategy is {asked!r})"
                for k, v in fs.items() if k not in defaults or v != defaults[k]]
    if not isinstance(recipe.get("training") or {}, dict):
        return []
    tr = section(recipe, "training")
    out = []
    if tr.get("optimizer") not in FSDP_OPTIMIZERS:
        out.append(f"training.optimizer: {tr.get('optimizer')!r} cannot step the sharded parameters of "
                   f"distributed.strategy \"fsdp\"; use {', '.join(FSDP_OPTIMIZERS)}")
    if fs.get("mixed_precision") is True and tr.get("precision") == "fp32":
        out.append("distributed.fsdp.mixed_precision: true needs training.precision bf16 or fp16 (it is fp32)")
    return out


def launch_errors(recipe: dict) -> list[str]:
    """What the launch asks for that the recipe does not: an accelerate FSDP config
    (``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP) would make Trainer apply its own FSDP,
    or on the CPU silently fall back to DDP; the strategy comes from the recipe."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        return [f"distributed.strategy: the launcher asks for accelerate's FSDP (ACCELERATE_USE_FSDP, from "
                f"`accelerate launch --use_fsdp` or an FSDP accelerate config); ftk takes the strategy from the "
                f"recipe ({strategy(recipe)!r} here): launch with `accelerate launch --multi_gpu --num_processes N` "
                f"and set distributed.strategy"]
    return []


# -- what the quantizer and the sharding need -------------------------------------------------------
def param_dtype(recipe: dict, precision: str, cuda: bool) -> str | None:
    """distributed.fsdp.mixed_precision resolved: the dtype FSDP all-gathers floating-point parameters in
    (None: their own dtype); ``precision``: training.precision resolved ("bf16", "fp16", "fp32")."""
    mp = settings(recipe)["fsdp"]["mixed_precision"]
    dtype = _DTYPES.get(precision)
    if mp is True and dtype is None:
        raise FtkError(f"distributed.fsdp.mixed_precision: true needs training.precision bf16 or fp16 "
                       f"(it resolved to {precision} here)")
    if mp == "auto":
        return dtype if cuda else None
    return dtype if mp else None


def sharding(recipe: dict, precision: str, cuda: bool, processes: int | None = None):
    """The ``ftk.components.Sharding`` a quantizer gets (``ModelContext.sharding``); None under ddp. Set
    for fsdp whatever the number of processes, so that the weights are packed alike in a run and in its
    resumption on another number of processes."""
    if strategy(recipe) != "fsdp":
        return None
    from ftk.components import Sharding

    return Sharding(strategy="fsdp", processes=processes or world_size(),
                    param_dtype=param_dtype(recipe, precision, cuda))


def wrap_classes(model, wrap) -> list[type]:
    """The module classes sharded as one unit each: ``wrap`` ("auto": the model's decoder-layer classes,
    transformers' ``_no_split_modules``) that occur in ``model``."""
    present: dict[str, type] = {}
    for m in model.modules():
        present.setdefault(type(m).__name__, type(m))
    if wrap == "auto":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = [n for n in (getattr(base, "_no_split_modules", None) or []) if n in present]
        if not names:
            raise FtkError(f"distributed.fsdp.wrap: {type(base).__name__} names no decoder-layer class "
                           f"(_no_split_modules) that occurs in it; list the classes to shard as units")
        return [present[n] for n in names]
    missing = [n for n in wrap if n not in present]
    if missing:
        layers = sorted(n for n in present if n.endswith(("Layer", "Block")))
        raise FtkError(f"distributed.fsdp.wrap: no module of class {', '.join(map(repr, missing))} in the model"
                       + (f" (its layer classes: {', '.join(layers)})" if layers else ""))
    return [present[n] for n in wrap]


def shard(model, recipe: dict, precision: str) -> dict:
    """FSDP2 on ``model`` in place (each wrap unit, then the root) over all processes; returns the
    settings that were applied. Needs the process group (the Trainer's arguments create it)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RunError("distributed.strategy: fsdp needs the process group of a torchrun / accelerate launch, "
                       "and none was initialized")
    cuda = torch.cuda.is_available()
    fs = settings(recipe)["fsdp"]
    classes = wrap_classes(model, fs["wrap"])
    pdt = param_dtype(recipe, precision, cuda)
    kw: dict = {"mesh": init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),)),
                "reshard_after_forward": fs["reshard_after_forward"]}
    if pdt is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, pdt), reduce_dtype=torch.float32)
    if fs["cpu_offload"]:
        # pinning needs an accelerator ("Cannot access accelerator device when none is available")
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=cuda)
    units = [m for m in model.modules() if isinstance(m, tuple(classes))]
    for m in units:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    return {"wrap": [c.__name__ for c in classes], "units": len(units) + 1, "param_dtype": pdt,
            "reduce_dtype": "float32" if pdt else None, "reshard_after_forward": fs["reshard_after_forward"],
            "cpu_offload": fs["cpu_offload"], "use_orig_params": "n/a (FSDP2 shards each parameter)"}


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# -- what ran ---------------------------------------------------------------------------------------
def local(t):
    """This process's part of a parameter (its shard under FSDP)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """The whole tensor, gathered from every process under FSDP (collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def parameter_bytes(model) -> dict:
    """Bytes of parameters this process holds (its shards under FSDP): all of them, and the trainable ones."""
    total = trainable = 0
    for p in model.parameters():
        t = local(p)
        n = t.numel() * t.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return {"parameters": total, "trainable": trainable}


def check_ran(model, asked: str, settings_applied: dict | None = None) -> dict:
    """The strategy that runs ``model`` (the Trainer's wrapped model at the first step) against the one asked
    for; a RunError on any other. Returns what the run records: strategy asked and run, processes, the
    wrapper's class and every rank's parameter bytes (collective: every rank calls it)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    world = dist.get_world_size() if dist.is_initialized() else 1
    if isinstance(model, FSDPModule):
        trainable = [p for p in model.parameters() if p.requires_grad]
        whole = [p for p in trainable if not (isinstance(p, DTensor) and p.device_mesh.size() == world)]
        ran = "fsdp" if not whole else f"fsdp with {len(whole)} of {len(trainable)} trainable tensors unsharded"
    elif isinstance(model, DistributedDataParallel):
        ran = "ddp" if world > 1 else "one process"  # torchrun --nproc_per_node 1: a 1-rank DDP
    else:
        ran = "one process" if world == 1 else f"no data parallelism ({type(model).__name__})"
    expected = asked if world > 1 else "one process"
    if ran != expected:
        raise RunError(f"distributed.strategy: {asked!r} was asked for, but {world} process(es) train the model as "
                       f"{ran} ({type(model).__name__}); stopping rather than training with another strategy")
    mine = parameter_bytes(model)
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    out = {"asked": asked, "ran": ran, "processes": world, "wrapper": type(model).__name__,
           "parameter_bytes_per_rank": ranks}
    if settings_applied:
        out["fsdp"] = settings_applied
    return out


def describe(record: dict) -> str:
    """One line for the terminal."""
    b = record["parameter_bytes_per_rank"]
    mib = ", ".join(f"{r['parameters'] / 2**20:.2f}" for r in b)
    return (f"distributed: {record['ran']} on {record['processes']} process(es) ({record['wrapper']}); "
            f"parameter MiB per rank: {mib}")


# -- state of the adapter and optimizer -----------------------------------------------------------
def _trainable_names(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapter_state(model, full_tensors: bool) -> dict:
    """The trainable parameters' state dict. ``full_tensors``: gathered plain CPU tensors on rank 0 ({} on
    the others; collective); else this rank's DTensor shards (plain tensors when not sharded), for DCP.
    Filtered by trainable names: torch's ``ignore_frozen_params`` still returns the tied frozen head, and a
    4-bit model's state dict adds its quant-state entries."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(ignore_frozen_params=True, full_state_dict=full_tensors, cpu_offload=full_tensors)
    names = _trainable_names(model)
    return {k: v for k, v in get_model_state_dict(model, options=opts).items() if k in names}


def save_checkpoint_state(model, optimizer, checkpoint: str | os.PathLike) -> None:
    """The adapter and optimizer shards into CHECKPOINT/dcp (every rank writes its own file, the
    coordinator the metadata last). Stops when rank 0 cannot see every rank's file: output_dir is then
    not shared between nodes, and the checkpoint could never be resumed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    where = Path(checkpoint) / DCP_DIR
    with _one_process_quiet():
        dcp.save({"model": adapter_state(model, False), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(where))
    if (not dist.is_initialized() or dist.get_rank() == 0) and (missing := dcp_missing(where)):
        raise RunError(f"output_dir: {where} lacks {', '.join(missing[:3])} that other processes wrote: "
                       f"output_dir must be on storage that every node sees (docs/multi-gpu.md)")


def load_checkpoint_state(model, optimizer, checkpoint: str | os.PathLike) -> None:
    """The adapter and optimizer from CHECKPOINT/dcp, resharded for this run's processes (or into an
    unsharded model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": adapter_state(model, False), "optim": get_optimizer_state_dict(model, optimizer)}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(Path(checkpoint) / DCP_DIR))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns at every save and load in one process ("assuming the intent is to save in a single
    process"), which is what ftk means there."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to")
        yield


def dcp_missing(where: Path) -> list[str]:
    """Files a DCP folder's metadata names that are absent or short (all of them when the metadata itself
    is missing or unreadable: an interrupted save)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(where)).read_metadata()
    except Exception:  # noqa: BLE001 - absent, torn or foreign: the save did not finish
        return [".metadata"]
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return sorted(f for f, size in need.items() if not (where / f).is_file() or (where / f).stat().st_size < size)


def checkpoint_strategy(checkpoint: str | os.PathLike) -> str:
    """Which strategy's format a checkpoint folder holds: fsdp (DCP shards) or ddp (the Trainer's files)."""
    return "fsdp" if (Path(checkpoint) / DCP_DIR).is_dir() else "ddp"


def resume_errors(checkpoint: str | os.PathLike, recipe: dict) -> list[str]:
    saved, asked = checkpoint_strategy(checkpoint), strategy(recipe)
    if saved == asked:
        return []
    return [f"distributed.strategy: {checkpoint} was saved by a {saved!r} run and this recipe asks for {asked!r}; "
            f"resume it with distributed.strategy \"{saved}\""]


# -- the Trainer ------------------------------------------------------------------------------------
def fsdp_trainer_class(base: type, recipe: dict) -> type:
    """``base`` (ftk's Trainer, or a training method's subclass of it) that shards its model once built
    (after the method's own set-up, e.g. TRL's reference adapter; in one process it stays whole): no DDP
    wrap, the adapter gathered for saving, DCP checkpoints of the adapter and optimizer."""
    import torch

    class FsdpTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            from torch.distributed.fsdp import FSDPModule

            wrap_classes(self.model, settings(recipe)["fsdp"]["wrap"])  # checked in one process too
            if self.args.world_size > 1:  # the arguments brought the process group up
                precision = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
                self.ftk_sharding = shard(self.model, recipe, precision)

            prepare = self.accelerator.prepare_model

            def prepare_model(model, device_placement=None, evaluation_mode=False):
                # a model FSDP already shards: autocast only (no DDP, no move); measured, DDP around it fails
                if isinstance(model, FSDPModule):
                    return prepare(model, device_placement=False, evaluation_mode=True)
                return prepare(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

            self.accelerator.prepare_model = prepare_model

        def create_optimizer(self, model=None):
            # an evaluation before training may leave units unsharded: the optimizer must get the shards
            from torch.distributed.fsdp import FSDPModule

            for m in (model or self.model).modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            return super().create_optimizer(model)

        def training_step(self, model, inputs, num_items_in_batch=None):
            from torch.distributed.fsdp import FSDPModule

            if isinstance(model, FSDPModule) and self.args.gradient_accumulation_steps > 1:
                # FSDP2's no_sync: reduce-scatter on the last micro-batch of an accumulation window only
                model.set_requires_gradient_sync(self.accelerator.sync_gradients)
            return super().training_step(model, inputs, num_items_in_batch)

        def _save(self, output_dir=None, state_dict=None):
            # PEFT cannot save a sharded model itself (safetensors: "invalid python storage"): every rank
            # joins the gather, rank 0 writes the plain adapter
            if is_sharded(self.model):
                state_dict = adapter_state(self.model, True)
            super()._save(output_dir, state_dict=state_dict)

        def _save_optimizer_and_scheduler(self, output_dir):
            save_checkpoint_state(self.model, self.optimizer, output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            pass  # the adapter comes back with the optimizer (_load_optimizer_and_scheduler), resharded

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None:
                return
            load_checkpoint_state(self.model, self.optimizer, checkpoint)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"),
                                                         weights_only=True))

    FsdpTrainer.__name__ = FsdpTrainer.__qualname__ = f"Fsdp{base.__name__}"
    return FsdpTrainer


# -- after training ---------------------------------------------------------------------------------
def gather_for_evaluation(model) -> None:
    """Every rank: all-gather the sharded model and keep it whole, so that rank 0 alone can evaluate and
    generate with it (collective; afterwards every rank holds the whole model, as under DDP). FSDP's
    modules are then no longer marked as managed: transformers' generate() would otherwise wait for the
    other ranks at every token (synced_gpus)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    for m in model.modules():
        if getattr(m, "_is_fsdp_managed_module", False):
            m._is_fsdp_managed_module = False


def close() -> None:
    """End this process's part in a multi-process run: leave the process group cleanly (no collective:
    a rank may leave while rank 0 still evaluates). Without it each worker's gloo/NCCL group is torn down
    by interpreter exit, which torch warns about and which can abort a worker ("terminate called without
    an active exception") while its background threads still run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""`ftk run`: the whole pipeline over the registry. The core calls components only by the names the
recipe chose; the concrete work lives in the plugins and in ftk.data / ftk.model / ftk.train /
ftk.evaluate."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftk.errors import FtkError, PluginFailure, RunError
from ftk.io import atomic_write_json

REDACT_KEYS = ("api_key", "apikey", "secret", "password")


def secret_key(key: str) -> bool:
    """A key that names a secret: contains api_key/secret/password, or ends in "token" (hub_token,
    authToken) -- not every key that merely contains it (BLEU's "tokenize", "tokenizer")."""
    low = str(key).lower()
    return any(s in low for s in REDACT_KEYS) or low.endswith("token")


def redact(obj):
    """Drop secret-looking values so they never reach recipe.json, manifest.json, logs or reports."""
    if isinstance(obj, dict):
        return {k: ("***" if secret_key(k) and isinstance(v, str) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or its closest ancestor that exists (what a not-yet-created folder lands in)."""
    return path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> Path:
    """Refuse to clobber a previous run; fail early if the folder cannot be written."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FtkError(f"output_dir: {out} exists and is not a folder")
    # only rank 0 writes, so only rank 0 judges the folder (other ranks may start after it wrote)
    if is_main_process() and out.is_dir() and any(out.iterdir()) and not resume and not overwrite:
        raise FtkError(f"output_dir: {out} is not empty; pass --resume to continue that run "
                       f"or --overwrite to replace it")
    if resume and resume != "latest" and not Path(resume).exists():
        raise FtkError(f"--resume: checkpoint {resume} does not exist")
    probe_parent = nearest_existing(out)
    if not probe_parent.is_dir():
        raise FtkError(f"output_dir: {out} cannot be created: {probe_parent} is a file, not a folder")
    if not os.access(probe_parent, os.W_OK):
        raise FtkError(f"output_dir: {out} is not writable (no write permission on {probe_parent})")
    return out


def environment_info() -> dict:
    import importlib.metadata as md

    vers = {}
    for pkg in ("ftk", "torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    from ftk.model import cpu_info

    # the CPU's features decide kernels and precision ("auto"): every recorded figure needs them
    hw = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
          "cpu": cpu_info()}
    try:
        import torch

        hw["cuda"] = torch.cuda.is_available()
        if hw["cuda"]:
            hw["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return {"versions": vers, "hardware": hw}


@dataclass
class RunState:
    """A run between set-up and results: what `ftk run` and LLAMATrainer share."""

    recipe: dict
    manager: object
    out: Path
    tokenizer: object
    prepared: object
    model: object
    model_info: dict
    manifest: dict
    trainer: object = None  # the recipe's trainer as a ftk.components.TrainerPlan
    seconds: dict = field(default_factory=dict)  # wall time of each phase, metrics.json "seconds"


def prepare_run(recipe: dict, manager, resume: str | None = None, overwrite: bool = False) -> RunState:
    """Output folder, every check that can be made before training, data, model; writes recipe.json."""
    from ftk import distributed

    errors = distributed.recipe_errors(recipe) + distributed.launch_errors(recipe)
    if errors:
        raise FtkError(errors)
    out = check_output_dir(recipe["output_dir"], resume, overwrite)
    if overwrite and not resume and out.exists() and is_main_process():
        import shutil

        shutil.rmtree(out)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat()
    from ftk import data as data_mod
    from ftk import evaluate as eval_mod
    from ftk import model as model_mod
    from ftk import train as train_mod

    # Everything that can be known before training is checked before training: a run must not die
    # at the end because of something the recipe already said.
    train_mod.resolve_resume(resume, str(out), recipe)
    trainer = train_mod.trainer_plan(recipe, manager, str(out))  # before any data: its data form is checked
    metrics_objs = eval_mod.build_metrics(recipe, manager)
    t = time.perf_counter()
    tokenizer = model_mod.load_tokenizer(recipe)
    prepared = data_mod.prepare_data(recipe, tokenizer, manager, form=trainer.data)
    check_eval_data(prepared, metrics_objs)
    seconds = {"data": round(time.perf_counter() - t, 3)}
    t = time.perf_counter()
    model, model_info = model_mod.load_model(recipe, manager, tokenizer)
    seconds["model"] = round(time.perf_counter() - t, 3)
    check_disk_space(out, model_info, recipe)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "recipe.json", redact(dict(recipe)))
    used = _used_components(recipe, manager)
    manifest = {
        "started": started,
        **environment_info(),
        "plugins": sorted({f"{c.package}=={c.version}" for c in used}),
        "components": [f"{c.key} ({c.plugin})" for c in used],
        "data": {"fingerprint": prepared.fingerprint, "stats": prepared.stats},
        "model": model_info,
    }
    return RunState(recipe, manager, out, tokenizer, prepared, model, model_info, manifest, trainer, seconds)


def train_run(state: RunState, resume: str | None = None) -> dict:
    from ftk import train as train_mod

    t = time.perf_counter()
    try:
        with _disk_errors(state.out):
            metrics = train_mod.train(state.model, state.tokenizer, state.prepared, state.recipe, state.manager,
                                      str(state.out), resume=resume, plan=state.trainer)
        state.manifest["distributed"] = metrics.get("distributed")  # the strategy that ran, per-rank bytes
        state.seconds["train"] = round(time.perf_counter() - t, 3)
        return metrics
    except (RunError, PluginFailure) as e:
        # the folder says why it has checkpoints and logs but no adapter or report
        if is_main_process():
            state.manifest.update(status="failed", error=str(e),
                                  finished=_dt.datetime.now(_dt.timezone.utc).isoformat())
            atomic_write_json(state.out / "manifest.json", redact(state.manifest))
        raise


def finish_run(state: RunState, metrics: dict) -> dict:
    """Evaluate (rank 0) and write metrics.json, manifest.json and report.md; returns ``metrics``."""
    from ftk.distributed import gather_for_evaluation

    gather_for_evaluation(state.model)  # a sharded model: every rank gathers it whole for rank 0 to evaluate
    if not is_main_process():
        return metrics
    from ftk import evaluate as eval_mod
    from ftk import report

    with _disk_errors(state.out):
        t, parts = time.perf_counter(), {}
        metrics.update(eval_mod.evaluate_run(state.model, state.tokenizer, state.prepared, state.recipe,
                                             state.manager, str(state.out), seconds=parts))
        # where the run's time went: data, model loading, training (its own evaluations included), and the
        # final evaluation, split per scored model into loss / generation / metrics / model / pairs
        metrics["seconds"] = {**state.seconds, "evaluation": round(time.perf_counter() - t, 3),
                              "evaluation_parts": parts}
        atomic_write_json(state.out / "metrics.json", metrics)
        state.manifest.update(status="completed", finished=_dt.datetime.now(_dt.timezone.utc).isoformat())
        atomic_write_json(state.out / "manifest.json", redact(state.manifest))
        report.write_report(state.out, state.recipe, metrics, state.manager)
    return metrics


def run_recipe(recipe: dict, manager, resume: str | None = None, overwrite: bool = False) -> dict:
    from ftk import distributed

    try:
        state = prepare_run(recipe, manager, resume, overwrite)
        return finish_run(state, {"train": train_run(state, resume)})
    finally:
        distributed.close()  # a torchrun worker leaves its process group before it exits


@contextlib.contextmanager
def _disk_errors(out: Path):
    """A full or read-only disk mid-run becomes one line naming the last good checkpoint."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            from ftk import train as train_mod

            last = train_mod._last_checkpoint(out / train_mod.CHECKPOINTS)
            raise RunError(f"cannot write to {e.filename or out}: {e.strerror}; "
                           + (f"last good checkpoint {last}: free space, then `ftk run RECIPE --resume`"
                              if last else "no checkpoint was saved")) from None
        raise


def check_eval_data(prepared, metrics_objs) -> None:
    needs = {m.requires for _, m in metrics_objs}
    if "loss" in needs and not prepared.validation_unpacked:
        names = ", ".join(dict.fromkeys(n for n, m in metrics_objs if m.requires == "loss"))
        raise FtkError(f"evaluation.metrics: {names} need(s) the loss over a validation split; set "
                       "data.validation_size > 0 or use a dataset that has one")
    if "text" in needs and not prepared.eval_pairs:
        raise FtkError("evaluation.metrics: the generation metrics need (prompt, reference) pairs from the "
                       "validation split, and it has none; set data.validation_size > 0")


def check_disk_space(out: Path, model_info: dict, recipe: dict) -> None:
    """Refuse to start when the output filesystem cannot hold the adapter and checkpoints."""
    import shutil

    t = recipe.get("training") or {}
    trainable = int(model_info.get("trainable_parameters") or 0)
    # adapter (fp32) + each kept checkpoint (adapter + Adam's two moments) + logs and margin
    kept = (t.get("save_total_limit") or 2) + 1 if t.get("save_steps") else 0
    needed = trainable * 4 * (1 + 3 * kept) + 16 * 1024**2
    free = shutil.disk_usage(nearest_existing(out)).free
    if free < needed:
        raise FtkError(f"output_dir: {out} has {free / 1024**2:.0f} MiB free; this run needs about "
                       f"{needed / 1024**2:.0f} MiB for the adapter and checkpoints")


def _used_components(recipe: dict, manager):
    from ftk import train as train_mod

    comps = [manager.get("quantizer", recipe["model"]["quantization"]["method"]),
             manager.get("adapter", recipe["adapter"]["method"]),
             manager.get("trainer", train_mod.trainer_section(recipe)["method"])]
    comps += [manager.get("dataset", d["loader"]) for d in recipe["data"]["datasets"]]
    comps += [manager.get("metric", m["name"]) for m in recipe["evaluation"]["metrics"]]
    comps += [manager.get("callback", c["name"]) for c in recipe.get("callbacks") or [] if c.get("enabled", True)]
    return comps


__all__ = ["run_recipe", "prepare_run", "train_run", "finish_run", "check_output_dir", "redact", "RunError"]

"""`ftk compare RUN_DIR...`: what differs between runs' recipes, their metrics side by side, and their loss
curves in one picture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

# the run folder is each column's name already: every run's differs, so it says nothing
_NOT_COMPARED = ("output_dir",)
# train metrics that tell a better run (lower is better); the others (first_loss, steps, runtime) give no verdict
_TRAIN_LOWER = ("train_loss", "final_loss", "eval_loss_after", "eval_loss_delta")


def load_run(path: str) -> dict:
    """{"name", "recipe", "metrics", "log"} of a run folder; FtkError naming it when it is not one."""
    from ftk.errors import FtkError

    d = Path(path)
    loaded = {}
    for name in ("recipe", "metrics"):
        f = d / f"{name}.json"
        if not f.is_file():
            raise FtkError(f"{path}: not an ftk run folder (no {f.name})")
        try:
            loaded[name] = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FtkError(f"{path}: {f.name} is unreadable ({e})") from None
        if not isinstance(loaded[name], dict):
            raise FtkError(f"{path}: {f.name} is not a JSON object")
    return {"name": path, **loaded, "log": d / "train_log.jsonl"}


def flatten(obj, prefix: str = "") -> dict:
    """{"training.learning_rate": 0.001, "data.datasets.0.path": ...}; empty dicts and lists as leaves."""
    if isinstance(obj, dict) and obj:
        items = obj.items()
    elif isinstance(obj, list) and obj:
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recipe_diff(recipes: list[dict]) -> dict[str, list]:
    """{dotted key: [value per run]} for the keys whose values differ; a key a run lacks counts as null
    (a recipe from an older ftk lacks later defaults: not a difference in itself)."""
    flat = [flatten({k: v for k, v in r.items() if k not in _NOT_COMPARED}) for r in recipes]
    out = {}
    for k in dict.fromkeys(k for f in flat for k in f):
        vals = [f.get(k) for f in flat]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            out[k] = vals
    return out


def _directions(recipes: list[dict]) -> dict[str, bool]:
    """{key: higher is better} as the runs' metrics declare it (ftk.evaluate); {} when the plugins that
    declare them cannot be loaded (then no verdicts)."""
    from ftk.errors import FtkError

    try:
        from ftk.evaluate import metric_directions
        from ftk.manager import get_manager

        mgr = get_manager()
        out: dict[str, bool] = {}
        for r in recipes:
            for k, v in metric_directions(r, mgr).items():
                out.setdefault(k, v)
        return out
    except FtkError:
        return {}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metrics_rows(runs: list[dict]) -> dict[str, dict]:
    """{"train.final_loss": {"values": [...], "higher_is_better": bool | None, "best": [run index, ...]}}:
    every number of metrics.json's train, base and finetuned sections; "best" is empty without a direction
    or when the runs tie."""
    from ftk.report import _NOT_METRICS

    directions = _directions([r["recipe"] for r in runs])
    rows: dict[str, dict] = {}
    for section in ("train", "base", "finetuned"):
        parts = [r["metrics"].get(section) if isinstance(r["metrics"].get(section), dict) else {} for r in runs]
        for key in dict.fromkeys(k for p in parts for k in p):
            vals = [p.get(key) for p in parts]
            if not any(_number(v) for v in vals):
                continue
            if section == "train":
                hib = False if key in _TRAIN_LOWER else None
            else:
                hib = None if key in _NOT_METRICS else directions.get(key)
            nums = [v for v in vals if _number(v)]
            best: list[int] = []
            if hib is not None and len(nums) > 1 and len(set(nums)) > 1:
                top = max(nums) if hib else min(nums)
                best = [i for i, v in enumerate(vals) if _number(v) and v == top]
            rows[f"{section}.{key}"] = {"values": vals, "higher_is_better": hib, "best": best}
    return rows


def plot_losses(runs: list[dict], path: Path) -> bool:
    """Every run's training loss (line) and validation loss (markers, same colour) on one panel, written
    atomically; False when no run has a loss point or matplotlib is missing."""
    from ftk.report import _pyplot, _save, read_train_log

    curves = [(r["name"], *read_train_log(r["log"])) for r in runs]
    plt = _pyplot() if any(t or e for _, t, e in curves) else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (name, train, evals) in enumerate(curves):
        color = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.2, label=f"{name} (training)")
        if evals:
            ax.plot(*zip(*evals), color=color, marker="o", linestyle="--", linewidth=1,
                    label=f"{name} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, plt, path)
    return True


def _cell(v) -> str:
    """A recipe value as written (0.001 stays 0.001; strings unquoted)."""
    if v is None:
        return "–"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _metric_cell(v) -> str:
    from ftk.report import _fmt  # the report's number format

    return _fmt(v)


def format_compare(result: dict) -> str:
    from ftk.tables import format_columns

    names = result["runs"]
    diff, rows = result["recipe_diff"], result["metrics"]
    out = ["recipe differences" + ("" if diff else ": none (output_dir aside)")]
    if diff:
        out.append(format_columns([("key", *names)] + [(k, *map(_cell, v)) for k, v in diff.items()]))
    out += ["", "metrics (* best of the runs, where the metric says which way is better)"]
    if rows:
        out.append(format_columns([("metric", *names)] + [
            (k, *(_metric_cell(v) + ("*" if i in row["best"] else "") for i, v in enumerate(row["values"])))
            for k, row in rows.items()]))
    else:
        out.append("no metrics recorded")
    out += ["", f"loss curves: {result['picture']}" if result["picture"] else
            "loss curves: none (no train_log.jsonl with losses, or matplotlib is missing)"]
    return "\n".join(out)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--out", "picture", default="compare.png", show_default=True, metavar="PICTURE.png",
              help="Where to write the overlaid loss curves.")
def compare(run_dirs, as_json, picture):
    """Compare runs: the recipe keys that differ, the metrics side by side (the best marked where the metric
    declares a direction), and one picture with their loss curves overlaid."""
    runs = [load_run(d) for d in run_dirs]
    result = {"runs": [r["name"] for r in runs],
              "recipe_diff": recipe_diff([r["recipe"] for r in runs]),
              "metrics": metrics_rows(runs)}
    result["picture"] = picture if plot_losses(runs, Path(picture)) else None
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_compare(result))

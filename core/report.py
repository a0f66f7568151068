"""OUTPUT_DIR/report.md: what a user reads after a run. Every piece is optional (no base model, no
training log, no samples): what is missing is said, never faked."""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

from ftk.io import atomic_write_bytes, atomic_write_text

_NOT_METRICS = ("eval_samples", "eval_tokens", "eval_pairs")
# What preference trainers log (TRL's names; validation values carry an "eval_" prefix): the reward panels
REWARD_CURVES = (("rewards/accuracies", "reward accuracy", "share of pairs, chosen reward higher"),
                 ("rewards/margins", "reward margin", "mean chosen - rejected reward"))


def read_log_series(path: Path, keys) -> dict[str, list[tuple[float, float]]]:
    """{key: [(step, value), ...]} for each of ``keys`` from train_log.jsonl, finite numbers only; torn or
    foreign lines skipped."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line after a crash
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            continue
        for key, dest in out.items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                dest.append((rec["step"], float(v)))
    return out


def read_train_log(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train points, eval points) of the loss as (step, value) from train_log.jsonl."""
    series = read_log_series(path, ("loss", "eval_loss"))
    return series["loss"], series["eval_loss"]


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display on servers); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, path: Path) -> None:
    """Write the figure as a PNG, atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _draw(ax, train, evals, what: str) -> None:
    """Training points as a line, validation points as markers, on one panel."""
    if train:
        ax.plot(*zip(*train), label=f"training {what}", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label=f"validation {what}", color="tab:orange", marker="o", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()


def time_split(seconds) -> list[str]:
    """The report's "Time" lines from metrics.json "seconds" (none when the run did not record it)."""
    if not isinstance(seconds, dict) or not seconds:
        return []
    main = ", ".join(f"{k} {seconds[k]:.1f} s" for k in ("data", "model", "train", "evaluation") if k in seconds)
    lines = ["## Time", "", f"- {main}"]
    for scored, parts in (seconds.get("evaluation_parts") or {}).items():
        lines.append(f"- evaluation of the {scored} model: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
    return lines + [""]


def plot_loss_curve(train, evals, path: Path, ylabel: str = "loss (mean token NLL, nats)") -> bool:
    """Write the PNG atomically; False when there is nothing to plot or matplotlib is missing."""
    plt = _pyplot() if train or evals else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    _draw(ax, train, evals, "loss")
    ax.set_ylabel(ylabel)
    _save(fig, plt, path)
    return True


def read_reward_log(path: Path) -> dict[str, tuple[list, list]]:
    """{TRL key: (train points, eval points)} for the reward curves train_log.jsonl has points of (none: {})."""
    series = read_log_series(path, [k for key, *_ in REWARD_CURVES for k in (key, "eval_" + key)])
    return {key: (series[key], series["eval_" + key]) for key, *_ in REWARD_CURVES
            if series[key] or series["eval_" + key]}


def plot_reward_curves(curves: dict[str, tuple[list, list]], path: Path) -> bool:
    """One panel per reward curve of :func:`read_reward_log` side by side, in one PNG written atomically;
    False when there is nothing to plot or matplotlib is missing."""
    plt = _pyplot() if curves else None
    if plt is None:
        return False
    panels = [panel for panel in REWARD_CURVES if panel[0] in curves]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (key, what, label) in zip(axes[0], panels):
        _draw(ax, *curves[key], what)
        ax.set_ylabel(f"{what} ({label})")
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance
            ax.set_ylim(-0.02, 1.02)
    _save(fig, plt, path)
    return True


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def metrics_table(metrics: dict, higher_is_better: dict[str, bool] | None = None) -> list[str]:
    """Markdown rows: base vs fine-tuned with the change, or whichever side exists. ``higher_is_better``:
    {key: bool} as the recipe's metrics declare it (``ftk.evaluate.metric_directions``; by default what the
    default metrics declare); the "better" column gives no verdict for a key it lacks."""
    base, ft = metrics.get("base") or {}, metrics.get("finetuned") or {}
    keys = list(dict.fromkeys([*ft, *base]))
    keys = [k for k in keys if k not in _NOT_METRICS] + [k for k in _NOT_METRICS if k in keys]
    if not keys:
        return ["No evaluation metrics were recorded."]
    if base and ft:
        rows = ["| metric | base | fine-tuned | change | better |", "|---|---:|---:|---:|:---:|"]
        if higher_is_better is None:
            from ftk.evaluate import metric_directions

            higher_is_better = metric_directions({})
        for k in keys:
            b, f = base.get(k), ft.get(k)
            delta = better = ""
            if isinstance(b, (int, float)) and isinstance(f, (int, float)) and k not in _NOT_METRICS:
                d = f - b
                rel = f" ({d / b:+.1%})" if b and math.isfinite(b) and math.isfinite(d) else ""
                delta = f"{d:+.4f}{rel}" if math.isfinite(d) else str(d)
                if f == b:
                    better = "same"
                elif k not in higher_is_better:  # its metric does not say which way it improves: no guess
                    better = "–"
                else:
                    better = "fine-tuned" if (f > b) == higher_is_better[k] else "base"
            rows.append(f"| {k} | {_fmt(b)} | {_fmt(f)} | {delta} | {better} |")
        return rows
    side, vals = ("fine-tuned", ft) if ft else ("base", base)
    rows = [f"| metric | {side} |", "|---|---:|"]
    rows += [f"| {k} | {_fmt(vals.get(k))} |" for k in keys]
    return rows


def same_as_base(metrics: dict) -> list[str]:
    """Metrics on which the fine-tuned model scores exactly as the base (a sign it learned nothing)."""
    base, ft = (metrics or {}).get("base") or {}, (metrics or {}).get("finetuned") or {}
    return [k for k, f in ft.items() if k not in _NOT_METRICS and isinstance(f, (int, float))
            and not isinstance(f, bool) and base.get(k) == f]


def same_warning(metrics: dict) -> str | None:
    """One line to show beside any table that says "same"; None when nothing is identical."""
    same = same_as_base(metrics)
    if not same:
        return None
    return (f"warning: the fine-tuned model scores exactly as the base on {', '.join(same)}: the adapter may "
            f"have learned nothing (check grad_norm in train_log.jsonl, training.learning_rate and "
            f"adapter.target_modules)")


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside the text, so generations cannot break out."""
    longest = max((len(m) for m in re.findall(r"`+", text or "")), default=0)
    f = "`" * max(3, longest + 1)
    return f"{f}text\n{text or ''}\n{f}"


def recipe_summary(recipe: dict) -> list[str]:
    model = recipe.get("model") or {}
    q = dict(model.get("quantization") or {})
    ad = dict(recipe.get("adapter") or {})
    data = recipe.get("data") or {}
    tr = recipe.get("training") or {}
    ev = recipe.get("evaluation") or {}

    def opts(d: dict, skip: str) -> str:
        rest = {k: v for k, v in d.items() if k != skip}
        return f"`{d.get(skip, '?')}` " + (json.dumps(rest, sort_keys=True) if rest else "")

    lines = [f"- **Model**: `{model.get('name', '?')}`",
             f"- **Quantization**: {opts(q, 'method')}" if q else "- **Quantization**: none",
             f"- **Adapter**: {opts(ad, 'method')}" if ad else "- **Adapter**: none"]
    if isinstance(recipe.get("trainer"), dict):
        lines.append(f"- **Trainer**: {opts(recipe['trainer'], 'method')}")
    for ds in data.get("datasets") or []:
        where = ds.get("path") or ds.get("name") or ""
        lines.append(f"- **Dataset** `{ds.get('loader', '?')}` {where} (template {ds.get('template', 'default')}"
                     f"{', max ' + str(ds['max_examples']) if ds.get('max_examples') else ''})")
    if data:
        lines.append(f"- **Data**: max_length {data.get('max_length')}, packing {data.get('packing')}, "
                     f"mixing {data.get('mixing')}, validation_size {data.get('validation_size')}")
    if tr:
        keys = ("epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate",
                "lr_scheduler", "optimizer", "precision", "seed")
        lines.append("- **Training**: " + ", ".join(f"{k} {tr[k]}" for k in keys if k in tr))
    if ev:
        names = [m["name"] if isinstance(m, dict) else m for m in ev.get("metrics") or []]
        lines.append(f"- **Evaluation**: metrics {', '.join(names)}; max_samples {ev.get('max_samples')}; "
                     f"generation {json.dumps(ev.get('generation') or {}, sort_keys=True)} "
                     f"({_decoding(ev.get('generation') or {})})")
    return lines


def _decoding(gen: dict) -> str:
    """What the generation settings resolved to: beam search, greedy or sampling (one rule: ftk.generation)."""
    from ftk.errors import FtkError
    from ftk.generation import resolve_decoding

    try:
        d = resolve_decoding(gen)
    except FtkError:  # a recipe written before the rule: say so rather than fail the report
        return "decoding not resolvable"
    if d["do_sample"]:
        return f"sampling at temperature {d['temperature']}, top_p {d['top_p']}, {d['num_beams']} beam(s)"
    return "greedy" if d["num_beams"] == 1 else f"beam search, {d['num_beams']} beams"


def write_report(output_dir, recipe: dict, metrics: dict, manager=None) -> Path:
    """``manager``: where the recipe's metrics are looked up for their declared directions (default: the
    installed plugins)."""
    from ftk.evaluate import metric_directions
    from ftk.run import redact  # secret-looking option values never reach the report

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# ftk run report", ""]
    md += ["## Recipe", ""] + recipe_summary(redact(recipe or {})) + [""]
    md += ["## Metrics", ""] + metrics_table(metrics or {}, metric_directions(recipe or {}, manager)) + [""]
    warning = same_warning(metrics or {})
    if warning:
        md += [f"**Warning**: {warning.removeprefix('warning: ')}.", ""]
    fin = (metrics or {}).get("finetuned") or (metrics or {}).get("base") or {}
    if "eval_samples" in fin or "eval_tokens" in fin:
        md += [f"Generation metrics over {fin.get('eval_samples', 0)} validation prompts; loss metrics "
               f"over {fin.get('eval_tokens', 0)} validation tokens"
               + (f"; preference metrics over {fin['eval_pairs']} validation pairs, rewards relative to the base "
                  f"model" if "eval_pairs" in fin else "")
               + " (see docs/evaluation.md for the formulas).", ""]
    train = (metrics or {}).get("train")
    if isinstance(train, dict) and train:
        md += ["## Training", ""] + [f"- {k}: {_fmt(v)}" for k, v in train.items()
                                     if isinstance(v, (int, float, str, bool)) or v is None] + [""]
    md += time_split((metrics or {}).get("seconds"))
    md += ["## Loss curve", ""]
    tr_pts, ev_pts = read_train_log(out / "train_log.jsonl")
    rewards = read_reward_log(out / "train_log.jsonl")  # only a preference trainer logs rewards
    ylabel = "loss (the preference trainer's objective)" if rewards else "loss (mean token NLL, nats)"
    if plot_loss_curve(tr_pts, ev_pts, out / "loss_curve.png", ylabel):
        md += ["![training and validation loss](loss_curve.png)", "",
               f"{len(tr_pts)} training and {len(ev_pts)} validation points from train_log.jsonl.", ""]
    else:
        md += ["No loss curve: " + ("train_log.jsonl has no loss values." if (out / "train_log.jsonl").exists()
                                    else "no train_log.jsonl in this folder (or matplotlib is missing)."), ""]
    if rewards and plot_reward_curves(rewards, out / "reward_curves.png"):
        counts = "; ".join(f"{key}: {len(t)} training and {len(e)} validation points"
                           for key, (t, e) in rewards.items())
        md += ["## Reward curves", "", "![reward accuracy and margin](reward_curves.png)", "",
               f"DPO's implicit reward as the trainer logged it, from train_log.jsonl ({counts}). The trainer's "
               f"accuracy counts a tie (chosen and rejected reward equal, as at the start) as 0; the table's "
               f"reward_accuracy counts it as 0.5.", ""]
    samples = (metrics or {}).get("samples") or []
    md += ["## Sample generations", ""]
    if not samples:
        md += ["No generations were recorded.", ""]
    for i, s in enumerate(samples, 1):
        md += [f"### Example {i}", "", "**Prompt**", "", _fence(s.get("prompt", "")), "",
               "**Reference**", "", _fence(s.get("reference", "")), ""]
        if s.get("base") is not None:
            md += ["**Base model**", "", _fence(s["base"]), ""]
        if s.get("finetuned") is not None:
            md += ["**Fine-tuned**", "", _fence(s["finetuned"]), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path


__all__ = ["write_report", "metrics_table", "read_train_log", "plot_loss_curve", "read_reward_log",
           "plot_reward_curves", "same_warning"]

"""The training console: one progress bar on a terminal, else one plain line per logging step, in place of
transformers' PrinterCallback/ProgressCallback (which print raw dicts). Formatting is pure and cheap to
import; the callback class is built lazily (transformers)."""
from __future__ import annotations

import math
import sys
import time

# shown first, in this order, when a trainer logs them (a preference trainer's key numbers); other numbers
# the trainer logs follow in its own order, up to MAX_EXTRAS in all (train_log.jsonl keeps every one)
PREFERRED = ("rewards/accuracies", "rewards/margins")
MAX_EXTRAS = 3
# not metrics: bookkeeping the line shows otherwise (step, tokens/s) or not at all
_SKIP = ("epoch", "step", "total_flos", "num_input_tokens_seen", "learning_rate", "grad_norm", "loss")


def fmt_value(v) -> str:
    """4 significant digits, no float noise: 3.412, 0.0007, 1.235e+04; whole numbers whole; others as they are."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    # counts logged as floats (TRL's num_tokens) read as counts: 10340, not 1.034e+04
    return str(int(v)) if v.is_integer() and abs(v) < 1e12 else f"{v:.4g}"


def fmt_lr(v) -> str:
    return f"{v:.1e}" if isinstance(v, (int, float)) and math.isfinite(v) else fmt_value(v)


def fmt_grad(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else fmt_value(v)


def fmt_rate(per_s: float) -> str:
    """8.4k, 1.2M, 950"""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if per_s >= div:
            return f"{per_s / div:.1f}{unit}"
    return f"{per_s:.0f}"


def fmt_duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _extras(logs: dict, prefix: str = "") -> list[str]:
    """The other numbers logged, PREFERRED first (with the evaluation's prefix when it has one), at most
    MAX_EXTRAS: a line stays readable (DPO logs a dozen more)."""
    from ftk.train import _extra_logged  # the same rule train_log.jsonl keeps numbers by

    keys = [k for k in logs if _extra_logged(k, logs[k]) and k not in _SKIP and k != "eval_loss"]
    first = [prefix + p for p in PREFERRED if prefix + p in keys]
    return [f"{k} {fmt_value(logs[k])}" for k in (first + [k for k in keys if k not in first])[:MAX_EXTRAS]]


def step_text(step: int, total: int) -> str:
    return f"step {step}/{total}" if total else f"step {step}"


def train_fields(logs: dict, tok_per_s: float | None) -> list[str]:
    """loss, lr, grad, tok/s and the other numbers of a training log (no step, no eta)."""
    out = [f"loss {fmt_value(logs['loss'])}"]
    if logs.get("learning_rate") is not None:
        out.append(f"lr {fmt_lr(logs['learning_rate'])}")
    if logs.get("grad_norm") is not None:
        out.append(f"grad {fmt_grad(logs['grad_norm'])}")
    if tok_per_s:
        out.append(f"{fmt_rate(tok_per_s)} tok/s")
    return out + _extras(logs)


def eval_line(logs: dict, step: int, total: int) -> str:
    return "  ".join([step_text(step, total), f"eval_loss {fmt_value(logs['eval_loss'])}", *_extras(logs, "eval_")])


def summary_line(logs: dict, steps: int) -> str:
    """The Trainer's end-of-training log (train_runtime, train_loss, ...) as one line."""
    parts = [f"trained {steps} steps"]
    if isinstance(logs.get("train_runtime"), (int, float)):
        parts[0] += f" in {fmt_duration(logs['train_runtime'])}"
    if logs.get("train_loss") is not None:
        parts.append(f"train_loss {fmt_value(logs['train_loss'])}")
    if isinstance(logs.get("train_samples_per_second"), (int, float)):
        parts.append(f"{fmt_rate(logs['train_samples_per_second'])} samples/s")
    return "  ".join(parts)


def console_callback(bar: bool):
    """ftk's console callback (a TrainerCallback); ``bar``: a tqdm bar, else plain lines on stdout."""
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.eval_bar = None
            self.started = self.start_step = self.start_tokens = None

        def _print(self, line: str) -> None:
            if self.bar is not None:
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

        def on_train_begin(self, args, state, control, **kw):
            # rates and eta count this call's steps only (a resume starts past step 0)
            self.started, self.start_step = time.time(), state.global_step
            self.start_tokens = state.num_input_tokens_seen or 0
            if bar:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, file=sys.stdout,
                                dynamic_ncols=True, bar_format="step {n_fmt}/{total_fmt} |{bar:20}| {postfix}")

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            if not bar:
                return
            if self.eval_bar is None and hasattr(eval_dataloader, "__len__"):
                from tqdm.auto import tqdm

                self.eval_bar = tqdm(total=len(eval_dataloader), leave=False, file=sys.stdout,
                                     dynamic_ncols=True, desc="evaluating")
            if self.eval_bar is not None:
                self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, **kw):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None

        def _speed(self, state) -> tuple[float | None, float | None]:
            """(tokens/s, seconds left) over this call's steps so far."""
            if self.started is None or state.global_step <= self.start_step:
                return None, None
            elapsed = max(time.time() - self.started, 1e-9)
            tokens = (state.num_input_tokens_seen or 0) - self.start_tokens
            per_step = elapsed / (state.global_step - self.start_step)
            return (tokens / elapsed if tokens > 0 else None), per_step * max(state.max_steps - state.global_step, 0)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            if "loss" in logs:
                tok_s, eta = self._speed(state)
                fields = train_fields(logs, tok_s)
                if self.bar is not None:
                    self.bar.set_postfix_str("  ".join(fields + ([f"eta {fmt_duration(eta)}"] if eta is not None
                                                                 else [])))
                else:
                    eta_s = [f"eta {fmt_duration(eta)}"] if eta is not None else []
                    self._print("  ".join([step_text(state.global_step, state.max_steps), *fields, *eta_s]))
            elif "eval_loss" in logs:
                self._print(eval_line(logs, state.global_step, state.max_steps))
            elif "train_runtime" in logs:
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None
                self._print(summary_line(logs, state.global_step))

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ConsoleCallback()


def replace_console(trainer, disable_bar: bool, main: bool) -> None:
    """Swap transformers' printing callbacks for ftk's: a bar when stdout is a terminal and the bar is not
    disabled (TrainingArguments.disable_tqdm), else plain lines; nothing but on the main process."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    printers = [PrinterCallback, ProgressCallback]
    try:
        from transformers.utils.notebook import NotebookProgressCallback

        printers.append(NotebookProgressCallback)
    except ImportError:
        pass
    for cls in printers:
        trainer.remove_callback(cls)
    if main:
        trainer.add_callback(console_callback(bar=not disable_bar and sys.stdout.isatty()))

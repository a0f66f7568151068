"""The training console (ftk.console): a real tiny training with stdout captured (not a terminal) prints one
compact line per logging step and per evaluation, no raw dicts, the values train_log.jsonl has."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import console as C

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import contextlib
    import io

    from ftk import data as D
    from ftk import model as M
    from ftk import train as T
    from ftk.manager import FtkPluginManager
    from ftk.recipe import load_recipe

    out = tmp_path_factory.mktemp("console") / "out"
    r = load_recipe(data={
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                 "max_length": 64, "validation_size": 8, "cache": False},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-3, "logging_steps": 1, "eval_steps": 2,
                     "report_to": ["none"], "precision": "fp32"},
        "output_dir": str(out),
    })
    mgr = FtkPluginManager()
    tok = M.load_tokenizer(r)
    prepared = D.prepare_data(r, tok, mgr)
    model, _ = M.load_model(r, mgr, tok)
    buf = io.StringIO()  # not a TTY: plain lines
    with contextlib.redirect_stdout(buf):
        T.train(model, tok, prepared, r, mgr, str(out))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return buf.getvalue().splitlines(), rows


def test_no_raw_dicts(trained):
    lines, _ = trained
    assert not [ln for ln in lines if re.search(r"\{'\w+'", ln)], lines


def test_one_line_per_logging_step_with_the_logged_values(trained):
    lines, rows = trained
    train_lines = [ln for ln in lines if re.match(r"step \d+/\d+  loss ", ln)]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert len(train_lines) == len(logged)
    for line, row in zip(train_lines, logged):
        assert line.startswith(f"step {row['step']}/4  loss {C.fmt_value(row['loss'])}  lr {C.fmt_lr(row['lr'])}  "
                               f"grad {C.fmt_grad(row['grad_norm'])}  "), line
        assert re.search(r"tok/s", line) and re.search(r"eta \d+:\d\d$", line), line


def test_eval_lines(trained):
    lines, rows = trained
    evals = [ln for ln in lines if " eval_loss " in ln]
    want = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in want] == [0, 2, 4, 4]  # before, every eval_steps, and after training
    assert evals == [f"step {r['step']}{'/4' if r['step'] else ''}  eval_loss {C.fmt_value(r['eval_loss'])}"
                     for r in want]
    assert any(ln.startswith("trained 4 steps in ") and "train_loss" in ln for ln in lines), lines


def test_formatting():
    assert C.fmt_value(3.41234) == "3.412" and C.fmt_value(7) == "7" and C.fmt_value(10340.0) == "10340"
    assert C.fmt_lr(7.3e-4) == "7.3e-04" and C.fmt_grad(1.1834) == "1.18"
    assert C.fmt_rate(8412.0) == "8.4k" and C.fmt_rate(950) == "950" and C.fmt_rate(1.25e6) == "1.2M"
    assert C.fmt_duration(3) == "0:03" and C.fmt_duration(3723) == "1:02:03"
    # a preference trainer's reward numbers first, every other number after, timing figures never
    logs = {"loss": 0.69, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.1, "logps/chosen": -12.5,
            "rewards/margins": 0.01, "rewards/accuracies": 0.5, "train_runtime": 3.0}
    assert C.train_fields(logs, 8400.0) == ["loss 0.69", "lr 1.0e-04", "grad 0.5", "8.4k tok/s",
                                            "rewards/accuracies 0.5", "rewards/margins 0.01", "logps/chosen -12.5"]
    ev = {"eval_loss": 0.6931, "eval_rewards/margins": 0.2, "eval_custom": 3, "eval_runtime": 1.0,
          "eval_samples_per_second": 9.0}
    assert C.eval_line(ev, 4, 40) == "step 4/40  eval_loss 0.6931  eval_rewards/margins 0.2  eval_custom 3"


def test_bar_mode_shows_the_fields_on_one_bar(capsys):
    """On a terminal: one bar (step/total, loss, lr, grad, tok/s, eta), evaluations and the summary as lines."""
    from transformers import TrainerControl, TrainerState

    cb = C.console_callback(bar=True)
    state, control = TrainerState(max_steps=40), TrainerControl()
    cb.on_train_begin(None, state, control)
    state.global_step, state.num_input_tokens_seen = 12, 1200
    cb.on_step_end(None, state, control)
    cb.on_log(None, state, control, logs={"loss": 3.41234, "learning_rate": 7.3e-4, "grad_norm": 1.1834})
    assert re.fullmatch(r"loss 3\.412  lr 7\.3e-04  grad 1\.18  [\d.]+[kM]? tok/s  eta \d+:\d\d", cb.bar.postfix)
    assert cb.bar.n == 12 and cb.bar.total == 40
    cb.on_log(None, state, control, logs={"eval_loss": 3.5, "eval_runtime": 1.0})
    cb.on_log(None, state, control, logs={"train_runtime": 75.0, "train_loss": 3.3, "train_samples_per_second": 9.5})
    out = capsys.readouterr().out
    assert "step 12/40  eval_loss 3.5\n" in out and "trained 12 steps in 1:15  train_loss 3.3  10 samples/s" in out
    assert cb.bar is None and "{'" not in out

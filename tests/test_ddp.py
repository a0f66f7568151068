"""2-process DDP on the CPU (gloo) through `torchrun -m ftk run`: both ranks train, rank 0 writes, and
the run checked that DDP is what trained (the recipe has a validation split, so the Trainer evaluates
before training: that evaluation used to leave the model unwrapped, each rank training its own adapter)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ALPACA, MODEL_DIR


@pytest.mark.parametrize("gpu_defaults", [False, True], ids=["eager", "checkpointed-compiled"])
def test_torchrun_two_processes(tmp_path, gpu_defaults):
    """Also with what "auto" picks on GPUs (checkpointing around compiled layers) under DDP."""
    out = tmp_path / "out"
    recipe = {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}, "gradient_checkpointing": gpu_defaults},
        "adapter": {"method": "lora", "r": 4},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 32}],
                 "max_length": 64, "validation_size": 4, "cache": False},
        "training": {"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1, "report_to": ["none"],
                     "compile": gpu_defaults},
        "evaluation": {"metrics": ["perplexity"], "max_samples": 2, "compare_base": False,
                       "generation": {"max_new_tokens": 4, "num_beams": 1}},
        "output_dir": str(out),
    }
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    # `python -m torch.distributed.run` is torchrun, with the interpreter running these tests (a
    # `torchrun` found on PATH may belong to another environment)
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone picks a free rendezvous port, so parallel test runs do not collide
    proc = subprocess.Popen(cmd + ["--standalone", "--nproc_per_node", "2", "-m", "ftk", "run",
                                   str(tmp_path / "r.json")], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, not just the launcher
        raise
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3
    ran = metrics["train"]["distributed"]
    assert (ran["asked"], ran["ran"], ran["processes"], ran["wrapper"]) == ("ddp", "ddp", 2, "DistributedDataParallel")
    assert "eval_loss_before" in metrics["train"]  # the evaluation before training happened, and DDP still wrapped
    a, b = ran["parameter_bytes_per_rank"]  # every rank holds the whole model
    assert a == b and a["trainable"] > 0
    assert metrics["train"]["compiled_layers"] == (5 if gpu_defaults else 0)
    # tokens are gathered over ranks: more than one rank can see in 3 steps of 2 rows of <= 64 tokens
    assert metrics["train"]["tokens"] > 3 * 2 * 64
    # one writer: each step logged once, one adapter
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]
    # both ranks trained the same adapter: every LoRA B moved away from its zero init
    from safetensors.torch import load_file

    b = {k: v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k}
    assert len(b) == 10 and all(v.abs().sum() > 0 for v in b.values())
    assert stdout.count("adapter saved to") == 1

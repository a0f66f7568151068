"""Crash safety with real processes: kill -9 during training, during a checkpoint save and during
evaluation; `ftk run --resume` then completes and gives the same adapter as an uninterrupted run.
Also: disk full / unwritable output before training, secrets never written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from conftest import ALPACA, MODEL_DIR

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

# A crash injected into a real `ftk run` process: SIGKILL at one point, nothing else changed.
CRASHER = textwrap.dedent("""
    import os, signal, sys
    point, at = sys.argv[1], int(sys.argv[2])
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "train":
        import transformers
        orig = transformers.Trainer.training_step
        calls = [0]
        def step(self, *a, **k):
            calls[0] += 1
            if calls[0] == at:
                die()
            return orig(self, *a, **k)
        transformers.Trainer.training_step = step
    elif point == "save":
        from transformers import trainer_callback
        orig = trainer_callback.TrainerState.save_to_json
        def save(self, path):
            if self.global_step == at:
                with open(path, "w") as f:
                    f.write('{"global_step": ')  # torn write, then the process dies
                die()
            return orig(self, path)
        trainer_callback.TrainerState.save_to_json = save
    elif point == "eval":
        import ftk.evaluate
        ftk.evaluate.evaluate_run = lambda *a, **k: die()
    from ftk.cli import main
    main(sys.argv[3:])
""")


def recipe_file(tmp_path, name="r.json", **over):
    r = {"model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}},
         "adapter": {"method": "lora", "r": 4, "alpha": 8},
         "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 40}],
                  "max_length": 64, "validation_size": 4, "cache": False},
         "training": {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                      "save_steps": 2, "save_total_limit": 2, "report_to": ["none"]},
         "evaluation": {"metrics": ["perplexity"], "compare_base": False},
         "output_dir": str(tmp_path / "out")}
    for k, v in over.items():
        r[k] = v
    p = tmp_path / name
    p.write_text(json.dumps(r))
    return p


def ftk(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "ftk", *args], capture_output=True, text=True, env=ENV)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    ftk("run", str(recipe_file(tmp)))
    return adapter(tmp / "out")


def crash_then_resume(tmp_path, point, at):
    rf = recipe_file(tmp_path)
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    p = subprocess.run([sys.executable, str(script), point, str(at), "run", str(rf)], capture_output=True,
                       text=True, env=ENV)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    out = tmp_path / "out"
    again = ftk("run", str(rf), check=False)  # a crashed run's folder is not silently overwritten
    assert again.returncode == 2 and "--resume" in again.stderr
    res = ftk("run", str(rf), "--resume")
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    assert not [x for x in out.rglob("*.tmp")]
    return out, res


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_kill_during_training(tmp_path, reference):
    out, _ = crash_then_resume(tmp_path, "train", 9)  # 2 micro-batches a step: dies inside step 5
    assert_same(adapter(out), reference)


def test_kill_during_checkpoint_save(tmp_path, reference):
    out, res = crash_then_resume(tmp_path, "save", 4)  # checkpoint-4 is torn; checkpoint-2 must be used
    assert "skipping incomplete checkpoint" in res.stdout + res.stderr
    assert_same(adapter(out), reference)


def test_kill_during_evaluation(tmp_path, reference):
    out, _ = crash_then_resume(tmp_path, "eval", 0)
    assert_same(adapter(out), reference)
    assert "perplexity" in json.loads((out / "metrics.json").read_text())["finetuned"]


def test_unwritable_output_dir_fails_before_anything(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file can never be created
        (tmp_path / "file").write_text("x")
        rf = recipe_file(tmp_path, output_dir=str(tmp_path / "file" / "out"))
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rf = recipe_file(tmp_path, output_dir=str(ro / "out"))
    p = ftk("run", str(rf), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "output_dir" in p.stderr


def test_disk_full_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from ftk.cli import main

    du = namedtuple("du", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: du(10**9, 10**9 - 1024, 1024))
    rf = recipe_file(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["run", str(rf)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "MiB free" in err and "output_dir" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_secrets_never_written(tmp_path):
    secret = "hf_SECRETtoken1234567890"
    env = dict(ENV, HF_TOKEN=secret, WANDB_API_KEY="wandbSECRET987", MLFLOW_TRACKING_PASSWORD="mlSECRET")
    rf = recipe_file(tmp_path, output_dir=str(tmp_path / "out"))
    r = json.loads(rf.read_text())
    r["training"]["max_steps"] = 2
    rf.write_text(json.dumps(r))
    p = subprocess.run([sys.executable, "-m", "ftk", "run", str(rf)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    for s in (secret, "wandbSECRET987", "mlSECRET"):
        assert s not in p.stdout + p.stderr
        for f in (tmp_path / "out").rglob("*"):
            if f.is_file():
                assert s.encode() not in f.read_bytes(), f


def test_recipe_cannot_name_code(tmp_path):
    rf = recipe_file(tmp_path)
    r = json.loads(rf.read_text())
    r["data"]["datasets"][0]["loader"] = "os:system"
    r["model"]["quantization"]["method"] = "builtins.eval"
    rf.write_text(json.dumps(r))
    p = ftk("validate", str(rf), check=False)
    assert p.returncode == 2
    assert "unknown dataset 'os:system'" in p.stderr and "unknown quantizer 'builtins.eval'" in p.stderr


def test_pickle_weights_need_explicit_opt_in(tmp_path, fresh_manager):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftk.errors import FtkError
    from ftk.model import load_model
    from ftk.recipe import load_recipe

    pk = tmp_path / "pickled"
    import torch

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    m.config.save_pretrained(pk)
    torch.save(m.state_dict(), pk / "pytorch_model.bin")  # the pickle format older checkpoints ship
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(pk)
    assert (pk / "pytorch_model.bin").exists() and not list(pk.glob("*.safetensors"))
    base = {"model": {"name": str(pk), "quantization": {"method": "none"}},
            "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA)}]}}
    r = load_recipe(data=base, manager=fresh_manager)
    with pytest.raises(FtkError, match="allow_pickle"):
        load_model(r, fresh_manager, None)
    base["model"]["allow_pickle"] = True
    model, _ = load_model(load_recipe(data=base, manager=fresh_manager), fresh_manager, None)
    assert model is not None


def test_unsupported_precision_fails_before_writing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is supported with a GPU")  # CI has none; this guards the CPU path
    rf = recipe_file(tmp_path)
    p = ftk("run", str(rf), "--set", "training.precision=fp16", check=False)
    assert p.returncode == 2 and "fp16" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()

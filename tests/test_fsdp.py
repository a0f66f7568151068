"""distributed.strategy "fsdp" with real processes on the CPU (gloo), through the launchers users run:
2-process FSDP trains the adapter a 1-process run trains (same global batch); a 2-"node" c10d launch on
127.0.0.1 writes one adapter; kill -9 of one rank, then --resume, gives the uninterrupted adapter; a
2-process run resumes on 1 process. Plus the checks that refuse what cannot work, and the check that the
strategy asked for is the one that ran. Tiny model, 4 steps, OMP_NUM_THREADS=1 per process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from conftest import ALPACA, MODEL_DIR

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun with the interpreter under test
TOL = 1e-5  # fp32; measured: 2.4e-7 between 2-process FSDP and 1 process, adapter weights up to 0.13

# Rank 1 only dies (SIGKILL) at its Nth training step; torchrun then stops rank 0.
KILL_RANK_1 = textwrap.dedent("""
    import os, signal, sys
    at = int(sys.argv[1])
    if os.environ.get("RANK") == "1":
        import transformers
        orig = transformers.Trainer.training_step
        calls = [0]
        def step(self, *a, **k):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, *a, **k)
        transformers.Trainer.training_step = step
    from ftk.cli import main
    main(sys.argv[2:])
""")


def recipe_file(tmp_path, out, batch_size=2, name="r.json", **over):
    """4 steps of a global batch of 4 (2 processes x 2, or 1 x 4): the first 3 steps are one epoch."""
    r = {"model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}},
         "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
         "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 40}],
                  "max_length": 64, "validation_size": 4, "cache": False},
         "training": {"max_steps": 4, "batch_size": batch_size, "gradient_accumulation_steps": 1,
                      "learning_rate": 1e-3, "optimizer": "adamw_torch", "precision": "fp32", "save_steps": 2,
                      "report_to": ["none"]},
         "evaluation": {"metrics": ["perplexity"], "compare_base": False},
         "distributed": {"strategy": "fsdp"},
         "output_dir": str(out)}
    for k, v in over.items():
        r[k] = v
    p = tmp_path / name
    p.write_text(json.dumps(r))
    return p


def launch(cmd, cwd, timeout=240):
    """Run a launcher in its own session (so a timeout also stops its workers); (rc, stdout, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err


def torchrun(tmp_path, nproc, *args):
    rc, out, err = launch(TORCHRUN + ["--standalone", "--nproc_per_node", str(nproc), *map(str, args)], tmp_path)
    return rc, out, err


def ftk_run(tmp_path, *args):
    rc, out, err = launch([sys.executable, "-m", "ftk", "run", *map(str, args)], tmp_path)
    assert rc == 0, err[-3000:]
    return out


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process FSDP run; also evaluates (perplexity, generation for ROUGE, the base with the
    adapter disabled) on rank 0 after training, which needs the sharded model gathered."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = tmp / "out"
    rf = recipe_file(tmp, out, evaluation={"metrics": ["perplexity", "rouge"], "compare_base": True, "max_samples": 2,
                                           "generation": {"max_new_tokens": 4, "num_beams": 1}})
    rc, stdout, err = torchrun(tmp, 2, "-m", "ftk", "run", rf)
    assert rc == 0, err[-3000:]
    assert stdout.count("adapter saved to") == 1
    return out


def test_two_processes_train_the_one_process_adapter(tmp_path, reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    ran = metrics["train"]["distributed"]
    assert (ran["asked"], ran["ran"], ran["processes"]) == ("fsdp", "fsdp", 2)
    assert ran["wrapper"] == "FSDPPeftModelForCausalLM" and ran["fsdp"]["wrap"] == ["LlamaDecoderLayer"]
    assert json.loads((reference / "manifest.json").read_text())["distributed"] == ran
    # evaluated after training on rank 0: text generated, the base compared with the adapter disabled
    assert metrics["finetuned"]["perplexity"] < metrics["base"]["perplexity"]
    assert all(s["finetuned"] for s in map(json.loads, (reference / "generations.jsonl").read_text().splitlines()))
    # a sharded checkpoint: every rank's file and the metadata; the adapter in it is a gathered PEFT adapter
    ckpt = reference / "checkpoints" / "checkpoint-4"
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert max_diff(load_file(str(ckpt / "adapter_model.safetensors")), adapter(reference)) == 0
    # the same global batch of 4 in one process
    one = tmp_path / "one"
    ftk_run(tmp_path, recipe_file(tmp_path, one, batch_size=4))
    assert max_diff(adapter(reference), adapter(one)) < TOL
    single = json.loads((one / "metrics.json").read_text())["train"]["distributed"]
    assert single["ran"] == "one process" and single["processes"] == 1
    # each rank holds half of the parameters the single process holds
    whole = single["parameter_bytes_per_rank"][0]["parameters"]
    for rank in ran["parameter_bytes_per_rank"]:
        assert abs(rank["parameters"] / (whole / 2) - 1) < 0.05, (rank, whole)
    # the final adapter is one normal PEFT file set that loads on one device
    from ftk.model import load_unquantized

    model, _ = load_unquantized(str(MODEL_DIR), reference / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    files = set(os.listdir(reference / "adapter"))
    assert len(loaded) == 20 and {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith(".distcp") or f.startswith("adapter_model-") for f in files)  # one file set


def test_plan_per_rank_bytes_match_the_run(reference, fresh_manager):
    """`ftk plan`'s per-process weights and adapter under fsdp x2 against what each rank of the run held."""
    from transformers import AutoConfig

    from ftk.plan import estimate_memory
    from ftk.recipe import load_recipe

    r = load_recipe(reference.parent / "r.json", manager=fresh_manager)
    ran = json.loads((reference / "metrics.json").read_text())["train"]["distributed"]
    measured = ran["parameter_bytes_per_rank"][0]["parameters"]
    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    two = estimate_memory(cfg, r, cuda=False, manager=fresh_manager, processes=2)["bytes"]
    one = estimate_memory(cfg, r, cuda=False, manager=fresh_manager, processes=1)["bytes"]
    planned = two["weights"] + two["lora_weights"]
    # the plan counts the 4-bit quant state (not a parameter) and keeps k/v_proj (out 32 < a 64 block) unquantized
    assert abs(measured / planned - 1) < 0.15, (measured, planned)
    assert abs(planned / (one["weights"] + one["lora_weights"]) - 0.5) < 0.02
    assert two["loading"] == one["weights"] and two["unsharded_units"] > 0 and one["unsharded_units"] == 0


def test_two_process_checkpoint_resumes_on_one_process(tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for p in ("adapter", "checkpoints/checkpoint-4", "metrics.json", "report.md"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    stdout = ftk_run(tmp_path, recipe_file(tmp_path, out, batch_size=4), "--resume")
    assert "one process on 1 process(es)" in stdout
    metrics = json.loads((out / "metrics.json").read_text())["train"]
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == 4
    assert max_diff(adapter(out), adapter(reference)) < TOL


def test_kill_one_rank_then_resume_gives_the_uninterrupted_adapter(tmp_path, reference):
    out = tmp_path / "out"
    rf = recipe_file(tmp_path, out)
    (tmp_path / "kill.py").write_text(KILL_RANK_1)
    rc, _, err = torchrun(tmp_path, 2, tmp_path / "kill.py", 4, "run", rf)  # rank 1 dies inside step 4
    assert rc != 0 and "SIGKILL" in err
    assert not (out / "adapter").exists() and (out / "checkpoints" / "checkpoint-2" / "dcp" / ".metadata").is_file()
    rc, stdout, err = torchrun(tmp_path, 2, "-m", "ftk", "run", rf, "--resume")
    assert rc == 0, err[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"].endswith("checkpoint-2")
    assert max_diff(adapter(out), adapter(reference)) == 0.0


def test_two_nodes_with_c10d_rendezvous_write_one_adapter(tmp_path, reference):
    """Two torchrun launches, as on two machines (one process each), meeting at a c10d rendezvous."""
    out = tmp_path / "out"
    rf = recipe_file(tmp_path, out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(TORCHRUN + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                          "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "ftk-test",
                                          "-m", "ftk", "run", str(rf)],
                              env=ENV, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    assert sum(o.count("adapter saved to") for o, _ in results) == 1
    ran = json.loads((out / "metrics.json").read_text())["train"]["distributed"]
    assert (ran["ran"], ran["processes"]) == ("fsdp", 2)
    assert max_diff(adapter(out), adapter(reference)) < TOL


# -- refusals, without processes -------------------------------------------------------------------
def _validate(tmp_path, capsys, *sets):
    from ftk.cli import main

    rf = recipe_file(tmp_path, tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(rf), *[x for s in sets for x in ("--set", s)]])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("sets, expected", [
    (["distributed.strategy=ddp", "distributed.fsdp.cpu_offload=true"],
     "error: distributed.fsdp.cpu_offload: applies to distributed.strategy \"fsdp\" only (the strategy is 'ddp')"),
    (["training.optimizer=paged_adamw_32bit"],
     "error: training.optimizer: 'paged_adamw_32bit' cannot step the sharded parameters of distributed.strategy "
     "\"fsdp\"; use adamw_torch, adamw_torch_fused, sgd"),
    (["distributed.fsdp.mixed_precision=true"],
     "error: distributed.fsdp.mixed_precision: true needs training.precision bf16 or fp16 (it is fp32)"),
    (["distributed.fsdp.wrap=[]"], "error: distributed.fsdp.wrap: [] should be non-empty"),
    (["distributed.strategy=zero"], "error: distributed.strategy: 'zero' is not one of 'ddp', 'fsdp'"),
], ids=["fsdp-options-under-ddp", "bnb-optimizer", "mixed-precision-fp32", "empty-wrap", "unknown-strategy"])
def test_combinations_that_cannot_work_are_refused(tmp_path, capsys, sets, expected):
    code, err = _validate(tmp_path, capsys, *sets)
    assert code == 2 and err.strip() == expected


def test_the_recipe_as_tested_validates(tmp_path, capsys):
    from ftk.cli import main

    with pytest.raises(SystemExit) as e:
        main(["validate", str(recipe_file(tmp_path, tmp_path / "out"))])
    assert e.value.code == 0, capsys.readouterr().err


def test_quantizer_packs_for_sharding_and_refuses_what_cannot_shard(fresh_manager):
    """The bitsandbytes storage dtype comes from the core's Sharding contract, never from the user."""
    import torch
    from transformers import AutoConfig

    from ftk.components import ModelContext, Sharding
    from ftk.errors import FtkError

    cfg = AutoConfig.from_pretrained(MODEL_DIR)

    def plan(method, sharding, precision="bf16", **options):
        comp = fresh_manager.get("quantizer", method)
        opts = {"nested": True, "compute_dtype": "auto", "dequantize": "bitsandbytes", "skip_modules": [],
                "on_incompatible": "skip", **options}
        if method == "int8":
            opts = {"threshold": 6.0, "skip_modules": [], "on_incompatible": "skip"}
        return comp.factory(opts, ModelContext(model_config=cfg, recipe={"training": {"precision": precision}},
                                               sharding=sharding))

    cfg_of = lambda p: p.from_pretrained_kwargs["quantization_config"]  # noqa: E731
    assert cfg_of(plan("nf4", None)).bnb_4bit_quant_storage == torch.uint8  # not sharded: bitsandbytes' default
    sharded = Sharding(strategy="fsdp", processes=2, param_dtype="bfloat16")
    assert cfg_of(plan("nf4", sharded)).bnb_4bit_quant_storage == torch.bfloat16
    assert cfg_of(plan("fp4", Sharding("fsdp", 2, None), precision="fp32")).bnb_4bit_quant_storage == torch.float32
    # measured: float32 packed words cast to bfloat16 by FSDP's mixed precision break dequantization
    with pytest.raises(FtkError, match=r"^model\.quantization\.compute_dtype: 4-bit weights computed in float32 "
                                       r"cannot be sharded with distributed\.fsdp\.mixed_precision"):
        plan("nf4", sharded, compute_dtype="float32")
    with pytest.raises(FtkError, match=r"^model\.quantization\.method: int8 cannot be sharded"):
        plan("int8", sharded)


def test_a_silent_fallback_is_refused(monkeypatch):
    """What ran is checked: 2 processes training a plain (unwrapped) model, or one wrapped by the other
    strategy, stop with one line instead of training."""
    import torch
    import torch.distributed as dist

    from ftk.distributed import check_ran
    from ftk.errors import RunError

    model = torch.nn.Linear(4, 4)
    assert check_ran(model, "fsdp")["ran"] == "one process"  # one process: nothing to shard or replicate
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for asked in ("fsdp", "ddp"):
        with pytest.raises(RunError, match=rf"^distributed\.strategy: '{asked}' was asked for, but 2 process\(es\) "
                                           r"train the model as no data parallelism \(Linear\)"):
            check_ran(model, asked)


def test_resuming_with_another_strategy_or_an_incomplete_shard_is_refused(tmp_path, reference, fresh_manager):
    from ftk.errors import FtkError
    from ftk.recipe import load_recipe
    from ftk.train import checkpoint_complete, resolve_resume

    ckpt = reference / "checkpoints" / "checkpoint-2"
    r = load_recipe(reference.parent / "r.json", manager=fresh_manager)
    assert resolve_resume(str(ckpt), str(reference), r) == str(ckpt)
    r["distributed"] = {"strategy": "ddp"}
    with pytest.raises(FtkError, match=r"was saved by a 'fsdp' run and this recipe asks for 'ddp'"):
        resolve_resume(str(ckpt), str(reference), r)
    torn = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, torn)
    assert checkpoint_complete(torn)
    (torn / "dcp" / "__1_0.distcp").unlink()  # a rank's shard missing (died, or another node's disk)
    assert not checkpoint_complete(torn)


def test_an_accelerate_fsdp_launch_is_refused(monkeypatch):
    from ftk.distributed import launch_errors

    assert launch_errors({"distributed": {"strategy": "fsdp"}}) == []
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    (msg,) = launch_errors({"distributed": {"strategy": "fsdp"}})
    assert msg.startswith("distributed.strategy: the launcher asks for accelerate's FSDP (ACCELERATE_USE_FSDP")


def test_a_preference_trainer_shards_after_its_own_set_up(tmp_path):
    """DPO (TRL) adds a reference adapter in its Trainer's constructor; the model is sharded after it, and
    2 FSDP processes train the adapter 1 process trains."""
    pytest.importorskip("trl")
    pairs = MODEL_DIR.parents[1] / "data" / "preference" / "dailydialog_pairs.jsonl"
    over = dict(trainer={"method": "dpo"},
                data={"datasets": [{"loader": "preference", "path": str(pairs), "max_examples": 40}],
                      "max_length": 64, "validation_size": 8, "cache": False},
                evaluation={"metrics": [], "compare_base": False})
    two, one = tmp_path / "two", tmp_path / "one"
    rc, _, err = torchrun(tmp_path, 2, "-m", "ftk", "run", recipe_file(tmp_path, two, name="two.json", **over))
    assert rc == 0, err[-3000:]
    ftk_run(tmp_path, recipe_file(tmp_path, one, batch_size=4, name="one.json", **over))
    assert json.loads((two / "metrics.json").read_text())["train"]["distributed"]["ran"] == "fsdp"
    assert max_diff(adapter(two), adapter(one)) < TOL

"""Preference tuning (trainers dpo, orpo, kto) on stories260K in NF4 with real DailyDialog pairs through
ftk's own pipeline (the `preference` loader, the "pairs" data form, ``ftk run``'s prepare/train/finish):
each method's loss equals TRL's own trainer on the same weights and batch; DPO starts at log 2 and learns
the held-out pairs; the saved adapter is "default" alone and reloads; kill -9 + resume gives the
uninterrupted adapter; 2-process gloo DDP trains; without TRL the trainers are listed as unavailable and a
recipe using one fails validation in one line."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODEL_DIR, SHARED

torch.set_num_threads(1)

PAIRS = SHARED / "data" / "preference" / "dailydialog_pairs.jsonl"
TESTS = Path(__file__).resolve().parent
MAX_LENGTH = 96
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


# -- building blocks (also run by the subprocess tests: ``python -c "import test_preference_trainers"``) --
def raw_recipe(out, method="dpo", trainer=None, checkpointing=False, n_pairs=40, n_val=8, **training) -> dict:
    """``n_pairs`` real pairs, ``n_val`` of them held out by the pipeline; fp32 on every CPU ("auto" is bf16
    on AVX512-BF16 CPUs)."""
    return {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}, "gradient_checkpointing": checkpointing},
        "adapter": {"method": "lora", "r": 8, "alpha": 16},
        "trainer": {"method": method, **(trainer or {})},
        "data": {"datasets": [{"loader": "preference", "path": str(PAIRS), "max_examples": n_pairs}],
                 "max_length": MAX_LENGTH, "validation_size": n_val, "cache": False},
        "training": {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "warmup_ratio": 0, "optimizer": "adamw_torch", "report_to": ["none"], "precision": "fp32",
                     "compile": False, **training},
        "evaluation": {"metrics": ["perplexity"] if n_val else [], "compare_base": False, "num_examples_in_report": 0},
        "output_dir": str(out),
    }


def recipe_for(out, method="dpo", trainer=None, manager=None, **kw):
    from ftk.recipe import load_recipe

    return load_recipe(data=raw_recipe(out, method, trainer, **kw), manager=manager)


def train_pairs(out, method="dpo", resume=None, finish=False, **kw):
    """What ``ftk run`` does (prepare, train; evaluate and report with ``finish``); returns its RunState
    with the training metrics in ``state.metrics``."""
    from ftk.manager import FtkPluginManager
    from ftk.run import finish_run, prepare_run, train_run

    mgr = FtkPluginManager()
    state = prepare_run(recipe_for(out, method, manager=mgr, **kw), mgr, resume=resume)
    state.metrics = train_run(state, resume)
    if finish:
        finish_run(state, {"train": state.metrics})
    return state


def log_rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def lora_b(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


# -- registry, options, refusals ------------------------------------------------------------------
def test_listed_with_options_and_defaults(fresh_manager, tmp_path):
    from click.testing import CliRunner

    from ftk.cli import cli
    from ftk.errors import FtkError

    res = CliRunner().invoke(cli, ["plugins", "list"], obj={"manager": fresh_manager})
    line = next(x for x in res.output.splitlines() if x.startswith("preference_trainers"))
    assert " ok " in line and "trainer:dpo, trainer:orpo, trainer:kto" in line
    r = recipe_for(tmp_path, "dpo", manager=fresh_manager)
    assert r["trainer"] == {"method": "dpo", "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                            "disable_dropout": True}
    assert recipe_for(tmp_path, "kto", manager=fresh_manager)["trainer"] == {
        "method": "kto", "beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0,
        "disable_dropout": True}
    assert recipe_for(tmp_path, "orpo", manager=fresh_manager)["trainer"] == {
        "method": "orpo", "beta": 0.1, "disable_dropout": True}
    with pytest.raises(FtkError) as e:
        recipe_for(tmp_path, "dpo", {"beta": 0, "loss_type": "dpo"}, fresh_manager)
    beta, loss_type = sorted(e.value.messages)
    assert beta == "trainer.beta: 0 is less than or equal to the minimum of 0"
    assert loss_type.startswith("trainer.loss_type: 'dpo' is not one of 'sigmoid', 'hinge', 'ipo'")


def test_example_recipe_is_valid_and_planned(fresh_manager):
    from ftk.plan import plan
    from ftk.recipe import load_recipe

    r = load_recipe(str(TESTS.parent / "examples" / "dpo.json"), manager=fresh_manager)
    assert r["trainer"]["method"] == "dpo" and r["data"]["datasets"][0]["loader"] == "preference"
    p = plan(r, fresh_manager, with_data=False)
    assert p["assumptions"]["sequences_per_example"] == 2 and p["bytes"]["reference_pass"] > 0


@pytest.mark.parametrize("method, trainer, training, message", [
    ("kto", {}, {"batch_size": 1}, "training.batch_size: trainer 'kto' needs at least 2 examples per micro-batch"),
    ("dpo", {}, {"group_by_length": True}, "training.group_by_length: trainer 'dpo' batches preference pairs"),
    ("dpo", {"loss_type": "exo_pair"}, {}, "trainer.label_smoothing: loss_type 'exo_pair' needs it above 0"),
])
def test_recipes_that_cannot_work_fail_validation_in_one_line(tmp_path, method, trainer, training, message):
    raw = raw_recipe(tmp_path / "out", method, trainer, **training)
    (tmp_path / "r.json").write_text(json.dumps(raw))
    p = subprocess.run([sys.executable, "-m", "ftk", "validate", str(tmp_path / "r.json")], capture_output=True,
                       text=True, env=ENV)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), p.stderr
    if method == "kto":  # the unpaired loss has no KL estimate and takes one example per micro-batch
        raw["trainer"]["loss_type"] = "apo_zero_unpaired"
        (tmp_path / "r.json").write_text(json.dumps(raw))
        p = subprocess.run([sys.executable, "-m", "ftk", "validate", str(tmp_path / "r.json")], capture_output=True,
                           text=True, env=ENV)
        assert p.returncode == 0, p.stderr


def test_missing_trl_is_listed_and_refused_in_one_line(tmp_path):
    """TRL made unimportable (``sys.modules["trl"] = None``, what Python does for a blocked module)."""
    (tmp_path / "r.json").write_text(json.dumps(raw_recipe(tmp_path / "out")))
    code = ("import sys; sys.modules['trl'] = None\n"
            "from ftk.cli import main\n"
            "try:\n    main(sys.argv[1:])\n"
            "finally:\n    print('TRL IMPORTED' if [m for m in sys.modules if m.startswith('trl.')] else '',\n"
            "          file=sys.stderr, flush=True)")
    run = lambda *args: subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV)
    listed = run("plugins", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("preference_trainers"))
    assert line.split()[3] == "unavailable"
    assert line.endswith("trainer:dpo, trainer:orpo, trainer:kto (needs trl: pip install 'ftk[preference]')")
    js = json.loads(run("plugins", "list", "--json").stdout)
    rec = next(x for x in js if x["name"] == "preference_trainers")
    assert (rec["status"], rec["error"]) == ("unavailable", "needs trl: pip install 'ftk[preference]'")
    res = run("validate", str(tmp_path / "r.json"))
    assert res.returncode == 2
    assert res.stderr.strip() == "error: trainer.method: trainer 'dpo' needs trl: pip install 'ftk[preference]'"
    # with TRL installed, listing and validating a dpo recipe never import it (ftk plugins list stays instant)
    code = code.replace("sys.modules['trl'] = None", "pass")
    for args in (("plugins", "list"), ("validate", str(tmp_path / "r.json"))):
        res = run(*args)
        assert res.returncode == 0 and "TRL IMPORTED" not in res.stderr, res.stdout + res.stderr


def test_training_arguments_are_ftks_with_the_methods_own(tmp_path):
    """TRL's configs default to lr 1e-6, checkpointing on, bf16...: ftk's values must all carry over."""
    import dataclasses

    from transformers import TrainingArguments

    from ftk import train as T
    from ftk.manager import FtkPluginManager

    mgr = FtkPluginManager()
    for method, extra in (("dpo", {"beta": 0.25, "loss_type": ["ipo"], "max_length": MAX_LENGTH}),
                          ("orpo", {"beta": 0.2, "max_length": MAX_LENGTH}),
                          ("kto", {"desirable_weight": 1.5, "train_sampling_strategy": "sequential"})):
        own = {"dpo": {"beta": 0.25, "loss_type": "ipo"}, "orpo": {"beta": 0.2}, "kto": {"desirable_weight": 1.5}}
        r = recipe_for(tmp_path, method, own[method], mgr, learning_rate=3e-4, max_steps=7, save_steps=3, seed=5)
        plan = T.trainer_plan(r, mgr, str(tmp_path))
        args = T.training_arguments(r, str(tmp_path), has_eval=True)
        cfg = plan.training_arguments(args)
        assert type(cfg).__name__ == {"dpo": "DPOConfig", "orpo": "ORPOConfig", "kto": "KTOConfig"}[method]
        differ = [f.name for f in dataclasses.fields(TrainingArguments) if f.init
                  and f.name != "train_sampling_strategy" and getattr(cfg, f.name) != getattr(args, f.name)]
        assert differ == [] and cfg.learning_rate == 3e-4 and cfg.gradient_checkpointing is False
        assert all(getattr(cfg, k) == v for k, v in extra.items()), method
        assert cfg.disable_dropout is True and plan.data == "pairs"
        assert (plan.sequences_per_example, plan.reference_sequences_per_example) == {
            "dpo": (2, 2), "orpo": (2, 0), "kto": (1, 1)}[method]


def test_plan_counts_both_responses_and_the_reference_pass():
    """`ftk plan` (7B, 4 x 512): a pair is two sequences through the model, DPO's reference pass one more
    forward without grad; KTO trains one sequence per example with a reference pass; ORPO has none."""
    from ftk.manager import FtkPluginManager
    from ftk.plan import estimate_memory

    llama_7b = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32}
    mgr = FtkPluginManager()
    est = {}
    for method in ("sft", "dpo", "orpo", "kto"):
        recipe = {"model": {"quantization": {"method": "nf4"}, "gradient_checkpointing": True},
                  "trainer": {"method": method}, "data": {"max_length": 512},
                  "training": {"batch_size": 4, "precision": "bf16"}}
        est[method] = estimate_memory(llama_7b, recipe, cuda=True, manager=mgr)
    b = {m: e["bytes"] for m, e in est.items()}
    assert est["dpo"]["assumptions"]["tokens_per_micro_batch"] == 2 * 4 * 512
    for m, seqs in (("dpo", 2), ("orpo", 2), ("kto", 1)):
        assert b[m]["activations"] == seqs * b["sft"]["activations"] and b[m]["logits"] == seqs * b["sft"]["logits"]
    assert b["sft"]["reference_pass"] == b["orpo"]["reference_pass"] == 0
    assert b["dpo"]["reference_pass"] == 2 * b["kto"]["reference_pass"] > 0
    assert b["dpo"]["total"] == b["sft"]["total"] + b["sft"]["activations"] + b["sft"]["logits"] + b["dpo"]["reference_pass"]
    from ftk.plan import format_plan

    shown = format_plan(est["dpo"])
    assert "reference_pass" in shown and "(2 sequences per example)" in shown
    assert "reference_pass" not in format_plan(est["sft"])


def test_kto_rows_mix_labels_and_mismatch_the_kl_pairs():
    from ftk.plugins.trainer_preference import kto_rows

    pairs = [{"prompt_ids": [1, 10 + k], "chosen_ids": [100 + k, 2], "rejected_ids": [200 + k, 2]} for k in range(10)]
    rows = kto_rows(pairs, 4, seed=3)
    assert len(rows) == 20 and sum(r["label"] for r in rows) == 10
    used = sorted((r["prompt_ids"][1], r["completion_ids"][0]) for r in rows)
    assert used == sorted([(10 + k, 100 + k) for k in range(10)] + [(10 + k, 200 + k) for k in range(10)])
    for start in range(0, 16, 4):  # full micro-batches: both labels, four prompts, KL from another prompt
        batch = rows[start:start + 4]
        assert {r["label"] for r in batch} == {True, False}
        assert len({r["prompt_ids"][1] for r in batch}) == 4
        owner = {r["completion_ids"][0]: r["prompt_ids"][1] for r in batch}
        assert all(owner[r["KL_completion_ids"][0]] != r["prompt_ids"][1] for r in batch)
        assert sorted(r["KL_completion_ids"][0] for r in batch) == sorted(owner)  # the batch's own responses
    assert [r["prompt_ids"] for r in kto_rows(pairs, 4, seed=3)] == [r["prompt_ids"] for r in rows]  # resumable


# -- equal to TRL's own trainers ------------------------------------------------------------------
def _two_models(tmp_path, method, pings: list):
    """ftk's trainer and TRL's own on two identically loaded models (ftk's loading: NF4, LoRA); ``pings``
    gets the topic each time TRL's usage telemetry would be sent."""
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from ftk import data as D
    from ftk import model as M
    from ftk import train as T
    from ftk.manager import FtkPluginManager

    mgr = FtkPluginManager()
    r = recipe_for(tmp_path / method, method, manager=mgr, n_pairs=8, n_val=0, max_steps=1)
    tok = M.load_tokenizer(r)
    pairs = D.prepare_data(r, tok, mgr).train  # the core's pairs: what a "pairs" trainer gets
    plan = T.trainer_plan(r, mgr, str(tmp_path / method))
    ours, theirs = (M.load_model(r, mgr, tok)[0] for _ in range(2))
    args = lambda: plan.training_arguments(T.training_arguments(r, str(tmp_path / method), has_eval=False))
    ftk_trainer = T._plan_trainer_class(plan, r)(model=ours, args=args(), data_collator=None, train_dataset=pairs,
                                                 processing_class=tok)
    pings.append("ftk done")
    # TRL's trainer prepares its own data (text), unused here: both compute the loss of one batch of ours
    with open(PAIRS, encoding="utf-8") as f:
        text = [{"prompt": rec["prompt"][-1]["content"] + "\n", "chosen": rec["chosen"][0]["content"],
                 "rejected": rec["rejected"][0]["content"]} for rec in map(json.loads, list(f)[:8])]
    trl_cls = {"dpo": DPOTrainer, "orpo": ORPOTrainer, "kto": KTOTrainer}[method]
    trl_trainer = trl_cls(model=theirs, args=args(), train_dataset=Dataset.from_list(text), processing_class=tok)
    # TRL cast its copy's trainable weights to bf16 (QLoRA); give it ours, then move LoRA B off zero in
    # both so the policy differs from the reference
    g = torch.Generator().manual_seed(0)
    theirs_params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.05
            theirs_params[n].data = p.data.clone()
    batch = ftk_trainer.data_collator([ftk_trainer.train_dataset[i] for i in range(4)])
    return ftk_trainer, trl_trainer, batch


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_loss_equals_trls_own_trainer(tmp_path, monkeypatch, method):
    import trl.trainer.base_trainer

    pings = []
    monkeypatch.delenv("CI", raising=False)  # TRL stays quiet under CI; here it must want to ping
    monkeypatch.setattr(trl.trainer.base_trainer, "send_telemetry", lambda topic, **kw: pings.append(topic))
    ftk_trainer, trl_trainer, batch = _two_models(tmp_path, method, pings)
    # ftk's trainers never ping the Hub (TRL's own does, unless HF_HUB_DISABLE_TELEMETRY/HF_HUB_OFFLINE)
    assert pings == ["ftk done", f"trl/{type(trl_trainer).__name__}"]
    # TRL's reference is a "ref" copy of the fresh adapter, ftk's the adapter disabled (ORPO has none)
    assert "ref" not in ftk_trainer.model.peft_config
    assert ("ref" in trl_trainer.model.peft_config) == (method != "orpo")
    assert all(p.dtype == torch.float32 for p in ftk_trainer.model.parameters() if p.requires_grad)
    with torch.no_grad():
        ours = ftk_trainer.compute_loss(ftk_trainer.model, batch).item()
        theirs = trl_trainer.compute_loss(trl_trainer.model, batch).item()
    print(f"{method}: ftk {ours:.8f} TRL {theirs:.8f}")
    assert math.isfinite(ours) and abs(ours - theirs) < 1e-5, (ours, theirs)
    if method != "orpo":  # against the reference, the perturbed policy is not at the starting loss
        assert abs(ours - {"dpo": math.log(2), "kto": 0.5}[method]) > 1e-3


# -- training -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """``ftk run`` in-process: 64 training pairs, 16 held out, 24 steps, evaluation and report."""
    out = tmp_path_factory.mktemp("dpo") / "out"
    return out, train_pairs(out, "dpo", finish=True, n_pairs=80, n_val=16, max_steps=24)


def test_dpo_starts_at_log2_and_learns_the_held_out_pairs(dpo_run):
    out, state = dpo_run
    metrics = state.metrics
    assert abs(metrics["first_loss"] - math.log(2)) < 1e-5  # policy == reference at the first step
    assert abs(metrics["eval_loss_before"] - math.log(2)) < 1e-5
    assert metrics["steps"] == 24 and metrics["tokens"] > 0 and metrics["eval_loss_after"] < math.log(2)
    rows = log_rows(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(steps[0])
    before, after = (r for r in rows if "eval_loss" in r)
    assert before["step"] == 0 and before["eval_rewards/accuracies"] == 0.0  # rewards are all 0 at the start
    assert after["eval_rewards/accuracies"] > 0.75 and after["eval_rewards/margins"] > 0  # 16 held-out pairs
    assert all(b.abs().sum() > 0 for b in lora_b(state.model).values())  # the adapter changed
    assert "trainer:dpo (preference_trainers)" in state.manifest["components"]
    assert json.loads((out / "metrics.json").read_text())["train"]["first_loss"] == metrics["first_loss"]
    assert (out / "report.md").is_file()


def test_dpo_adapter_is_default_alone_and_reloads_to_the_trained_logps(dpo_run):
    from peft import PeftModel

    from ftk import model as M
    from ftk.manager import FtkPluginManager

    out, state = dpo_run
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 20 and all(".ref." not in k for k in saved)  # 5 layers x q/v x A/B
    assert not (out / "adapter" / "ref").exists()
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):
        assert not (ckpt / "ref").exists()
    base = M.load_quantized_base(state.recipe, FtkPluginManager(), state.tokenizer)[0]  # the NF4 base alone
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    pair = state.prepared.validation[0]
    ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
    state.model.eval()
    with torch.no_grad():
        a = torch.log_softmax(state.model(input_ids=ids).logits.float(), -1)
        b = torch.log_softmax(reloaded(input_ids=ids).logits.float(), -1)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("method, metric", [("orpo", "log_odds_ratio"), ("kto", "kl")])
def test_orpo_and_kto_train(tmp_path, method, metric):
    state = train_pairs(tmp_path / "out", method, n_pairs=40, n_val=8, max_steps=8)
    metrics = state.metrics
    assert metrics["steps"] == 8 and metrics["tokens"] > 0
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    if method == "kto":
        assert abs(metrics["first_loss"] - 0.5) < 1e-6  # policy == reference: every example's loss is 0.5
    rows = [r for r in log_rows(tmp_path / "out") if "loss" in r]
    assert all(metric in r for r in rows) and all("rewards/chosen" in r for r in rows)
    assert all(b.abs().sum() > 0 for b in lora_b(state.model).values())
    assert len(load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))) == 20


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_gradient_checkpointing_is_not_toggled_every_step(tmp_path, method):
    """TRL turns checkpointing off and on around each reference pass, adding an embedding hook each time."""
    from ftk import model as M
    from ftk.manager import FtkPluginManager

    state = train_pairs(tmp_path / "out", method, n_pairs=16, n_val=4, max_steps=3, checkpointing=True)
    metrics, model = state.metrics, state.model
    assert metrics["steps"] == 3 and abs(metrics["first_loss"] - {"dpo": math.log(2), "kto": 0.5}[method]) < 1e-5
    fresh = M.load_model(state.recipe, FtkPluginManager(), state.tokenizer)[0]
    assert fresh.get_input_embeddings()._forward_hooks  # ftk's own input-grad hook
    assert len(model.get_input_embeddings()._forward_hooks) == len(fresh.get_input_embeddings()._forward_hooks)
    assert model.base_model.model.is_gradient_checkpointing


# -- crash safety and DDP -------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import transformers
    orig, calls = transformers.Trainer.training_step, [0]
    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    transformers.Trainer.training_step = step
    import test_preference_trainers as t
    t.train_pairs({out!r}, "dpo", **{kw!r})
""")


def test_kill_9_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    kw = {"max_steps": 6, "save_steps": 2, "n_pairs": 32, "n_val": 0}
    train_pairs(tmp_path / "a", **kw)
    p = subprocess.run([sys.executable, "-c", KILLER.format(tests=str(TESTS), at=5, out=str(tmp_path / "b"), kw=kw)],
                       capture_output=True, text=True, env=ENV)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert sorted(x.name for x in (tmp_path / "b" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    metrics = train_pairs(tmp_path / "b", resume="latest", **kw).metrics
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["steps"] == 6
    a, b = (load_file(str(tmp_path / x / "adapter" / "adapter_model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert [r["step"] for r in log_rows(tmp_path / "b") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "ddp.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport test_preference_trainers as t\n"
                      f"t.train_pairs({str(out)!r}, 'dpo', n_pairs=20, n_val=4, max_steps=3, batch_size=2)\n")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env=ENV, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    steps = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and abs(steps[0]["loss"] - math.log(2)) < 1e-5  # rank 0 writes
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 20 and all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert stdout.count("adapter saved to") == 1

"""Preference tuning (trainers dpo, orpo, kto) on stories260K in NF4 with real DailyDialog pairs through ftk's
own pipeline (the `preference` loader, the "pairs" data form, ``ftk run``'s prepare/train/finish): each
method's loss and logged metrics equal TRL's own trainer on the same weights and batch, padding-free (DPO,
KTO) as padded; a packed call returns the padded call's per-token outputs; DPO starts at log 2 and learns the
held-out pairs, padding-free as padded; the saved adapter is "default" alone and reloads; kill -9 + resume
gives the uninterrupted adapter; 2-process gloo DDP trains; without TRL the trainers are listed as unavailable
and a recipe using one fails validation in one line."""
from __future__ import annotations

import contextlib
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
def raw_recipe(out, method="dpo", trainer=None, checkpointing=False, n_pairs=40, n_val=8, max_prompt_length=None,
               attention="auto", **training) -> dict:
    """``n_pairs`` real pairs, ``n_val`` of them held out by the pipeline; fp32 on every CPU ("auto" is bf16
    on AVX512-BF16 CPUs). ``attention="sdpa"`` where a packed run is compared with a padded one to fp32
    rounding: the padded calls always run sdpa, and the CPU default's packed attention sums in another order."""
    return {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}, "gradient_checkpointing": checkpointing,
                  "attn_implementation": attention},
        "adapter": {"method": "lora", "r": 8, "alpha": 16},
        "trainer": {"method": method, **(trainer or {})},
        "data": {"datasets": [{"loader": "preference", "path": str(PAIRS), "max_examples": n_pairs}],
                 "max_length": MAX_LENGTH, "max_prompt_length": max_prompt_length, "validation_size": n_val,
                 "cache": False},
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
                            "padding_free": True, "disable_dropout": True}
    assert recipe_for(tmp_path, "kto", manager=fresh_manager)["trainer"] == {
        "method": "kto", "beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0,
        "padding_free": True, "disable_dropout": True}
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
                  # sft with transformers' whole-batch loss, as the preference trainers compute theirs
                  "trainer": {"method": method, **({"chunked_loss": False} if method == "sft" else {})},
                  "data": {"max_length": 512},
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


def test_plan_counts_the_fused_heads_chunk_of_logits():
    """DPO and KTO score through TRL's fused LM head, which projects at most its chunk of positions at once:
    at long context `ftk plan` counts that chunk's logits, for the policy and the reference pass; ORPO
    reads the whole logits."""
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from ftk.manager import FtkPluginManager
    from ftk.plan import estimate_memory
    from ftk.plugins.trainer_preference import FUSED_HEAD_POSITIONS

    assert FUSED_HEAD_POSITIONS == _CHUNKED_LOGPROB_CHUNK_SIZE  # ftk plan does not import TRL
    cfg = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32}
    mgr = FtkPluginManager()
    est = {m: estimate_memory(cfg, {"model": {"quantization": {"method": "nf4"}}, "trainer": {"method": m},
                                    "data": {"max_length": 16384}, "training": {"batch_size": 2, "precision": "bf16"}},
                              cuda=True, manager=mgr) for m in ("dpo", "orpo", "kto")}
    per_position = 32000 * 4
    assert est["dpo"]["assumptions"]["logits_positions"] == FUSED_HEAD_POSITIONS
    # 2 x 16,384 tokens x 2 responses = 65,536 positions a micro-batch
    assert est["dpo"]["bytes"]["logits"] == FUSED_HEAD_POSITIONS * per_position * 3
    assert est["orpo"]["bytes"]["logits"] == 65536 * per_position * 3
    ref_layers = est["kto"]["bytes"]["reference_pass"] - 32768 * per_position  # KTO: one sequence, all of it
    assert est["dpo"]["bytes"]["reference_pass"] == 2 * ref_layers + FUSED_HEAD_POSITIONS * per_position


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
    """ftk's trainer (padding-free where the method has it), ftk's with ``padding_free: false`` and TRL's own
    on three identically loaded models (ftk's loading: NF4, LoRA); ``pings`` gets the topic each time TRL's
    usage telemetry would be sent."""
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from ftk import data as D
    from ftk import model as M
    from ftk import train as T
    from ftk.manager import FtkPluginManager

    mgr = FtkPluginManager()
    # prompts cut to 24 tokens: the sequences' lengths differ (41 to 87 tokens), so the padded batch has padding
    # and the packed one rows of two sequences
    r = recipe_for(tmp_path / method, method, manager=mgr, n_pairs=8, n_val=0, max_steps=1, max_prompt_length=24,
                   attention="sdpa")
    tok = M.load_tokenizer(r)
    pairs = D.prepare_data(r, tok, mgr).train  # the core's pairs: what a "pairs" trainer gets
    plan = T.trainer_plan(r, mgr, str(tmp_path / method))
    ours, padded, theirs = (M.load_model(r, mgr, tok)[0] for _ in range(3))
    args = lambda: plan.training_arguments(T.training_arguments(r, str(tmp_path / method), has_eval=False))
    ftk_trainer = T._plan_trainer_class(plan, r)(model=ours, args=args(), data_collator=None, train_dataset=pairs,
                                                 processing_class=tok)
    r_padded = recipe_for(tmp_path / method, method, {"padding_free": False} if method != "orpo" else None,
                          manager=mgr, n_pairs=8, n_val=0, max_steps=1, max_prompt_length=24, attention="sdpa")
    ftk_padded = T._plan_trainer_class(T.trainer_plan(r_padded, mgr, str(tmp_path / method)), r_padded)(
        model=padded, args=args(), data_collator=None, train_dataset=pairs, processing_class=tok)
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
    theirs_params, padded_params = dict(theirs.named_parameters()), dict(padded.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.05
            theirs_params[n].data = p.data.clone()
            padded_params[n].data = p.data.clone()
    batch = ftk_trainer.data_collator([ftk_trainer.train_dataset[i] for i in range(4)])
    return ftk_trainer, ftk_padded, trl_trainer, batch


@contextlib.contextmanager
def _backbone_calls(model):
    """The inputs of every call of the transformer under ``model``'s LM head (TRL's fused head calls it)."""
    calls = []
    backbone = model.get_base_model().model
    hook = backbone.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def _sequences_of(call) -> list[list[int]]:
    """The token sequences a call runs, sorted: the rows' unmasked tokens, or the packed rows split where
    the position ids restart (a row's unused end, all pad id 0, left out)."""
    ids = call["input_ids"]
    if call.get("attention_mask") is not None:
        return sorted(row[mask.bool()].tolist() for row, mask in zip(ids, call["attention_mask"]))
    out = []
    for row, pos in zip(ids.tolist(), call["position_ids"].tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [row[a:b] for a, b in zip(starts, starts[1:]) if any(row[a:b])]
    return sorted(out)


def _last_metrics(trainer) -> dict:
    """What the trainer logs for the batch it computed last (ORPO keeps its metrics in ``_stored_metrics``)."""
    kept = trainer._metrics if hasattr(trainer, "_metrics") else trainer._stored_metrics
    return {k: v[-1] for k, v in kept["train" if trainer.model.training else "eval"].items() if v}


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_loss_equals_trls_own_trainer(tmp_path, monkeypatch, method):
    import trl.trainer.base_trainer

    pings = []
    monkeypatch.delenv("CI", raising=False)  # TRL stays quiet under CI; here it must want to ping
    monkeypatch.setattr(trl.trainer.base_trainer, "send_telemetry", lambda topic, **kw: pings.append(topic))
    ftk_trainer, ftk_padded, trl_trainer, batch = _two_models(tmp_path, method, pings)
    # ftk's trainers never ping the Hub (TRL's own does, unless HF_HUB_DISABLE_TELEMETRY/HF_HUB_OFFLINE)
    assert pings == ["ftk done", f"trl/{type(trl_trainer).__name__}"]
    # TRL's reference is a "ref" copy of the fresh adapter, ftk's the adapter disabled (ORPO has none)
    assert "ref" not in ftk_trainer.model.peft_config
    assert ("ref" in trl_trainer.model.peft_config) == (method != "orpo")
    assert all(p.dtype == torch.float32 for p in ftk_trainer.model.parameters() if p.requires_grad)
    # DPO and KTO are padding-free by default; ORPO reads the full logits and stays padded
    assert ftk_trainer.ftk_packing == (None if method == "orpo" else "rows") and ftk_padded.ftk_packing is None
    losses, metrics, calls = {}, {}, {}
    with torch.no_grad():
        for name, tr in (("ftk", ftk_trainer), ("ftk padded", ftk_padded), ("TRL", trl_trainer)):
            with _backbone_calls(tr.model) as calls[name]:
                losses[name] = tr.compute_loss(tr.model, batch).item()
            metrics[name] = _last_metrics(tr)
    print(f"{method}: " + ", ".join(f"{k} {v:.8f}" for k, v in losses.items()))
    ours, theirs = losses["ftk"], losses["TRL"]
    assert math.isfinite(ours) and abs(ours - theirs) < 1e-5, (ours, theirs)
    # the padding-free loss and every logged metric are the padded path's and TRL's (relative 1e-5)
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    assert close(ours, losses["ftk padded"]) and close(losses["ftk padded"], theirs), losses
    assert len(metrics["ftk"]) >= {"dpo": 11, "orpo": 11, "kto": 8}[method]
    worst = max(abs(v - m[k]) / max(abs(m[k]), 1e-12) for m in (metrics["ftk padded"], metrics["TRL"])
                for k, v in metrics["ftk"].items())
    print(f"{method}: {sorted(metrics['ftk'])}, largest relative difference {worst:.1e}")
    for other in ("ftk padded", "TRL"):
        assert metrics[other].keys() == metrics["ftk"].keys()
        differ = {k: (v, metrics[other][k]) for k, v in metrics["ftk"].items() if not close(v, metrics[other][k])}
        assert not differ, (other, differ)
    # what reached the model: TRL's own padded batches with padding_free false, packed rows without
    n_calls = {"dpo": 2, "kto": 4}.get(method, 1)  # policy + reference (KTO: + the KL pass of each)
    assert len(calls["ftk"]) == len(calls["ftk padded"]) == len(calls["TRL"]) == n_calls
    for padded_call, trl_call in zip(calls["ftk padded"], calls["TRL"]):
        assert torch.equal(padded_call["input_ids"], trl_call["input_ids"])
        assert torch.equal(padded_call["attention_mask"], trl_call["attention_mask"])
    if method == "orpo":  # (its batch holds chosen_/rejected_ columns, concatenated in its forward)
        assert torch.equal(calls["ftk"][0]["input_ids"], calls["ftk padded"][0]["input_ids"])
    else:  # the last call is the reference pass on the collator's batch
        assert torch.equal(calls["TRL"][-1]["input_ids"], batch["input_ids"])
        assert torch.equal(calls["TRL"][-1]["attention_mask"], batch["attention_mask"])
        for packed_call, padded_call in zip(calls["ftk"], calls["ftk padded"]):
            assert packed_call.get("attention_mask") is None and packed_call["position_ids"] is not None
            assert _sequences_of(packed_call) == _sequences_of(padded_call)
        # fewer positions: some rows hold two sequences
        assert sum(c["input_ids"].numel() for c in calls["ftk"]) < sum(c["input_ids"].numel()
                                                                     for c in calls["ftk padded"])
    if method != "orpo":  # against the reference, the perturbed policy is not at the starting loss
        assert abs(ours - {"dpo": math.log(2), "kto": 0.5}[method]) > 1e-3


# -- padding-free model calls ----------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "sdpa_packed", "eager"])
def test_a_packed_call_returns_the_padded_calls_per_token_outputs(attention):
    """transformers 5 masks packed sequences from position ids that restart (no attention mask): TRL's
    fused head on the packed rows (``rows``: no wider than the longest sequence; ``one row``) gives every
    per-token output, the loss and the gradient of the padded call, 0 at padding as there. With ftk's
    ``sdpa_packed`` the packed call also carries the sequences' bounds, which that attention reads."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ftk import attention as ftk_attention
    from ftk.plugins.trainer_preference import PackedBatch, packed_forward

    ftk_attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation=attention)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    fused = model.forward
    lengths = [17, 5, 30, 12, 30, 9, 2]
    mask = (torch.arange(30) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, 500, mask.shape).masked_fill(mask == 0, 0)
    labels = ids.masked_fill((mask == 0) | (torch.arange(30) < 4), -100)  # the first 4 tokens: a "prompt"
    call = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True)
    weight = model.model.layers[0].self_attn.q_proj.weight

    def run(forward):
        model.zero_grad()
        out = forward(**call)
        out.log_probs.sum().backward()
        return out, weight.grad.clone()

    want, want_grad = run(fused)
    for one_row, rows in ((False, 4), (True, 1)):  # rows: 30 | 30 | 17+12 | 9+5+2
        packed = PackedBatch(mask, one_row)
        assert packed.size[0] == rows and packed.size[1] == (30 if not one_row else sum(lengths))
        seen = []
        got, got_grad = run(packed_forward(lambda **kw: seen.append(kw) or fused(**kw), one_row,
                                           bounds=attention == "sdpa_packed"))
        if attention == "sdpa_packed":
            assert seen[0]["cu_seq_lens_q"].tolist() == ftk_attention.sequence_bounds(packed.position_ids).tolist()
        for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            assert got[k].shape == want[k].shape == (7, 29), k
            assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-5, atol=2e-5), (k, one_row)
        assert torch.allclose(got.log_probs.sum(1), want.log_probs.sum(1), rtol=1e-5, atol=1e-5)
        assert torch.allclose(got.loss, want.loss, rtol=1e-6) and torch.allclose(got_grad, want_grad, atol=1e-4)
    # the control: the same rows with positions that do not restart let each sequence see the one before
    packed = PackedBatch(mask)
    wrong = fused(input_ids=packed.pack(ids, 0), position_ids=torch.arange(30).expand(*packed.size),
                  shift_labels=packed.shift_labels(labels), fused_lm_head=True, use_cache=False)
    assert (packed.unpack(wrong.log_probs) - want.log_probs).abs().max() > 0.1
    # calls it cannot pack go through unchanged: left padding, no fused head (generation)
    model.zero_grad()
    left = dict(call, input_ids=ids.flip(1), attention_mask=mask.flip(1), labels=labels.flip(1))
    assert torch.equal(packed_forward(fused)(**left).log_probs, fused(**left).log_probs)
    with torch.no_grad():
        plain = packed_forward(fused)(input_ids=ids[:1, :17])
    assert plain.logits.shape == (1, 17, model.config.vocab_size)


def test_padding_free_dpo_trains_as_the_padded_run(tmp_path):
    """A short padding-free DPO run (prompts cut to 24 tokens, so sequences of 41-96 tokens share rows)
    starts at log 2, learns (reward accuracy rises, the adapter moves) and follows the padded run."""
    kw = dict(n_pairs=40, n_val=0, max_steps=8, max_prompt_length=24, attention="sdpa")
    free = train_pairs(tmp_path / "free", "dpo", **kw)
    padded = train_pairs(tmp_path / "padded", "dpo", trainer={"padding_free": False}, **kw)
    assert free.model.get_base_model().forward.ftk_packed == "rows"
    assert not hasattr(padded.model.get_base_model().forward, "ftk_packed")
    assert abs(free.metrics["first_loss"] - math.log(2)) < 1e-6
    assert free.metrics["tokens"] == padded.metrics["tokens"]  # non-padding tokens, from the same batches
    a, b = ([r for r in log_rows(tmp_path / x) if "loss" in r] for x in ("free", "padded"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "entropy"):
            assert math.isclose(ra[k], rb[k], rel_tol=1e-4, abs_tol=1e-5), (ra["step"], k, ra[k], rb[k])
    accuracy = [r["rewards/accuracies"] for r in a]
    assert accuracy[0] == 0.0 and sum(accuracy[-4:]) / 4 > 0.5  # ties at the start; the chosen wins later
    assert a[-1]["loss"] < math.log(2)
    moved, same = lora_b(free.model), lora_b(padded.model)
    assert all(v.abs().sum() > 0 for v in moved.values())
    assert max((moved[k] - same[k]).abs().max().item() for k in moved) < 1e-4


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

"""The `lm_eval` metric: lm-evaluation-harness tasks on the base and the fine-tuned model of a run.

Offline: the tasks are local YAML files written at test time over the shared DailyDialog preference pairs (a
multiple-choice task: the real next reply or one from another conversation; a rolling log-likelihood task over
the real replies), nothing comes from the hub. The reference is ``lm_eval.simple_evaluate`` called directly on the
same model: the run's adapter loaded onto the base as the run built it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import MODEL_DIR, ROOT, SHARED
from ftk.testing import tiny_model  # noqa: F401 - fixture

pytest.importorskip("lm_eval")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
PAIRS = SHARED / "data" / "preference" / "dailydialog_pairs.jsonl"
OFFTOPIC = SHARED / "data" / "preference" / "dailydialog_pairs_offtopic.jsonl"
TASKS = ["dd_next_reply", "dd_reply_text"]
LIMIT = 16
KEYS = [f"lm_eval/dd_next_reply/{m}" for m in ("acc", "acc_norm")] + \
       [f"lm_eval/dd_reply_text/{m}" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]


def write_tasks(folder):
    """Two lm-eval tasks over the shared pairs (absolute data paths: the harness reads data_files from the
    current folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dd_next_reply.yaml").write_text(textwrap.dedent(f"""\
        task: dd_next_reply
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {OFFTOPIC}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{ prompt[-1].content }}}}"
        doc_to_choice: "{{{{ [chosen[0].content, rejected[0].content] }}}}"
        doc_to_target: 0
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
          - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
        """))
    (folder / "dd_reply_text.yaml").write_text(textwrap.dedent(f"""\
        task: dd_reply_text
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {PAIRS}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{ chosen[0].content }}}}"
        metric_list:
          - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
          - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
          - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
        """))
    return folder


def raw_recipe(out, tasks=TASKS, include_path=("tasks",), **metric) -> dict:
    """stories260K in NF4 with LoRA, a few steps on DailyDialog at a high learning rate (the adapter must move the
    numbers); fp32 on every CPU."""
    return {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4", "compute_dtype": "float32"}},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"datasets": [{"loader": "dailydialog", "path": str(SHARED / "data" / "dailydialog"),
                               "max_examples": 48}], "max_length": 128, "validation_size": 2},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0,
                     "optimizer": "adamw_torch", "precision": "fp32", "report_to": ["none"], "logging_steps": 1},
        "evaluation": {"metrics": [{"name": "lm_eval", "tasks": list(tasks), "include_path": list(include_path),
                                    "limit": LIMIT, **metric}],
                       "max_samples": 1, "compare_base": True, "num_examples_in_report": 1,
                       "generation": {"max_new_tokens": 4, "num_beams": 1}},
        "output_dir": str(out),
    }


def reference(model, tokenizer, tasks_dir, batch_size) -> dict:
    """lm-eval's own numbers for ``model``, called as its documentation says for an in-memory model."""
    import copy

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=TASKS, limit=LIMIT, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    return {f"lm_eval/{t}/{k.split(',')[0]}": v for t, r in res["results"].items() for k, v in r.items()
            if k.endswith(",none") and "_stderr" not in k}


def test_a_run_reports_lm_eval_for_base_and_finetuned_as_lm_eval_computes_them(tmp_path, fresh_manager):
    """A run (NF4 + LoRA, 6 steps) with the metric: metrics.json has every task's metrics for the base and the
    fine-tuned model, equal to lm_eval.simple_evaluate on the same models (the run's adapter loaded onto the base
    as the run built it, then disabled); the report's table gives the verdict by lm-eval's directions."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ftk import model as model_mod
    from ftk.evaluate import metric_directions
    from ftk.recipe import load_recipe
    from ftk.run import run_recipe

    tasks_dir = write_tasks(tmp_path / "tasks")
    (tmp_path / "recipe.json").write_text(json.dumps(raw_recipe(tmp_path / "run")))
    recipe = load_recipe(tmp_path / "recipe.json", manager=fresh_manager)
    assert recipe["evaluation"]["metrics"][0]["include_path"] == [str(tasks_dir)]  # relative to the recipe
    run_recipe(recipe, fresh_manager)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ft, base = metrics["finetuned"], metrics["base"]
    assert set(KEYS) <= set(ft) and set(KEYS) <= set(base)
    assert not [k for k in ft if k.startswith("lm_eval/") and k not in KEYS]
    for k in KEYS[2:]:  # the adapter moved the replies' likelihood
        assert ft[k] != pytest.approx(base[k], rel=1e-3), k

    directions = metric_directions(recipe, fresh_manager)
    assert {k: directions[k] for k in KEYS} == dict(zip(KEYS, [True, True, False, False, False]))
    report = (tmp_path / "run" / "report.md").read_text()
    for k in KEYS:
        b, f = base[k], ft[k]
        better = "same" if b == f else "fine-tuned" if (f > b) == directions[k] else "base"
        row = next(line for line in report.splitlines() if line.startswith(f"| {k} |"))
        assert row.rstrip().endswith(f"| {better} |"), row

    # the reference: the same model rebuilt (base quantized and prepared as the run did, a LoRA adapter holding
    # the run's trained weights), scored by lm-eval directly
    tokenizer = model_mod.load_tokenizer(recipe)
    model, _ = model_mod.load_model(recipe, fresh_manager, tokenizer)
    set_peft_model_state_dict(model, load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")))
    model.eval()
    batch = recipe["training"]["eval_batch_size"] or recipe["training"]["batch_size"]
    with torch.no_grad():
        ref_ft = reference(model, tokenizer, tasks_dir, batch)
        with model.disable_adapter():
            ref_base = reference(model, tokenizer, tasks_dir, batch)
    for k in KEYS:
        assert ft[k] == pytest.approx(ref_ft[k], rel=1e-6), k
        assert base[k] == pytest.approx(ref_base[k], rel=1e-6), k


def test_the_run_tokenizer_and_random_state_stay_as_they_were(tmp_path, fresh_manager, tiny_model):
    """HFLM gives a tokenizer without a pad token one, and simple_evaluate seeds Python's, NumPy's and torch's
    generators: neither reaches ftk's tokenizer or the caller's random state."""
    import random

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftk.evaluate import build_metrics, metric_context, score_model

    tasks_dir = write_tasks(tmp_path / "tasks")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    assert tok.pad_token is None
    recipe = {"evaluation": {"metrics": [{"name": "lm_eval", "tasks": ["dd_reply_text"], "include_path": [str(tasks_dir)],
                                          "limit": 4}]}}
    metrics = build_metrics(recipe, fresh_manager)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    scores, _ = score_model(model, tok, metrics, None, [], [], {}, context=metric_context(recipe, "base"))
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert drawn == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert tok.pad_token is None and model.training
    assert sorted(scores) == ["eval_samples"] + [f"lm_eval/dd_reply_text/{m}" for m in
                                                 ("bits_per_byte", "byte_perplexity", "word_perplexity")]


def run_cli(*args, code_prefix=""):
    code = (f"import sys\n{code_prefix}\nfrom ftk.cli import main\n"
            "try:\n    main(sys.argv[1:])\n"
            "finally:\n    print('IMPORTED:' + ','.join(m for m in ('lm_eval', 'torch') if m in sys.modules),\n"
            "          file=sys.stderr, flush=True)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT)


def errors(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if not line.startswith("IMPORTED:")]


def test_listing_and_validating_import_neither_lm_eval_nor_torch(tmp_path):
    """`ftk plugins list` and `ftk validate` stay cheap; include_path is relative to the recipe and must exist."""
    write_tasks(tmp_path / "tasks")
    (tmp_path / "r.json").write_text(json.dumps(raw_recipe(tmp_path / "run")))
    listed = run_cli("plugins", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("lm_eval "))
    assert line.split()[3] == "ok" and line.endswith("metric:lm_eval")
    valid = run_cli("validate", tmp_path / "r.json")
    assert valid.returncode == 0, valid.stderr
    for res in (listed, valid):
        assert "IMPORTED:" in res.stderr.splitlines(), res.stderr  # neither module
    (tmp_path / "bad.json").write_text(json.dumps(raw_recipe(tmp_path / "run", include_path=["no_tasks_here"])))
    bad = run_cli("validate", tmp_path / "bad.json")
    assert bad.returncode == 2
    assert errors(bad) == [f"error: evaluation.metrics[0].include_path[0]: {tmp_path / 'no_tasks_here'} does not exist"]


def test_an_unknown_task_is_one_line_naming_it_before_training(tmp_path):
    """`ftk run` with a task lm-eval does not have: exit 2 and one line naming the task's recipe path, before any
    model loads (no output folder); a near miss gets lm-eval's own name suggested."""
    write_tasks(tmp_path / "tasks")
    (tmp_path / "r.json").write_text(json.dumps(raw_recipe(tmp_path / "run", tasks=["dd_next_reply", "hellaswagg"])))
    res = run_cli("run", tmp_path / "r.json")
    assert res.returncode == 2, res.stderr
    (line,) = errors(res)
    assert line.startswith("error: evaluation.metrics[0].tasks[1]: unknown lm-eval task 'hellaswagg' (not a task or "
                           "group of lm-eval or of include_path); did you mean 'hellaswag'"), line
    assert not (tmp_path / "run").exists()


def test_without_lm_eval_the_metric_is_unavailable_and_refused_in_one_line(tmp_path):
    """lm_eval made unimportable (``sys.modules["lm_eval"] = None``, what Python does for a blocked module)."""
    (tmp_path / "r.json").write_text(json.dumps(raw_recipe(tmp_path / "run")))
    (tmp_path / "tasks").mkdir()
    block = "sys.modules['lm_eval'] = None"
    listed = run_cli("plugins", "list", code_prefix=block)
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("lm_eval "))
    assert line.split()[3] == "unavailable"
    assert line.endswith("metric:lm_eval (needs lm_eval: pip install 'ftk[lm-eval]')")
    res = run_cli("validate", tmp_path / "r.json", code_prefix=block)
    assert res.returncode == 2
    assert errors(res) == ["error: evaluation.metrics[0].name: metric 'lm_eval' needs lm_eval: "
                           "pip install 'ftk[lm-eval]'"]


def test_declared_directions_are_lm_evals_registry():
    """The plugin's table of which way each metric improves is lm-eval's own (its metric registry)."""
    import lm_eval.api.metrics  # noqa: F401 - registers the metrics
    from lm_eval.api.registry import HIGHER_IS_BETTER_REGISTRY

    from ftk.plugins.metric_lm_eval import DIRECTIONS

    registry = {name: HIGHER_IS_BETTER_REGISTRY.get(name) for name in HIGHER_IS_BETTER_REGISTRY
                if name != "bypass"}  # lm-eval's placeholder for predict-only runs, not a score
    assert DIRECTIONS == registry


@pytest.mark.skipif(not (ROOT.parent / "shared").is_dir(), reason="examples/ reads the shared material at ../shared")
def test_the_example_recipe_validates_and_its_local_tasks_load(fresh_manager, monkeypatch):
    """examples/lm_eval.json, from the project root as docs/evaluation.md says: its metric builds (task names
    known, datasets read, metrics present), which is what `ftk run` checks before training."""
    from ftk.evaluate import build_metrics
    from ftk.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "examples" / "lm_eval.json", manager=fresh_manager)
    (_, perplexity), (_, metric) = build_metrics(recipe, fresh_manager)
    assert metric.requires == "model"
    assert metric.tasks == ["dailydialog_next_reply", "dailydialog_reply_text"]
    assert metric.task_manager.all_tasks == sorted(metric.tasks)  # local tasks only: lm-eval's index not built

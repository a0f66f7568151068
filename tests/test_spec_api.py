"""examples/spec_api.py: the specification's sections 6 and 8, as written there, run as a user runs
the script; its numbers are checked against the run's own files and against recomputation."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "examples" / "spec_api.py"


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--steps", "12", "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


def _spec_module():
    spec = importlib.util.spec_from_file_location("spec_api", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_specification_runs_and_fine_tuning_lowers_perplexity(spec_run):
    out, stdout = spec_run
    metrics = json.loads((out / "metrics.json").read_text())
    base, tuned = metrics["base"], metrics["finetuned"]
    assert tuned["perplexity"] < base["perplexity"]
    table = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line and line.split()[0] in base}
    for key in ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "CustomEvaluator"):
        assert [float(v) for v in table[key]] == [pytest.approx(base[key], abs=1e-4),
                                                  pytest.approx(tuned[key], abs=1e-4)], key
    # PerplexityEvaluator(trainer.model, trainer.tokenizer) on trainer.eval_dataloader() is the run's number
    ppl = float(next(x for x in stdout.splitlines() if x.startswith("PerplexityEvaluator")).rsplit(" ", 1)[1])
    assert ppl == pytest.approx(tuned["perplexity"], rel=1e-4)


def test_the_custom_loader_class_supplied_half_of_the_balanced_mix(spec_run):
    out, _ = spec_run
    stats = json.loads((out / "manifest.json").read_text())["data"]["stats"]
    per = stats["train"]["per_dataset"]
    assert per["local/CustomDatasetLoader"] == per["alpaca"] > 0  # mixing "balanced"
    mine = next(d for d in stats["datasets"] if d["name"] == "local/CustomDatasetLoader")
    assert mine["validation_from"] == "own split" and mine["examples"]["validation"] > 0


def test_the_custom_evaluator_scores_the_run_generations(spec_run):
    """The value reported under the class's name is its compute_metric on the run's own generations."""
    out, _ = spec_run
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    evaluator = _spec_module().CustomEvaluator()
    refs = [r["reference"] for r in rows]
    for side in ("base", "finetuned"):
        want = evaluator.compute_metric([r[side] for r in rows], refs)
        assert metrics[side]["CustomEvaluator"] == pytest.approx(want, abs=1e-12), side
    assert "CustomEvaluator" in (out / "report.md").read_text()

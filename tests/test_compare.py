"""`ftk compare`: two real tiny runs that differ only in learning rate: the recipe diff names exactly that
key, both runs' metrics are side by side, --json says the same, the picture is written; a folder that is not
a run is a one-line error (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import ALPACA, MODEL_DIR


def _recipe(out, lr: float) -> dict:
    return {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                 "max_length": 64, "validation_size": 8, "cache": False},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": lr, "report_to": ["none"],
                     "precision": "fp32"},
        "evaluation": {"metrics": ["perplexity"], "compare_base": True, "max_samples": 2},
        "output_dir": str(out),
    }


def _cli():
    from ftk.cli import _build

    return _build()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compare")
    dirs = []
    for name, lr in (("slow", 1e-4), ("fast", 5e-3)):
        (root / f"{name}.json").write_text(json.dumps(_recipe(root / name, lr)))
        res = CliRunner().invoke(_cli(), ["run", str(root / f"{name}.json")], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        dirs.append(str(root / name))
    return root, dirs


def test_text_output(runs, tmp_path, monkeypatch):
    root, dirs = runs
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_cli(), ["compare", *dirs], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    diff, metrics = res.output.split("\n\nmetrics")
    lines = diff.splitlines()
    assert lines[0] == "recipe differences" and lines[1].split() == ["key", *dirs]
    assert [ln.split() for ln in lines[2:]] == [["training.learning_rate", "0.0001", "0.005"]]
    m = {ln.split()[0]: ln.split()[1:] for ln in metrics.split("\n\n")[0].splitlines()[1:]}
    for i, d in enumerate(dirs):
        got = json.loads((root / d / "metrics.json").read_text())
        assert m["train.final_loss"][i].rstrip("*") == f"{got['train']['final_loss']:.4f}"
        assert m["finetuned.perplexity"][i].rstrip("*") == f"{got['finetuned']['perplexity']:.4f}"
    # perplexity declares lower is better: exactly one run is marked, the lower one
    ppl = [json.loads((root / d / "metrics.json").read_text())["finetuned"]["perplexity"] for d in dirs]
    marked = [i for i, v in enumerate(m["finetuned.perplexity"]) if v.endswith("*")]
    assert marked == [ppl.index(min(ppl))]
    assert not any(v.endswith("*") for v in m["train.steps"])  # no direction, no verdict
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the default path


def test_json_output(runs, tmp_path):
    root, dirs = runs
    pic = tmp_path / "pics" / "losses.png"
    res = CliRunner().invoke(_cli(), ["compare", *dirs, "--json", "--out", str(pic)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["runs"] == dirs and got["picture"] == str(pic) and pic.is_file()
    assert got["recipe_diff"] == {"training.learning_rate": [1e-4, 5e-3]}
    row = got["metrics"]["finetuned.perplexity"]
    ppl = [json.loads((root / d / "metrics.json").read_text())["finetuned"]["perplexity"] for d in dirs]
    assert row["values"] == ppl and row["higher_is_better"] is False and row["best"] == [ppl.index(min(ppl))]
    assert got["metrics"]["base.perplexity"]["best"] == []  # the same base model: a tie, no verdict


def test_not_a_run_folder(runs, tmp_path):
    _, dirs = runs
    p = subprocess.run([sys.executable, "-m", "ftk", "compare", dirs[0], str(tmp_path)], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"error: {tmp_path}: not an ftk run folder (no recipe.json)\n"
    assert not (tmp_path / "compare.png").exists()


def test_flatten_and_diff():
    from ftk.cmd_compare import flatten, recipe_diff

    assert flatten({"a": {"b": 1, "c": [{"d": 2}]}, "e": {}}) == {"a.b": 1, "a.c.0.d": 2, "e": {}}
    # output_dir always differs and is each column's name; a missing key counts as null
    assert recipe_diff([{"output_dir": "x", "t": {"lr": 1, "s": None}}, {"output_dir": "y", "t": {"lr": 2}}]) == \
        {"t.lr": [1, 2]}

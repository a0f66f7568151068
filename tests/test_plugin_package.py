"""Issue #6 as a plugin user lives it: the example package examples/ftk-sharegpt is really
installed (pip, into a throwaway venv that sees this ftk), then used through `ftk` processes;
a real `pip uninstall` removes it again; a broken copy is listed with its error and breaks nothing
else."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL_DIR, ROOT
from ftk.testing import find_values

EXAMPLE = ROOT / "examples" / "ftk-sharegpt"
SAMPLE = EXAMPLE / "tests" / "data" / "sample_sharegpt.json"
PROVIDES = ["dataset:sharegpt", "metric:distinct_n", "metric:exact_match"]


def _copy_source(dst: Path) -> Path:
    # build from a copy: pip writes build/ and *.egg-info next to the sources
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dst


def _pip(python: Path | str, *args: str) -> None:
    p = subprocess.run([str(python), "-m", "pip", *args, "-q", "--disable-pip-version-check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv that sees the installed ftk (system site-packages) but has its own site-packages,
    so installing and uninstalling the plugin there leaves the test environment untouched."""
    import site
    import sysconfig

    d = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(d)], check=True)
    # When the tests themselves run in a venv (CI's .venv), --system-site-packages reaches the base
    # interpreter, not that venv: add the running interpreter's site dirs (with their .pth files, so an
    # editable ftk is found) after the new venv's own site-packages.
    purelib = sysconfig.get_path("purelib", vars={"base": str(d), "platbase": str(d)})
    Path(purelib).mkdir(parents=True, exist_ok=True)
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_ftk_test_parent.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    src = _copy_source(d / "src")  # kept for the reinstall after the uninstall test
    _pip(d / "bin" / "python", "install", "--no-deps", "--no-build-isolation", str(src))
    return d


@pytest.fixture(scope="module")
def python(venv) -> Path:
    return venv / "bin" / "python"


def ftk(python, *args, cwd=None, env=None):
    import os

    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(python), "-m", "ftk", *args], capture_output=True, text=True, cwd=cwd, env=e)


def plugins_json(python, env=None) -> dict:
    p = ftk(python, "plugins", "list", "--json", env=env)
    assert p.returncode == 0, p.stderr
    return {r["name"]: r for r in json.loads(p.stdout)}


def write_recipe(tmp_path: Path, name="recipe.json", **changes) -> Path:
    recipe = {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"datasets": [{"loader": "sharegpt", "path": str(SAMPLE)}], "max_length": 128,
                 "validation_size": 2},
        "training": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "warmup_ratio": 0, "optimizer": "adamw_torch", "precision": "fp32", "report_to": ["none"]},
        "evaluation": {"metrics": ["perplexity", {"name": "distinct_n", "n": 2}, "exact_match"],
                       "max_samples": 2, "compare_base": False,
                       "generation": {"max_new_tokens": 8, "num_beams": 1, "batch_size": 2}},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split("__")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    path = tmp_path / name
    path.write_text(json.dumps(recipe))
    return path


# -- installed ------------------------------------------------------------------------------------
def test_installed_plugin_is_listed(python):
    recs = plugins_json(python)
    rec = recs["sharegpt"]
    assert (rec["package"], rec["version"], rec["status"], rec["error"]) == ("ftk-sharegpt", "0.1.0", "ok", None)
    assert rec["provides"] == PROVIDES and rec["module"] == "ftk_sharegpt.plugin"
    assert all(r["status"] == "ok" for r in recs.values())
    # the table for people says the same
    table = ftk(python, "plugins", "list").stdout
    assert re.search(r"^sharegpt\s+ftk-sharegpt\s+0\.1\.0\s+ok\s+dataset:sharegpt", table, re.M)


def test_plugin_module_imports_nothing_heavy(python):
    # every ftk command imports it; torch and friends belong inside the factories
    code = ("import sys, ftk_sharegpt.plugin; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'bitsandbytes') if m in sys.modules))")
    p = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_plugin_options_schema_is_shown(python):
    p = ftk(python, "plugins", "show", "metric:distinct_n")
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert shown["package"] == "ftk-sharegpt" and shown["options_schema"]["properties"]["n"]["default"] == 2


def test_validate_recipe_using_the_plugin(python, tmp_path):
    p = ftk(python, "validate", str(write_recipe(tmp_path)))
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("change, where", [
    ({"evaluation__metrics__1__n": 0}, "evaluation.metrics[1].n"),
    ({"data__datasets__0__format": "xml"}, "data.datasets[0].format"),
    ({"data__datasets__0__template": "alpaca"}, "data.datasets[0].template"),
])
def test_bad_plugin_option_fails_with_its_json_path(python, tmp_path, change, where):
    p = ftk(python, "validate", str(write_recipe(tmp_path, **change)))
    assert p.returncode == 2
    assert where in p.stderr and "Traceback" not in p.stderr


def test_requires_plugins(python, tmp_path):
    ok = write_recipe(tmp_path, "ok.json", requires_plugins=["ftk-sharegpt>=0.1"])
    assert ftk(python, "validate", str(ok)).returncode == 0
    old = ftk(python, "validate", str(write_recipe(tmp_path, "old.json", requires_plugins=["ftk-sharegpt>=0.2"])))
    assert old.returncode == 2
    assert "ftk-sharegpt 0.1.0 is installed but the recipe needs 'ftk-sharegpt>=0.2'" in old.stderr
    # a missing plugin is reported before anything else is looked at (the bad loader is not)
    missing = write_recipe(tmp_path, "missing.json", requires_plugins=["ftk-nosuchplugin>=1"],
                           data__datasets__0__loader="nosuch")
    p = ftk(python, "validate", str(missing))
    assert p.returncode == 2
    assert "requires_plugins[0]: plugin package 'ftk-nosuchplugin' is not installed" in p.stderr
    assert "nosuch'" not in p.stderr.replace("ftk-nosuchplugin", "")


def test_data_preview_with_the_plugin(python, tmp_path):
    recipe = str(write_recipe(tmp_path))
    p = ftk(python, "data", "preview", "-n", "3", recipe)
    assert p.returncode == 0, p.stderr
    # rendered with the plugin's plain template: speakers mapped, never the raw ShareGPT names
    assert "Assistant:" in p.stdout and not re.search(r"\b(?:human|gpt)\s*:", p.stdout)
    p = ftk(python, "data", "preview", "-n", "3", "--json", recipe)
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert len(shown) == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    convs = [r["conversations"] for r in json.loads(SAMPLE.read_text())]
    for item in shown:
        conv = next(c for c in convs if c[-2]["value"] in item["text"] or c[0]["value"] in item["text"])
        trained = tok.decode([i for i, lab in zip(item["input_ids"], item["labels"]) if lab != -100])
        # loss on the assistant turns only: the first reply is trained, no user/system text is
        assert next(t["value"] for t in conv if t["from"] == "gpt") in trained
        for t in conv:
            if t["from"] != "gpt":
                assert t["value"] not in trained


def test_short_run_with_the_plugin(python, tmp_path):
    recipe = write_recipe(tmp_path)
    p = ftk(python, "run", str(recipe))
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    found = find_values(metrics, "distinct_1") + find_values(metrics, "distinct_2")
    assert found and all(0.0 <= v <= 1.0 for v in found)
    assert find_values(metrics, "exact_match")
    manifest = json.loads((out / "manifest.json").read_text())
    assert "ftk-sharegpt==0.1.0" in manifest["plugins"]




def test_uninstall_removes_it(python, tmp_path):
    _pip(python, "uninstall", "-y", "ftk-sharegpt")
    try:
        recs = plugins_json(python)
        assert "sharegpt" not in recs
        assert not any(c in PROVIDES for r in recs.values() for c in r["provides"])
        p = ftk(python, "validate", str(write_recipe(tmp_path)))
        assert p.returncode == 2 and "data.datasets[0].loader: unknown dataset 'sharegpt'" in p.stderr
        p = ftk(python, "validate", str(write_recipe(tmp_path, requires_plugins=["ftk-sharegpt>=0.1"])))
        assert "plugin package 'ftk-sharegpt' is not installed (pip install 'ftk-sharegpt>=0.1')" in p.stderr
    finally:  # put it back for any test that runs after this one
        _pip(python, "install", "--no-deps", "--no-build-isolation", str(python.parents[1] / "src"))


# -- broken ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A copy of the example renamed to ftk-sharegpt-broken whose plugin module fails to import
    (a missing dependency), installed with --target."""
    src = _copy_source(tmp_path_factory.mktemp("broken") / "ftk-sharegpt-broken")
    (src / "ftk_sharegpt").rename(src / "ftk_sharegpt_broken")
    py = src / "pyproject.toml"
    text = py.read_text().replace('name = "ftk-sharegpt"', 'name = "ftk-sharegpt-broken"')
    text = text.replace('sharegpt = "ftk_sharegpt.plugin"', 'sharegpt_broken = "ftk_sharegpt_broken.plugin"')
    py.write_text(text.replace('packages = ["ftk_sharegpt"]', 'packages = ["ftk_sharegpt_broken"]'))
    mod = src / "ftk_sharegpt_broken" / "plugin.py"
    mod.write_text("import ftk_nonexistent_dependency  # noqa\n" + mod.read_text())
    site = tmp_path_factory.mktemp("broken-site")
    _pip(sys.executable, "install", "--no-deps", "--no-build-isolation", "--target", str(site), str(src))
    return site


def test_broken_plugin_is_listed_with_its_error_and_breaks_nothing_else(broken_site, tmp_path):
    env = {"PYTHONPATH": str(broken_site)}
    recs = plugins_json(sys.executable, env=env)
    rec = recs["sharegpt_broken"]
    assert rec["status"] == "error" and rec["package"] == "ftk-sharegpt-broken" and rec["provides"] == []
    assert rec["error"] == "import failed: ModuleNotFoundError: No module named 'ftk_nonexistent_dependency'"
    assert {"alpaca", "bnb", "lora", "metrics"} <= {n for n, r in recs.items() if r["status"] == "ok"}
    table = ftk(sys.executable, "plugins", "list", env=env)
    assert table.returncode == 0 and "ftk_nonexistent_dependency" in table.stdout
    # a recipe that does not need it still validates
    fine = write_recipe(tmp_path, "fine.json", data__datasets__0={"loader": "custom", "path": str(SAMPLE)},
                        evaluation__metrics=["perplexity"])
    p = ftk(sys.executable, "validate", str(fine), env=env)
    assert p.returncode == 0, p.stderr
    # one that needs what it would provide fails naming the plugin, its package and its error
    p = ftk(sys.executable, "validate", str(write_recipe(tmp_path)), env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "data.datasets[0].loader: unknown dataset 'sharegpt'" in p.stderr
    assert "sharegpt_broken (package ftk-sharegpt-broken 0.1.0): import failed" in p.stderr


# -- the tutorial, followed literally -------------------------------------------------------------
def tutorial_files() -> dict[str, str]:
    text = (ROOT / "docs" / "plugins" / "tutorial.md").read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, re.S))


def test_tutorial_package_from_an_empty_folder(python, tmp_path):
    files = tutorial_files()
    assert {"ftk-qa/pyproject.toml", "ftk-qa/ftk_qa/plugin.py", "qa-recipe.json", "ftk-qa/tests/test_plugin.py"} <= set(files)
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content.replace("../shared/models/stories260K", str(MODEL_DIR)))
    # its own tests pass before it is installed (ftk.testing registers it in-process)
    p = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path / "ftk-qa",
                       capture_output=True, text=True)
    assert p.returncode == 0 and "3 passed" in p.stdout, p.stdout + p.stderr
    _pip(python, "install", "--no-deps", "--no-build-isolation", str(tmp_path / "ftk-qa"))
    try:
        rec = plugins_json(python)["qa"]
        assert (rec["package"], rec["status"], rec["provides"]) == ("ftk-qa", "ok", ["dataset:qa", "metric:answer_length"])
        recipe = str(tmp_path / "qa-recipe.json")
        p = ftk(python, "validate", recipe)
        assert p.returncode == 0 and "valid" in p.stdout, p.stderr
        p = ftk(python, "data", "preview", "-n", "1", recipe)
        assert p.returncode == 0 and "[[<s> Question: " in p.stdout, p.stdout + p.stderr
        p = ftk(python, "validate", recipe, "--set", "data.datasets.0.prefx=x")
        assert p.returncode == 2
        assert "data.datasets[0].prefx: unknown key 'prefx' (did you mean 'prefix'?)" in p.stderr
    finally:
        _pip(python, "uninstall", "-y", "ftk-qa")
    p = ftk(python, "validate", recipe)
    assert "requires_plugins[0]: plugin package 'ftk-qa' is not installed (pip install 'ftk-qa>=0.1')" in p.stderr

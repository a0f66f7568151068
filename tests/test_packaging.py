"""Packaging: one import package `ftk`; the wheel has no top-level core/plugins/schemas; entry points;
a plain install (no extras) brings what the default recipe uses."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install .` would install, built once for this module."""
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return next(out.glob("ftk-*.whl"))


def test_wheel_contains_only_ftk(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ftk", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "ftk/schemas/recipe.schema.json" in names
    assert "ftk/plugins/metrics.py" in names and "ftk/cli.py" in names
    eps = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[ftk]" in eps and "alpaca = ftk.plugins.data_alpaca" in eps
    assert "[console_scripts]" in eps and "ftk = ftk.cli:main" in eps


def test_plain_install_requires_what_the_default_recipe_uses(wheel):
    """`pip install .` then `ftk run` on the default recipe: TensorBoard logging (the schema's default
    training.report_to) and matplotlib (report.md's loss curve) are unconditional requirements, not
    extras."""
    zf = zipfile.ZipFile(wheel)
    metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    unconditional = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requires if "extra ==" not in r}
    schema = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    default_trackers = set(schema["properties"]["training"]["properties"]["report_to"]["default"]) - {"none"}
    assert "tensorboard" in default_trackers
    for package in default_trackers | {"matplotlib"}:  # each tracker's package has the tracker's name
        assert package in unconditional, f"{package} is not an unconditional requirement: {requires}"


def test_python_dash_m_and_help():
    p = subprocess.run([sys.executable, "-m", "ftk", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    for cmd in ("run", "validate", "schema", "plugins"):
        assert cmd in p.stdout
    p = subprocess.run([sys.executable, "-m", "ftk", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and "0.1.0" in p.stdout


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    f = tmp_path / "r.json"
    f.write_text('{"model": {"name": 3}}')
    p = subprocess.run([sys.executable, "-m", "ftk", "validate", str(f)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "model.name: 3 is not of type 'string'" in p.stderr
    assert "(root): 'data' is a required property" in p.stderr

"""Packaging: one import package `ftk`; the wheel has no top-level core/plugins/schemas; entry points."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_contains_only_ftk(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    wheel = next(tmp_path.glob("ftk-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ftk", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "ftk/schemas/recipe.schema.json" in names
    assert "ftk/plugins/metrics.py" in names and "ftk/cli.py" in names
    eps = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[ftk]" in eps and "alpaca = ftk.plugins.data_alpaca" in eps
    assert "[console_scripts]" in eps and "ftk = ftk.cli:main" in eps


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

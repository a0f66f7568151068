"""The benchmarks stay runnable: the GPU script's code path with a tiny shape on the CPU, and the
preprocessing benchmark on the shared rows. (Speed targets are checked by running bench/, not here.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHON=sys.executable)


@pytest.mark.parametrize("shape", [[], ["--batch", "1", "--length", "1024"]], ids=["4x512", "long-context"])
def test_gpu_bench_tiny_runs_on_cpu(shape):
    p = subprocess.run(["bash", "bench/gpu.sh", "--tiny", "--steps", "2", "--setups", "baseline,ftk", *shape], cwd=ROOT,
                       capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"batch {shape[1] if shape else 4} x {shape[3] if shape else 512}" in p.stdout, p.stdout
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.startswith(("baseline", "ftk"))}
    assert set(lines) == {"baseline", "ftk"}, p.stdout + p.stderr[-2000:]
    assert all("useful tok/s" in ln and "ERROR" not in ln and "MFU" in ln for ln in lines.values())
    # --tiny takes the GPU's default path: checkpointing around compiled layers, no graph breaks
    assert "grad-ckpt True" in lines["ftk"] and "compiled layers 2 graph breaks 0" in lines["ftk"], lines["ftk"]


def test_preprocess_bench_runs():
    p = subprocess.run([sys.executable, "bench/preprocess.py", "--replicate", "1"], cwd=ROOT, capture_output=True,
                       text=True, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "cold" in p.stdout and "cached" in p.stdout and "2,000 rows" in p.stdout


def test_loss_memory_bench_runs_and_the_losses_agree():
    p = subprocess.run([sys.executable, "bench/loss_memory.py", "--batch", "2", "--seq", "256", "--vocab", "4096",
                        "--precision", "fp32"], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ERROR" not in p.stdout, p.stdout[-3000:]
    ratio = next(ln for ln in p.stdout.splitlines() if ln.startswith("chunked / plain"))
    assert float(ratio.rsplit(" ", 1)[1]) < 1e-4, ratio  # the loss difference: the same computation

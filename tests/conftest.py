"""Shared test fixtures. The real material lives in ../shared (never copied into the project)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTK_SHARED", ROOT.parent / "shared")).resolve()
MODEL_DIR = SHARED / "models" / "stories260K"
ALPACA = SHARED / "data" / "alpaca" / "alpaca_sample.json"
DAILYDIALOG = SHARED / "data" / "dailydialog"

# Two cores: keep torch from oversubscribing when several test processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def shared() -> Path:
    return SHARED


@pytest.fixture
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture
def fresh_manager():
    """A plugin manager built from the installed entry points, not shared with other tests."""
    from ftk.manager import FtkPluginManager

    return FtkPluginManager()

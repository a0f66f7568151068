"""Atomic writes leave results with the permissions a plain write gives (umask), not tempfile's 0600/0700."""
from __future__ import annotations

import os

import pytest

from ftk.io import atomic_write_json, temp_dir


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_results_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
        d = temp_dir(tmp_path, ".adapter.")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == file_mode
    assert d.stat().st_mode & 0o777 == dir_mode
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

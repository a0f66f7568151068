"""Preprocessing speed: format + tokenize 52K Alpaca-shaped rows (the shared 2,000 real rows
replicated 26x) through ftk's data pipeline, cold (empty cache) and cached (second run).

    python bench/preprocess.py [--replicate 26]

Targets (issue #7): <= 15 s cold, <= 2 s cached on the 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicate", type=int, default=26)
    a = ap.parse_args()
    from ftk import data as data_mod
    from ftk import model as model_mod
    from ftk.manager import get_manager
    from ftk.recipe import load_recipe

    rows = json.loads(common.ALPACA.read_text()) * a.replicate
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "alpaca52k.json"
        f.write_text(json.dumps(rows))
        mgr = get_manager()
        recipe = load_recipe(data={"model": {"name": str(common.TOKENIZER_DIR)},
                                   "data": {"datasets": [{"loader": "alpaca", "path": str(f)}],
                                            "cache_dir": str(Path(tmp) / "cache")},
                                   "output_dir": str(Path(tmp) / "out")}, manager=mgr)
        tok = model_mod.load_tokenizer(recipe)
        times = []
        for label in ("cold", "cached"):
            t = time.perf_counter()
            prepared = data_mod.prepare_data(recipe, tok, mgr)
            times.append((label, time.perf_counter() - t, len(prepared.train)))
    print(f"machine: {json.dumps(common.machine())}")
    for label, dt, n in times:
        print(f"{label:<7} {len(rows):,} rows in {dt:6.2f} s = {len(rows) / dt:9,.0f} rows/s ({n:,} packed train rows)")


if __name__ == "__main__":
    main()

"""CI check after README command 1: the quickstart must have learned something.

Reads the run's metrics.json and passes only when the fine-tuned perplexity is strictly below the base
perplexity. Standard library only: it runs with the plain-install venv's python, which has no test
extras. Prints both perplexities; on failure one line says what is wrong, and the exit code is 1.

    python .ci/check_quickstart.py [METRICS_JSON]    (default: examples/runs/quickstart/metrics.json)
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "runs" / "quickstart" / "metrics.json"


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else DEFAULT
    try:
        metrics = json.loads(path.read_text())
        base = float(metrics["base"]["perplexity"])
        tuned = float(metrics["finetuned"]["perplexity"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"quickstart check FAILED: no base and fine-tuned perplexity in {path} ({type(e).__name__}: {e})")
        return 1
    print(f"quickstart perplexity: base {base:.4f}, fine-tuned {tuned:.4f}")
    if not (math.isfinite(base) and math.isfinite(tuned) and tuned < base):
        print(f"quickstart check FAILED: fine-tuned perplexity {tuned:.4f} is not below base {base:.4f}: "
              f"the quickstart did not learn ({path})")
        return 1
    print(f"quickstart check passed: fine-tuning lowered perplexity by {base - tuned:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

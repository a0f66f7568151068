"""ftk: a plugin-based fine-tuning kit for LLaMA-family models (LoRA + 4-bit quantization).

Importing ftk is cheap: torch, transformers and bitsandbytes load only when a run needs them.
The notebook API (ModelConfig, LoRAConfig, LLAMATrainer, ...) is resolved lazily below.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "ftk.api",
    "LoRAConfig": "ftk.api",
    "DataConfig": "ftk.api",
    "TrainingConfig": "ftk.api",
    "EvalConfig": "ftk.api",
    "LLAMATrainer": "ftk.api",
    "PerplexityEvaluator": "ftk.evaluate",
    "QualitativeEvaluator": "ftk.evaluate",
    "hookimpl": "ftk.hookspecs",
    "register": "ftk.manager",
    "FtkError": "ftk.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ftk' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)

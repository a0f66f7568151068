"""Shared pieces of the benchmarks: the bench model, the data, timing and memory probes.

Each setup runs in its own process (``python bench/train_throughput.py --setup NAME``) so peak
resident memory (ru_maxrss) belongs to that setup alone; the driver runs them all in one invocation
on the same machine and prints ratios against the baseline measured in that same run.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FTK_SHARED", ROOT.parent / "shared")).resolve()
TOKENIZER_DIR = SHARED / "models" / "stories260K"
ALPACA = SHARED / "data" / "alpaca" / "alpaca_sample.json"

# LLaMA-shaped, random weights, big enough that matrix work (not Python) dominates on this CPU.
BENCH_CONFIG = dict(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_model_dir(path: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Save a random-weight LLaMA with the stories260K tokenizer, so every setup loads it the normal way."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(**(config or BENCH_CONFIG))
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def alpaca_rows(n: int) -> list[dict]:
    rows = json.loads(ALPACA.read_text())
    return rows[:n]


def alpaca_text(row: dict) -> tuple[str, str]:
    """(prompt, response) in the seed's Alpaca format."""
    if row.get("input"):
        p = f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    else:
        p = f"### Instruction:\n{row['instruction']}\n\n### Response:\n"
    return p, row["output"]


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:  # the flags that decide bf16 speed and bitsandbytes' CPU code paths
        flags = next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_peak_flops(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """Measured matmul peak of this machine for a dtype (FLOP/s), the MFU denominator."""
    import torch

    dtype = getattr(torch, dtype_name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_flops_per_token(config: dict) -> float:
    """Forward+backward FLOPs per token for LoRA on a frozen base: forward 2N, backward ~2N (input
    gradients only; frozen weights get no weight gradient), so ~4N per token (N = matmul parameters)."""
    h, i, L, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    n = L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v
    return 4 * n


HELDOUT = 32  # rows after the training rows: every setup's trained model is scored on the same ones


def after_training(model, tokenizer, rows: list[dict]) -> dict:
    """What makes setups comparable beyond speed, measured the same way for each: how many LoRA B matrices
    moved from their zero init (the adapter trained), and the mean token NLL of the trained model on held-out
    Alpaca rows (each whole sequence, one at a time, no padding, the model's own precision): equal within
    noise when the setups did the same computation."""
    import torch

    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    moved = sum(int(bool((p.detach() != 0).any())) for p in b)
    nll, count = 0.0, 0
    # train mode with dropout off: bitsandbytes' eval-mode path on AVX512-BF16 CPUs repacks 4-bit weights
    # into a layout that rejects widths like 1376 (docs/bitsandbytes-cpu-autograd.md)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        for row in rows:
            p, r = alpaca_text(row)
            ids = tokenizer(p + r + tokenizer.eos_token, return_tensors="pt", truncation=True, max_length=512).input_ids
            out = model(input_ids=ids.to(model.device), labels=ids.to(model.device))
            n = ids.shape[1] - 1
            nll, count = nll + float(out.loss) * n, count + n
    return {"lora_b_moved": moved, "lora_b_total": len(b), "heldout_loss": nll / count}


def emit(result: dict) -> None:
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def run_child(setup: str, fn, *args) -> None:
    """A setup in its own process: run ``fn(*args)`` with torch seeded, add the process's peak RSS, print the
    result line ``run_setup`` reads."""
    import torch

    torch.manual_seed(0)
    res = fn(*args)
    res.update(setup=setup, peak_rss=peak_rss_bytes())
    emit(res)


def parse_results(text: str) -> list[dict]:
    return [json.loads(ln.split(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("BENCH_RESULT ")]


def run_setup(script: Path, setup: str, extra: list[str]) -> dict:
    import subprocess

    p = subprocess.run([sys.executable, str(script), "--setup", setup, *extra], capture_output=True, text=True)
    res = parse_results(p.stdout)
    if p.returncode != 0 or not res:
        return {"setup": setup, "error": (p.stderr or p.stdout)[-2000:]}
    return res[-1]

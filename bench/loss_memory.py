"""Peak memory of one training step with and without ftk's chunked cross-entropy (and its tiled MLP).

    python bench/loss_memory.py [--batch 4] [--seq 2048] [--vocab 32000] [--precision auto]

A LLaMA-shaped model with a real LLaMA vocabulary size (32,000 tokens; hidden 512, 4 layers, random
weights), LoRA r=8 on q/v, one forward + backward over batch x seq tokens, every position labelled (the
worst case: supervised runs mask their prompts, which the chunked loss then skips entirely). Each setup
runs in its own process so its peak resident memory (ru_maxrss) is its own:
  plain    transformers' loss: the model computes all logits, upcasts them, CE over them
  chunked  ftk.losses (the sft trainer's default): 1,024 labelled positions of logits at a time
  tiled    chunked, and model.tiled_mlp: each MLP hidden_size positions at a time (ftk.tiled_mlp)
Prints peak RSS, the step's own increase over the RSS before it, the step time, the loss of both
(they must agree: same computation) and the ratios.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIG = dict(common.BENCH_CONFIG, vocab_size=32000, num_hidden_layers=4, max_position_embeddings=4096)


def _rss_now() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(setup: str, batch: int, seq: int, vocab: int, precision: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftk.losses import causal_lm_loss_chunked
    from ftk.model import cpu_has_fast_bf16

    bf16 = precision == "bf16" or (precision == "auto" and (torch.cuda.is_available() or cpu_has_fast_bf16()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(CONFIG, vocab_size=vocab)))
    model = model.to(torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05))
    model.train()
    if setup == "tiled":
        from ftk import tiled_mlp

        tiled_mlp.apply(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    class Trainer:  # what ftk.losses reads of a transformers Trainer
        model_accepts_loss_kwargs = True

        class args:
            average_tokens_across_devices = False

    before = _rss_now()
    t = time.perf_counter()
    if setup in ("chunked", "tiled"):
        loss = causal_lm_loss_chunked(Trainer(), model, inputs)
    else:
        loss = model(**inputs).loss
    loss.backward()
    dt = time.perf_counter() - t
    grad = sum(float(p.grad.float().abs().sum()) for p in model.parameters() if p.grad is not None)
    return {"loss": float(loss), "grad_abs_sum": grad, "seconds": dt, "rss_before_step": before,
            "precision": "bf16" if bf16 else "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--setups", default="plain,chunked")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    shape = ["--batch", str(a.batch), "--seq", str(a.seq), "--vocab", str(a.vocab), "--precision", a.precision]
    if a.setup:
        common.run_child(a.setup, run, a.setup, a.batch, a.seq, a.vocab, a.precision)
        return
    results = [common.run_setup(Path(__file__), s, shape) for s in a.setups.split(",")]
    print(f"machine: {json.dumps(common.machine())}")
    print(f"one step, {a.batch} x {a.seq} tokens, vocab {a.vocab}, hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_hidden_layers']} layers, LoRA r=8 q/v")
    print(f"{'setup':<8} {'peak RSS':>9} {'step +RSS':>10} {'step s':>7} {'loss':>9} {'prec':>5}")
    for r in results:
        if "error" in r:
            print(f"{r['setup']:<8} ERROR {r['error'][-800:]}")
            continue
        r["step_rss"] = r["peak_rss"] - r["rss_before_step"]
        print(f"{r['setup']:<8} {r['peak_rss'] / 2**30:7.2f}GB {r['step_rss'] / 2**30:8.2f}GB {r['seconds']:7.2f} "
              f"{r['loss']:9.5f} {r['precision']:>5}")
    by = {r["setup"]: r for r in results if "error" not in r}
    if {"plain", "chunked"} <= by.keys():
        p, c = by["plain"], by["chunked"]
        print(f"chunked / plain: peak RSS {c['peak_rss'] / p['peak_rss']:.2f}, step's own memory "
              f"{c['step_rss'] / p['step_rss']:.2f}, time {c['seconds'] / p['seconds']:.2f}; "
              f"loss difference {abs(c['loss'] - p['loss']):.2e}")
    if {"chunked", "tiled"} <= by.keys():
        c, t = by["chunked"], by["tiled"]
        print(f"tiled / chunked: peak RSS {t['peak_rss'] / c['peak_rss']:.2f}, step's own memory "
              f"{t['step_rss'] / c['step_rss']:.2f}, time {t['seconds'] / c['seconds']:.2f}; "
              f"loss difference {abs(t['loss'] - c['loss']):.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": common.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

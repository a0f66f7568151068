"""Training throughput: ftk's default path vs a naive seed-spec baseline vs TRL's SFTTrainer.

    python bench/train_throughput.py [--rows 256] [--setups baseline,trl,ftk] [--out FILE]

Same random-weight LLaMA-shaped model (~26M parameters, saved to disk and loaded the normal way),
same real Alpaca rows, NF4 nested 4-bit, LoRA r=8 on q/v, batch 4 x accumulation 4, paged AdamW 32-bit,
lr 2e-4 cosine, one epoch, loss on whole sequences in every setup (so the losses are comparable).
Reports useful (non-padding) training tokens/s, peak RSS, final loss, MFU, and ratios to the baseline
and to TRL measured in the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR, BATCH, ACCUM, MAXLEN = 2e-4, 4, 4, 512


def _bnb_config(compute_dtype):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def _args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1,
                             optim="paged_adamw_32bit", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1,
                             report_to=[], save_strategy="no", seed=42, use_cpu=True, disable_tqdm=True, **kw)


def setup_baseline(model_dir: Path, rows: list[dict], heldout: list[dict]) -> dict:
    """The seed spec done naively: every example padded to 512, fp32 compute, plain Trainer + PEFT."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.unk_token
    texts = [p + r + tok.eos_token for p, r in map(common.alpaca_text, rows)]
    enc = tok(texts, max_length=MAXLEN, truncation=True, padding="max_length", add_special_tokens=True)
    labels = [[t if m else -100 for t, m in zip(ids, am)] for ids, am in zip(enc["input_ids"], enc["attention_mask"])]
    useful = sum(sum(am) for am in enc["attention_mask"])
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=_bnb_config("float32"),
                                                 dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             bias="none", task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(model=model, args=_args(out), train_dataset=ds)
        t = time.perf_counter()
        res = tr.train()
        dt = time.perf_counter() - t
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return {"useful_tokens": useful, "seconds": dt, "final_loss": losses[-1], "first_loss": losses[0],
            "train_loss": res.training_loss, "steps": tr.state.global_step, "precision": "fp32",
            **common.after_training(model, tok, heldout)}


def setup_trl(model_dir: Path, rows: list[dict], heldout: list[dict]) -> dict:
    """TRL SFTTrainer with padding-free packing, in its fastest precision on this machine (bf16 only
    where the CPU multiplies bf16 fast: on an AVX2-only CPU bf16 matmuls are emulated and ~400x slower)."""
    import torch

    from ftk.model import cpu_has_fast_bf16

    bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.unk_token
    pairs = [common.alpaca_text(r) for r in rows]
    ds = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=_bnb_config("bfloat16" if bf16 else "float32"),
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    with tempfile.TemporaryDirectory() as out:
        base = _args(out, bf16=bf16).to_dict()
        base = {k: v for k, v in base.items() if k in SFTConfig.__dataclass_fields__ and not k.startswith("_")}
        base.update(packing=True, padding_free=True, max_length=MAXLEN, completion_only_loss=False,
                    output_dir=out, report_to=[])
        cfg = SFTConfig(**base)
        tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                               target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM"))
        useful = sum(len(x) for x in tr.train_dataset["input_ids"])
        t = time.perf_counter()
        res = tr.train()
        dt = time.perf_counter() - t
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return {"useful_tokens": useful, "seconds": dt, "final_loss": losses[-1], "first_loss": losses[0],
            "train_loss": res.training_loss, "steps": tr.state.global_step, "precision": "bf16" if bf16 else "fp32",
            **common.after_training(tr.model, tok, heldout)}


def ftk_recipe(model_dir: Path, data_file: Path, out: Path, model: dict | None = None, trainer: dict | None = None,
               adapter: dict | None = None, **training) -> dict:
    return {
        "model": {"name": str(model_dir), "quantization": {"method": "nf4", "nested": True}, **(model or {})},
        "trainer": {"method": "sft", **(trainer or {})},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                    **(adapter or {})},
        "data": {"datasets": [{"loader": "alpaca", "path": str(data_file)}], "validation_size": 0,
                 "max_length": MAXLEN, "train_on_inputs": True, "cache": False},
        "training": {"epochs": 1, "batch_size": BATCH, "gradient_accumulation_steps": ACCUM, "learning_rate": LR,
                     "report_to": ["none"], "logging_steps": 1, **training},
        "evaluation": {"metrics": [], "compare_base": False},
        "output_dir": str(out),
    }


def setup_ftk(model_dir: Path, rows: list[dict], heldout: list[dict], model: dict | None = None,
              trainer: dict | None = None, adapter: dict | None = None, **training) -> dict:
    """ftk's default path (packing, precision auto, its collator and Trainer set-up), via its public API."""
    from ftk import data as data_mod
    from ftk import model as model_mod
    from ftk import train as train_mod
    from ftk.manager import get_manager
    from ftk.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "alpaca.json"
        f.write_text(json.dumps(rows))
        mgr = get_manager()
        recipe = load_recipe(data=ftk_recipe(model_dir, f, Path(tmp) / "run", model, trainer, adapter, **training), manager=mgr)
        tok = model_mod.load_tokenizer(recipe)
        prepared = data_mod.prepare_data(recipe, tok, mgr)
        useful = sum(sum(1 for _ in row["input_ids"]) for row in prepared.train)
        model, info = model_mod.load_model(recipe, mgr, tok)
        t = time.perf_counter()
        m = train_mod.train(model, tok, prepared, recipe, mgr, str(Path(tmp) / "run"), resume=None)
        dt = time.perf_counter() - t
    return {"useful_tokens": useful, "seconds": dt, "final_loss": m.get("final_loss"), "first_loss": m.get("first_loss"),
            "train_loss": m.get("train_loss"), "steps": m.get("steps"), "precision": info.get("precision"),
            **common.after_training(model, tok, heldout)}


SETUPS = {"baseline": setup_baseline, "trl": setup_trl, "ftk": setup_ftk,
          # a lever measured on its own: torch.compile of the decoder layers (compile time included)
          "ftk-compile": functools.partial(setup_ftk, compile=True),
          # ftk's default with one lever turned back, to measure that lever alone
          "ftk-eager": functools.partial(setup_ftk, model={"attn_implementation": "eager"}),
          "ftk-sdpa": functools.partial(setup_ftk, model={"attn_implementation": "sdpa"}),
          "ftk-plainloss": functools.partial(setup_ftk, trainer={"chunked_loss": False}),
          "ftk-torchdropout": functools.partial(setup_ftk, adapter={"dropout_rng": "torch"})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--setups", default="baseline,trl,ftk")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the setups this many times, in turn; each setup's fastest round is reported (the "
                         "closest to its undisturbed speed on a machine something else may share)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    if a.setup:  # child process: one setup
        rows = common.alpaca_rows(a.rows + common.HELDOUT)
        common.run_child(a.setup, SETUPS[a.setup], Path(a.model_dir), rows[:a.rows], rows[a.rows:])
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.make_model_dir(Path(tmp) / "model")
        rounds = [[common.run_setup(Path(__file__), s, ["--rows", str(a.rows), "--model-dir", str(model_dir)])
                   for s in a.setups.split(",")] for _ in range(a.rounds)]
    results = [min(runs, key=lambda r: r.get("seconds", float("inf"))) for runs in zip(*rounds)]
    if a.rounds > 1:
        for runs in zip(*rounds):
            print(f"{runs[0]['setup']}: seconds per round " + ", ".join(
                f"{r['seconds']:.1f}" if "seconds" in r else "error" for r in runs))
    flops_tok = common.train_flops_per_token(common.BENCH_CONFIG)
    import torch

    from ftk.model import cpu_has_fast_bf16

    peaks = {"fp32": common.matmul_peak_flops("float32")}
    # emulated bf16 (AVX2-only CPUs) runs at well under 1 GFLOP/s: measure it on a small matrix
    peaks["bf16"] = common.matmul_peak_flops("bfloat16", n=2048 if (torch.cuda.is_available() or cpu_has_fast_bf16()) else 256, reps=2)
    by = {r["setup"]: r for r in results}
    print(f"machine: {json.dumps(common.machine())}")
    print(f"rows: {a.rows}; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'setup':<9} {'useful tok/s':>12} {'vs base':>8} {'vs trl':>7} {'peak RSS':>9} {'final loss':>10} "
          f"{'steps':>5} {'prec':>5} {'MFU':>6} {'held-out':>8} {'B moved':>7}")
    for r in results:  # every rate first: each row's ratios need the baseline's and TRL's
        if "error" not in r:
            r["tokens_per_s"] = r["useful_tokens"] / r["seconds"]
    for r in results:
        if "error" in r:
            print(f"{r['setup']:<9} ERROR {r['error'][-500:]}")
            continue
        r["mfu"] = r["tokens_per_s"] * flops_tok / peaks.get(r.get("precision") or "fp32", peaks["fp32"])
        vb = r["tokens_per_s"] / by["baseline"]["tokens_per_s"] if "tokens_per_s" in by.get("baseline", {}) else float("nan")
        vt = r["tokens_per_s"] / by["trl"]["tokens_per_s"] if "tokens_per_s" in by.get("trl", {}) else float("nan")
        print(f"{r['setup']:<9} {r['tokens_per_s']:12.0f} {vb:8.2f} {vt:7.2f} {r['peak_rss'] / 2**30:7.2f}GB "
              f"{r['final_loss']:10.4f} {r['steps']:5d} {r['precision']:>5} {100 * r['mfu']:5.1f}% "
              f"{r['heldout_loss']:8.4f} {r['lora_b_moved']:>3}/{r['lora_b_total']}")
    base = by.get("baseline", {})
    if "heldout_loss" in base:
        print(f"held-out loss ({common.HELDOUT} rows after the training rows) minus the baseline's: " + ", ".join(
            f"{r['setup']} {r['heldout_loss'] - base['heldout_loss']:+.4f}" for r in results
            if "heldout_loss" in r and r is not base))
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": common.machine(), "peaks": peaks, "results": results}, indent=2))


if __name__ == "__main__":
    main()

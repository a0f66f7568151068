"""Preference-tuning (DPO) throughput: ftk's `dpo` trainer (padding-free, and padded) vs TRL's plain DPOTrainer
+ PEFT + bitsandbytes.

    python bench/preference_throughput.py [--pairs 96] [--setups trl,ftk-padded,ftk] [--rounds 1] [--out FILE]

Same random-weight LLaMA-shaped model as bench/train_throughput.py (~26M parameters, saved to disk and loaded
the normal way), the same real preference pairs (the first --pairs of ../shared/data/preference/
dailydialog_pairs.jsonl that fit max_length 512 untruncated, rendered once as text: "User: ...\\nAssistant:
...\\n" turns then "Assistant:", each response " " + the reply), NF4 nested 4-bit, LoRA r=8 on q/v, DPO beta
0.1 (sigmoid loss, reference = the base: the adapter disabled), batch 4 pairs x accumulation 1, paged AdamW
32-bit, lr 5e-4 cosine, one epoch, no gradient checkpointing (TRL's DPOConfig turns it on by default; ftk's
CPU default is off, so both run without it), each in its fastest precision here (bf16 where the CPU has
AVX512-BF16 or AMX, else fp32).

Setups: ``trl`` (DPOTrainer as its docs show it; TRL 1.16's own padding_free is disabled, so it pads),
``ftk`` (ftk's default: padding-free model calls, trainer.padding_free true) and ``ftk-padded``
(trainer.padding_free false: TRL's padded batches, as ``trl`` runs them).

Useful tokens = the non-padding tokens a pair puts through the model: prompt + chosen and prompt + rejected
(2 x prompt + chosen + rejected), counted from the ids each setup trained on; the timing covers training
only (not tokenization or model loading). ``positions`` = the token positions the transformer actually ran
(policy and reference passes, padding included), counted at the model; ``pad`` = the share of them that is
padding. Reports useful tokens/s, pairs/s, peak RSS and their ratios to TRL measured in the same round
(each setup in its own process, one after the other; ``--rounds N`` repeats the sequence, for a machine
other work shares), plus the CPU's model and kernel-deciding flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR, BATCH, ACCUM, MAXLEN, BETA = 5e-4, 4, 1, 512, 0.1
PAIRS = common.SHARED / "data" / "preference" / "dailydialog_pairs.jsonl"


def text_pairs(n: int, tok) -> list[dict]:
    """The first ``n`` real pairs, as text, whose prompt + longer response (with BOS and EOS) fit MAXLEN."""
    out = []
    with open(PAIRS, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            prompt = "".join(("User: " if m["role"] == "user" else "Assistant: ") + m["content"] + "\n"
                             for m in r["prompt"]) + "Assistant:"
            chosen, rejected = " " + r["chosen"][0]["content"], " " + r["rejected"][0]["content"]
            longest = max(len(tok(x, add_special_tokens=False).input_ids) for x in (chosen, rejected))
            if len(tok(prompt).input_ids) + longest + 1 <= MAXLEN:
                out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(out) == n:
                break
    return out


def useful_tokens(pairs) -> int:
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def _log_summary(history: list[dict]) -> dict:
    """First/final training loss and final reward accuracy/margin from the trainer's log history."""
    rows = [h for h in history if "loss" in h]
    last = rows[-1] if rows else {}
    return {"first_loss": rows[0]["loss"] if rows else None, "final_loss": last.get("loss"),
            "final_reward_accuracy": last.get("rewards/accuracies"), "final_reward_margin": last.get("rewards/margins")}


class Positions:
    """Counts the token positions every call of the transformer under the LM head runs (rows x width)."""

    def __init__(self, backbone):
        self.n = 0
        self.hook = backbone.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.n += ids.numel()


def setup_trl(model_dir: Path, pairs: list[dict]) -> dict:
    """TRL's DPOTrainer as its docs show it: a 4-bit model, peft_config, text pairs it tokenizes itself."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainingArguments
    from trl import DPOConfig, DPOTrainer

    from ftk.model import cpu_has_fast_bf16

    bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    with tempfile.TemporaryDirectory() as out:
        base = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                                 learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1,
                                 optim="paged_adamw_32bit", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1,
                                 report_to=[], save_strategy="no", seed=42, use_cpu=not torch.cuda.is_available(),
                                 disable_tqdm=True, bf16=bf16)
        kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        kw.update(beta=BETA, max_length=MAXLEN, gradient_checkpointing=False)  # as ftk's TrainingArguments give it
        cfg = DPOConfig(**kw)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                          task_type="CAUSAL_LM")
        tr = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                        peft_config=lora)
        trained = tr.train_dataset
        useful = useful_tokens({k: trained[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                               for i in range(len(trained)))
        positions = Positions(tr.model.get_base_model().model)
        t = time.perf_counter()
        tr.train()
        dt = time.perf_counter() - t
    return {"useful_tokens": useful, "pairs": len(trained), "seconds": dt, "steps": tr.state.global_step,
            "positions": positions.n, "precision": "bf16" if bf16 else "fp32", **_log_summary(tr.state.log_history)}


def setup_ftk(model_dir: Path, pairs: list[dict], padding_free: bool = True) -> dict:
    """ftk's own path: the `preference` loader, the "pairs" data form, the `dpo` trainer, precision auto."""
    from ftk import data as data_mod
    from ftk import model as model_mod
    from ftk import train as train_mod
    from ftk.manager import get_manager
    from ftk.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "pairs.jsonl"
        f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        mgr = get_manager()
        recipe = load_recipe(data={
            "model": {"name": str(model_dir), "quantization": {"method": "nf4", "nested": True}},
            "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
            "trainer": {"method": "dpo", "beta": BETA, "padding_free": padding_free},
            "data": {"datasets": [{"loader": "preference", "path": str(f)}], "validation_size": 0,
                     "max_length": MAXLEN, "cache": False},
            "training": {"epochs": 1, "batch_size": BATCH, "gradient_accumulation_steps": ACCUM, "learning_rate": LR,
                         "report_to": ["none"], "logging_steps": 1},
            "evaluation": {"metrics": [], "compare_base": False},
            "output_dir": str(Path(tmp) / "run")}, manager=mgr)
        tok = model_mod.load_tokenizer(recipe)
        prepared = data_mod.prepare_data(recipe, tok, mgr)
        train_pairs = list(prepared.train)
        model, info = model_mod.load_model(recipe, mgr, tok)
        positions = Positions(model.get_base_model().model)
        t = time.perf_counter()
        m = train_mod.train(model, tok, prepared, recipe, mgr, str(Path(tmp) / "run"), resume=None)
        dt = time.perf_counter() - t
        log = [json.loads(x) for x in (Path(tmp) / "run" / "train_log.jsonl").read_text().splitlines()]
    return {"useful_tokens": useful_tokens(train_pairs), "pairs": len(train_pairs), "seconds": dt,
            "steps": m.get("steps"), "positions": positions.n, "precision": info.get("precision"),
            **_log_summary(log)}


SETUPS = {"trl": setup_trl, "ftk": setup_ftk, "ftk-padded": functools.partial(setup_ftk, padding_free=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--setups", default="trl,ftk-padded,ftk")
    ap.add_argument("--rounds", type=int, default=1, help="run the setups this many times, in turn")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    if a.setup:  # child process: one setup
        from transformers import AutoTokenizer

        pairs = text_pairs(a.pairs, AutoTokenizer.from_pretrained(a.model_dir))
        common.run_child(a.setup, SETUPS[a.setup], Path(a.model_dir), pairs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.make_model_dir(Path(tmp) / "model")
        results = [dict(common.run_setup(Path(__file__), s, ["--pairs", str(a.pairs), "--model-dir", str(model_dir)]),
                        round=k + 1) for k in range(a.rounds) for s in a.setups.split(",")]
    from ftk.model import cpu_info

    cpu = cpu_info()
    print(f"machine: {json.dumps(common.machine())}")
    print(f"cpu: {cpu['model']}; flags: {' '.join(cpu['features']) or '(none of avx2 avx512f avx512_bf16 amx_bf16)'}")
    print(f"pairs: {a.pairs} requested; batch {BATCH} pairs x accumulation {ACCUM}; max_length {MAXLEN}")
    print(f"{'round':<5} {'setup':<10} {'useful tok/s':>12} {'vs trl':>7} {'pairs/s':>8} {'peak RSS':>9} {'vs trl':>7} "
          f"{'pairs':>5} {'steps':>5} {'positions':>9} {'pad':>6} {'prec':>5} {'first loss':>10} {'final loss':>10} "
          f"{'final acc':>9}")
    for r in results:
        if "error" not in r:
            r["tokens_per_s"] = r["useful_tokens"] / r["seconds"]
            r["pairs_per_s"] = r["pairs"] / r["seconds"]
    for r in results:
        if "error" in r:
            print(f"{r['round']:<5} {r['setup']:<10} ERROR {r['error'][-1500:]}")
            continue
        trl = next((x for x in results if x["round"] == r["round"] and x["setup"] == "trl"), {})
        vt = r["tokens_per_s"] / trl["tokens_per_s"] if "tokens_per_s" in trl else float("nan")
        vm = r["peak_rss"] / trl["peak_rss"] if "peak_rss" in trl else float("nan")

        def num(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "–"

        # policy + reference pass: each useful token runs twice
        pad = 1 - 2 * r["useful_tokens"] / r["positions"] if r.get("positions") else float("nan")
        print(f"{r['round']:<5} {r['setup']:<10} {r['tokens_per_s']:12.0f} {vt:7.2f} {r['pairs_per_s']:8.2f} "
              f"{r['peak_rss'] / 2**30:7.2f}GB {vm:7.2f} {r['pairs']:5d} {num(r['steps'], '5d')} "
              f"{num(r.get('positions'), '9d')} {pad:6.1%} {r['precision']:>5} "
              f"{num(r['first_loss'], '10.4f')} {num(r['final_loss'], '10.4f')} "
              f"{num(r['final_reward_accuracy'], '9.3f')}")
    ok = [r for r in results if "error" not in r]
    if a.rounds > 1 and ok:
        # on a machine other work shares, a setup's fastest round is the closest to its own speed
        best = {s: max(r["tokens_per_s"] for r in ok if r["setup"] == s) for s in dict.fromkeys(r["setup"] for r in ok)}
        rss = {s: min(r["peak_rss"] for r in ok if r["setup"] == s) / 2**30 for s in best}
        med = {s: statistics.median(r["tokens_per_s"] for r in ok if r["setup"] == s) for s in best}
        print("best of rounds: " + ", ".join(f"{s} {v:.0f} tok/s" + (f" ({v / best['trl']:.2f}x trl)" if "trl" in best
                                                                       else "") for s, v in best.items()))
        print("median of rounds: " + ", ".join(f"{s} {v:.0f} tok/s" + (f" ({v / med['trl']:.2f}x trl)" if "trl" in med
                                                                         else "") for s, v in med.items()))
        print("lowest peak RSS: " + ", ".join(f"{s} {v:.2f} GB" for s, v in rss.items()))
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": common.machine(), "cpu": cpu, "results": results}, indent=2))


if __name__ == "__main__":
    main()

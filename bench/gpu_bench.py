"""GPU benchmark: a LLaMA-7B-shaped model with random weights built directly on the GPU, quantized NF4
nested, LoRA r=8 on q_proj/v_proj, batch 4 x length 512, a fixed number of optimizer steps, trained by
(a) ftk's default path and (b) the naive seed-spec baseline (every example padded to 512, fp16 mixed
precision, plain Trainer + PEFT, no gradient checkpointing). Prints useful (non-padding) tokens/s and
peak GPU memory for each, with the card's name, and the ratio measured in the same run.

On a GPU, ftk's default ("auto") is gradient checkpointing plus torch.compile of the decoder layers;
the variants measure the levers one at a time: ftk-eager (no compile), ftk-nogc (no checkpointing),
ftk-nogc-eager (neither), ftk-offload (model.activation_offloading), ftk-torchdq (the compiled layers'
4-bit matmuls in torch ops: model.quantization.dequantize "torch"), ftk-tiled (activation offloading and
model.tiled_mlp, the long-context levers together).

Long context: `--batch 1 --length 32768` trains one sequence of ~32,700 tokens per step (the Alpaca texts
joined into one document per row, for every setup); `--cap-gib 24` limits
each setup's process to 24 GiB of the card (torch.cuda.set_per_process_memory_fraction), so a run that
does not fit a 24 GiB card stops with "out of memory" instead of using the H200's 141 GiB.

    python bench/gpu_bench.py                 # on a GPU machine (bench/gpu.sh wraps it)
    python bench/gpu_bench.py --tiny          # the same code path (checkpointing + compile), tiny, on the CPU
    python bench/gpu_bench.py --set training.compile=false   # any recipe setting, for every ftk setup
    python bench/gpu_bench.py --setups baseline,ftk,ftk-offload --batch 1 --length 32768 --cap-gib 24 --steps 3
    FTK_BENCH_SAVED=1 ...                     # also tally the tensors saved for backward in one step
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHAPE_TINY = dict(SHAPE_7B, vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
BATCH, LENGTH = 4, 512  # micro-batch: rows x tokens (--batch, --length)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def data_paths():
    """Tokenizer and Alpaca rows: ../shared here; a carried copy (FTK_BENCH_DATA) on the GPU machine."""
    carried = os.environ.get("FTK_BENCH_DATA")
    if carried:
        return Path(carried) / "stories260K", Path(carried) / "alpaca_sample.json"
    return common.TOKENIZER_DIR, common.ALPACA


def long_texts(tok, rows: list[dict]) -> list[str]:
    """Long context: the Alpaca texts joined and cut into texts of a little under LENGTH tokens, so a
    row is one sequence (a single causal attention, as a long document gives), not packed examples."""
    ids = [t for p, r in map(common.alpaca_text, rows) for t in tok(p + r + tok.eos_token)["input_ids"]]
    size = LENGTH - 64  # room for the BOS and the template's few tokens
    return [tok.decode(ids[i:i + size]) for i in range(0, len(ids) - size, size)]


def build_random_4bit(shape: dict, device: str, compute_dtype, quant_type="nf4", nested=True):
    """Random-weight LLaMA made on `device`, its decoder linears replaced by bitsandbytes 4-bit layers
    (quantized from the random bf16 weights, as from_pretrained would), one layer at a time."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], LENGTH)))
    cfg.use_cache = False
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=compute_dtype,
                                      compress_statistics=nested, quant_type=quant_type, device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=quant_type,
                                             compress_statistics=nested)
                q = q.to(device)  # quantizes
                setattr(parent, name, q)
                del lin
    model.is_loaded_in_4bit = True
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


class StepTimer:
    """Times optimizer steps after the first (which includes allocator warm-up). With
    FTK_BENCH_PROFILE=1 it also profiles steps 3-4 and prints the top operators (timed steps exclude them)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        profile = os.environ.get("FTK_BENCH_PROFILE") == "1"

        class CB(TrainerCallback):
            prof = None

            def on_step_begin(self, args, state, control, **kw):
                if os.environ.get("FTK_BENCH_SAVED") == "1" and state.global_step == 2:
                    self.saved = outer.saved_hooks(kw["model"])
                    self.saved.__enter__()
                if profile and state.global_step == 2:
                    import torch

                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.__enter__()

            saved = None

            def on_step_end(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    if state.global_step == 1:  # the first step holds compilation and allocator warm-up
                        outer.peak_first = torch.cuda.max_memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                if self.saved is not None:
                    self.saved.__exit__(None, None, None)
                    self.saved = None
                    top = sorted(outer.saved.items(), key=lambda kv: -kv[1][1])[:12]
                    outer.saved_summary = (f"{sum(b for _, b in outer.saved.values()) / 2**30:.2f} GiB; "
                                           + "; ".join(f"{n} x {k} = {b / 2**20:.0f} MiB" for k, (n, b) in top))
                if self.prof is not None and state.global_step == 4:
                    self.prof.__exit__(None, None, None)
                    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                    out = Path(os.environ.get("FTK_BENCH_PROFILE_DIR", ".")) / f"profile-{os.environ.get('FTK_BENCH_SETUP', 'x')}.txt"
                    out.write_text(self.prof.key_averages().table(sort_by=key, row_limit=30))
                    self.prof = None
                    outer.times.clear()  # profiled steps are not timed
                outer.times.append(time.perf_counter())

        self.times: list[float] = []
        self.peak_first = 0
        self.saved_summary = None
        self.saved: dict = {}
        self.callback = CB()

    def saved_hooks(self, model):
        """FTK_BENCH_SAVED=1: tally what autograd keeps for backward during one step (distinct
        storages, parameters excluded), by shape and dtype, to see where activation memory goes."""
        import torch

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set = set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                key = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                n, b = self.saved.get(key, (0, 0))
                self.saved[key] = (n + 1, b + t.untyped_storage().nbytes())
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def summary(self) -> dict:
        """What every setup reports from its timer."""
        return {"peak_first": self.peak_first, "saved_for_backward": self.saved_summary,
                "seconds": self.times[-1] - self.times[0], "timed_steps": len(self.times) - 1}


def setup_ftk(shape, steps, device, overrides=()):
    """ftk's default path; `overrides` are recipe settings ("training.compile", False) for the variants."""
    import torch

    from ftk import data as data_mod
    from ftk import model as model_mod
    from ftk import train as train_mod
    from ftk.hookspecs import hookimpl
    from ftk.manager import get_manager
    from ftk.recipe import load_recipe

    tok_dir, alpaca = data_paths()
    timer = StepTimer()

    class Timing:  # attached through the public run-lifecycle hook, as any plugin would
        @hookimpl
        def ftk_trainer_callbacks(self, recipe, output_dir):
            return [timer.callback]

    mgr = get_manager()
    mgr.register(Timing(), name="bench-timing")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = {"loader": "alpaca", "path": str(alpaca)}
        if LENGTH > 512:
            from transformers import AutoTokenizer

            docs = Path(tmp) / "long.jsonl"
            docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in long_texts(
                AutoTokenizer.from_pretrained(tok_dir), json.loads(Path(alpaca).read_text()))))
            dataset = {"loader": "custom", "path": str(docs), "fields": {"instruction": "text", "output": "text",
                                                                          "input": None}, "template": "{output}"}
        recipe = load_recipe(data={
            "model": {"name": str(tok_dir), "quantization": {"method": "nf4", "nested": True}},
            "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "data": {"datasets": [dataset], "max_length": LENGTH,
                     "validation_size": 0, "cache": False},
            "training": {"max_steps": steps, "batch_size": BATCH, "gradient_accumulation_steps": 1,
                         "report_to": ["none"], "logging_steps": 1, "save_steps": None},
            "evaluation": {"metrics": [], "compare_base": False},
            "output_dir": str(Path(tmp) / "run")}, manager=mgr,
            overrides=json.loads(os.environ.get("FTK_BENCH_BASE", "[]")) + [f"{k}={json.dumps(v)}" for k, v in overrides]
            + json.loads(os.environ.get("FTK_BENCH_SET", "[]")))
        tok = model_mod.load_tokenizer(recipe)
        prepared = data_mod.prepare_data(recipe, tok, mgr)
        precision = model_mod.resolve_precision("auto")
        cdtype = torch.bfloat16 if precision == "bf16" else (torch.float16 if precision == "fp16" else torch.float32)
        model = build_random_4bit(shape, device, cdtype)
        ctx, _ = model_mod.model_context(recipe, mgr, model.config)
        _, qplan = model_mod.quantization_plan(recipe, mgr, ctx)
        model_mod.apply_after_load(model, qplan)  # the quantizer's fix-ups, as from_pretrained loading gets them
        model = model_mod.prepare_for_training(model, recipe, mgr, kbit=True, ctx=ctx)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        m = train_mod.train(model, tok, prepared, recipe, mgr, str(Path(tmp) / "run"), resume=None)
        from torch._dynamo.utils import counters
        rows = prepared.train
        per_row = sum(sum(1 for _ in rows[i]["input_ids"]) for i in range(len(rows))) / len(rows)
    return {**timer.summary(), "useful_tokens_per_step": per_row * BATCH,
            "final_loss": m.get("final_loss"), "precision": precision,
            "gradient_checkpointing": model_mod.gradient_checkpointing_on(recipe),
            "activation_offloading": model_mod.activation_offloading_on(recipe),
            "compiled_layers": m.get("compiled_layers", 0), "graphs": dict(counters["stats"]),
            "graph_breaks": sum(counters["graph_break"].values())}


def setup_baseline(shape, steps, device):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tok_dir, alpaca = data_paths()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.unk_token
    rows = json.loads(Path(alpaca).read_text())
    texts = long_texts(tok, rows) if LENGTH > 512 else [p + r + tok.eos_token for p, r in map(common.alpaca_text, rows)]
    texts = texts[: steps * BATCH + 8]
    enc = tok(texts, max_length=LENGTH, truncation=True, padding="max_length")
    enc["labels"] = [[t if a else -100 for t, a in zip(i, am)] for i, am in zip(enc["input_ids"], enc["attention_mask"])]
    ds = [dict(input_ids=i, attention_mask=a, labels=lab) for i, a, lab in zip(enc["input_ids"], enc["attention_mask"], enc["labels"])]
    cuda = device == "cuda"
    model = build_random_4bit(shape, device, torch.float16 if cuda else torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    timer = StepTimer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                                 max_steps=steps, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
                                 optim="paged_adamw_32bit", max_grad_norm=0.3, weight_decay=0.01, fp16=cuda,
                                 logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda,
                                 disable_tqdm=True, remove_unused_columns=False)
        tr = Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer.callback])
        tr.train()
    useful = sum(sum(a) for a in enc["attention_mask"][: steps * BATCH]) / steps
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return {**timer.summary(), "useful_tokens_per_step": useful,
            "final_loss": losses[-1] if losses else None, "precision": "fp16" if cuda else "fp32",
            "gradient_checkpointing": False}


SETUPS = {"baseline": setup_baseline, "ftk": setup_ftk,
          "ftk-eager": functools.partial(setup_ftk, overrides=[("training.compile", False)]),
          "ftk-nogc": functools.partial(setup_ftk, overrides=[("model.gradient_checkpointing", False)]),
          "ftk-nogc-eager": functools.partial(setup_ftk, overrides=[("model.gradient_checkpointing", False),
                                                                    ("training.compile", False)]),
          "ftk-offload": functools.partial(setup_ftk, overrides=[("model.activation_offloading", True)]),
          "ftk-torchdq": functools.partial(setup_ftk, overrides=[("model.quantization.dequantize", "torch")]),
          "ftk-tiled": functools.partial(setup_ftk, overrides=[("model.activation_offloading", True),
                                                               ("model.tiled_mlp", True)])}


def main():
    global BATCH, LENGTH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape (runs on the CPU)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--setups", default="baseline,ftk,ftk-eager,ftk-nogc")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe setting for every ftk setup (after the setup's own)")
    ap.add_argument("--batch", type=int, default=BATCH, help="rows per micro-batch")
    ap.add_argument("--length", type=int, default=LENGTH, help="tokens per row")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="GPU memory each setup may use, as on a card of this size")
    a = ap.parse_args()
    import torch

    BATCH, LENGTH = a.batch, a.length

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    shape = SHAPE_TINY if a.tiny else SHAPE_7B
    steps = a.steps or (4 if a.tiny else 12)
    if a.setup:
        os.environ["FTK_BENCH_SETUP"] = a.setup
        if a.cap_gib and device == "cuda":
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / torch.cuda.mem_get_info()[1]))
        try:
            res = SETUPS[a.setup](shape, steps, device)
        except torch.OutOfMemoryError:
            common.emit({"setup": a.setup, "error": f"out of memory (cap {a.cap_gib} GiB)" if a.cap_gib else "out of memory"})
            return
        res["setup"] = a.setup
        res["tokens_per_s"] = res["useful_tokens_per_step"] * res["timed_steps"] / res["seconds"]
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
        res["peak_first_step_gpu_bytes"] = res.pop("peak_first", None)
        res["peak_rss_bytes"] = common.peak_rss_bytes()
        common.emit(res)
        return
    extra = (["--tiny"] if a.tiny else []) + ["--steps", str(steps), "--batch", str(BATCH), "--length", str(LENGTH)]
    if a.cap_gib:
        extra += ["--cap-gib", str(a.cap_gib)]
    if a.set:
        os.environ["FTK_BENCH_SET"] = json.dumps(a.set)  # reaches each setup's subprocess
    if a.tiny:  # on the CPU, take the path that "auto" picks on a GPU
        os.environ["FTK_BENCH_BASE"] = json.dumps(["model.gradient_checkpointing=true", "training.compile=true"])
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (tiny shape)"
    print(f"device: {card}; shape: {'tiny' if a.tiny else 'LLaMA-7B'}; {steps} steps of batch {BATCH} x {LENGTH}"
          + (f"; memory capped at {a.cap_gib} GiB" if a.cap_gib else ""), flush=True)
    # MFU: model FLOPs per useful token (4N for LoRA on a frozen base, no recompute counted) plus causal
    # attention over the row (forward 2hL per layer, backward twice that), against the card's measured
    # bf16 matmul peak (taken before the setups run, in this process)
    flops_tok = common.train_flops_per_token(shape) + 6 * shape["hidden_size"] * LENGTH * shape["num_hidden_layers"]
    cuda = device == "cuda"  # --tiny: the CPU's fp32 peak, so the same code runs (the figure means little)
    peak = common.matmul_peak_flops("bfloat16" if cuda else "float32", n=8192 if cuda else 512)
    if cuda:
        torch.cuda.empty_cache()  # the probe's matrices: the setups run in their own processes
    print(f"{'bf16' if cuda else 'fp32'} matmul peak {peak / 1e12:.3g} TFLOP/s (measured); model FLOPs per "
          f"token {flops_tok / 1e9:.3g} G", flush=True)
    results: list[dict] = []
    for name in a.setups.split(","):  # each line printed (and saved) as soon as its run ends
        r = common.run_setup(Path(__file__), name, extra)
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * flops_tok / peak
        results.append(r)
        base = next((x for x in results if x["setup"] == "baseline" and "tokens_per_s" in x), None)
        if "error" in r:
            print(f"{r['setup']:<14} ERROR {r['error'][-1500:]}", flush=True)
        else:
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            mem = r["peak_gpu_bytes"] if r["peak_gpu_bytes"] is not None else r["peak_rss_bytes"]
            print(f"{r['setup']:<14} useful tok/s {r['tokens_per_s']:10.0f}  x{ratio:5.2f} vs baseline  "
                  f"peak {'GPU' if r['peak_gpu_bytes'] is not None else 'RSS'} {mem / 2**30:6.2f} GiB "
                  f"(first step {(r.get('peak_first_step_gpu_bytes') or 0) / 2**30:.2f})  "
                  f"loss {r['final_loss']}  {r['precision']}  grad-ckpt {r['gradient_checkpointing']}  "
                  f"offload {r.get('activation_offloading', False)}  "
                  + (f"MFU {100 * r['mfu']:.1f}%  " if "mfu" in r else "") +
                  f"compiled layers {r.get('compiled_layers', 0)} graph breaks {r.get('graph_breaks', 0)}", flush=True)
            if r.get("saved_for_backward"):
                print(f"{'':<14} saved for backward in one step (parameters excluded): {r['saved_for_backward']}")
        if a.out:
            Path(a.out).write_text(json.dumps({"device": card, "bf16_peak_flops": peak, "results": results}, indent=2))

if __name__ == "__main__":
    main()

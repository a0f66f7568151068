"""The core names no concrete component (issue 13): with no built-in plugin loaded at all, a recipe made
only of third-party components (loader, quantizer, adapter, metric, trainer) validates, plans, trains,
evaluates and reports, through the CLI, exactly as a built-in recipe does."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL_DIR
from ftk import hookimpl
from ftk.components import AdapterInfo, Example, LoadedData, MetricInfo, QuantizationPlan, Segment, TrainerPlan
from ftk.testing import make_manager, register_on

WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "gray", "teal"]


def load_colours(options, ctx):
    def ex(i):
        w = WORDS[i % len(WORDS)]
        return Example(segments=[Segment(f"Colour {i}: ", train=False), Segment(f"{w} {w} {w}.", train=True)],
                       prompt=f"Colour {i}: ", reference=f"{w} {w} {w}.")

    return LoadedData(train=[ex(i) for i in range(int(options["count"]))],
                      validation=[ex(i) for i in range(100, 104)], fingerprint=f"colours-{options['count']}")


def plan_plain(options, ctx):
    return QuantizationPlan(from_pretrained_kwargs={"dtype": torch.float32}, notes=["plain fp32 weights"],
                            bytes_per_weight=4.0, quantizes=lambda name, i, o: False,
                            count_quantized=lambda model: 0)


def attach_lora(model, options, ctx):
    # a third party may build on PEFT directly
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=options["rank"], lora_alpha=2 * options["rank"], lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def lora_count(options, linears, ctx):
    return sum(options["rank"] * (i + o) for name, (i, o) in linears.items() if name.endswith(("q_proj", "v_proj")))


def lora_activations(options, linears, ctx, compute_bytes):  # each target's input and A's output
    return sum(compute_bytes * (i + options["rank"]) for name, (i, o) in linears.items()
               if name.endswith(("q_proj", "v_proj")))


class MeanLength:
    requires = "text"

    def __init__(self, options):
        pass

    def compute(self, predictions, references):
        return {"mean_chars": sum(map(len, predictions)) / max(len(predictions), 1)}


class ThirdParty:
    @hookimpl
    def ftk_register_datasets(self, register):
        register("colours", load_colours, options_schema={
            "type": "object", "properties": {"count": {"type": "integer", "minimum": 1, "default": 24}}})

    @hookimpl
    def ftk_register_quantizers(self, register):
        register("plain", plan_plain, options_schema={"type": "object"})

    @hookimpl
    def ftk_register_adapters(self, register):
        register("mylora", attach_lora, info=AdapterInfo(trainable_parameters=lora_count, activation_bytes=lora_activations), options_schema={
            "type": "object", "properties": {"rank": {"type": "integer", "minimum": 1, "default": 4}}})

    @hookimpl
    def ftk_register_metrics(self, register):
        register("mean_chars", MeanLength, options_schema={"type": "object"},
                 info=MetricInfo(keys=["mean_chars"], higher_is_better=False, requires="text"))

    @hookimpl
    def ftk_register_trainers(self, register):
        register("plain_sft", lambda options, ctx: TrainerPlan(notes=["plain_sft: next-token loss"]),
                 options_schema={"type": "object"})


@pytest.fixture
def only_third_party(monkeypatch):
    import ftk.manager

    mgr = make_manager(load_entrypoints=False)
    register_on(mgr, ThirdParty(), name="colours-kit", package="ftk-colours", version="1.2.0")
    assert {c.split(":")[0] for c in mgr.records["colours-kit"].provides} == {
        "dataset", "quantizer", "adapter", "metric", "trainer"}
    assert all(r.package == "ftk-colours" for r in mgr.records.values())  # nothing built in is loaded
    monkeypatch.setattr(ftk.manager, "_cached", mgr)
    return mgr


def cli(args, capsys):
    from ftk.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_a_recipe_of_third_party_components_runs_end_to_end(only_third_party, tmp_path, capsys):
    recipe = {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "plain"}},
        "adapter": {"method": "mylora", "rank": 4},
        "trainer": {"method": "plain_sft"},
        "data": {"datasets": [{"loader": "colours", "count": 32}], "max_length": 64},
        "training": {"max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                     "warmup_ratio": 0, "precision": "fp32", "report_to": ["none"]},
        "evaluation": {"metrics": [{"name": "mean_chars"}], "max_samples": 4, "compare_base": True,
                       "generation": {"max_new_tokens": 6, "num_beams": 1}},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))

    code, out, err = cli(["validate", str(path)], capsys)
    assert code == 0, err

    code, out, err = cli(["plan", str(path), "--json", "--no-data"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    # the adapter's own count: r * (in + out) on q (64 -> 64) and v (64 -> 32) in 5 layers
    assert 4 * 5 * ((64 + 64) + (64 + 32)) in set(_numbers(plan)), plan
    assert plan["unknown"] == []  # every component declared what ftk plan needs

    code, out, err = cli(["run", str(path)], capsys)
    assert code == 0, err[-2000:]
    assert "plain_sft: next-token loss" in out and "plain fp32 weights" in out
    run = tmp_path / "out"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["plugins"] == ["ftk-colours==1.2.0"]
    assert manifest["model"]["quantization"]["quantized_layers"] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 6
    assert metrics["train"]["eval_loss_after"] < metrics["train"]["eval_loss_before"]
    assert "mean_chars" in metrics["base"] and "mean_chars" in metrics["finetuned"]
    # the report's verdict follows the metric's declared direction (lower is better here)
    b, f = metrics["base"]["mean_chars"], metrics["finetuned"]["mean_chars"]
    want = "fine-tuned" if f < b else "base" if f > b else "same"
    row = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| mean_chars"))
    assert row.rstrip(" |").endswith(want), row
    from safetensors.torch import load_file

    b_tensors = [v for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(b_tensors) == 10 and all(t.abs().sum() > 0 for t in b_tensors)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj

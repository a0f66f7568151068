"""`ftk eval` and `ftk generate`. Only click is imported here; torch and friends load inside the commands."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ftk.commands import set_option
from ftk.defaults import schema_default
from ftk.errors import FtkError


def _gen_default(key: str):
    """`ftk generate` option defaults are the recipe's evaluation.generation defaults."""
    return schema_default(f"evaluation.generation.{key}")


def _manager(ctx: click.Context):
    from ftk.manager import get_manager

    obj = ctx.ensure_object(dict)
    if "manager" not in obj:
        obj["manager"] = get_manager()
    return obj["manager"]


def _check_adapter_dir(adapter: str) -> None:
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FtkError(f"--adapter: {adapter} is not an adapter folder (no adapter_config.json)")


def decoding_options(beams_help: str):
    """The decoding flags `ftk generate` and `ftk chat` share (their rule: ftk.generation.resolve_decoding)."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=_gen_default("max_new_tokens"),
                     show_default=True),
        click.option("--num-beams", type=click.IntRange(min=1), default=None, help=beams_help),
        click.option("--do-sample/--no-sample", default=None,
                     help="Sample, or not. Unset: sample when --temperature (> 0) or --top-p is given."),
        click.option("--temperature", type=click.FloatRange(min=0), default=None,
                     help="Sampling temperature; given alone it turns sampling on (1.0 when sampling without it). "
                          "0: greedy decoding."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Nucleus sampling mass; given alone it turns sampling on (1.0 when sampling without it)."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                     default=_gen_default("repetition_penalty"), show_default=True),
        click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible sampled output)."),
    ]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def load_for_eval(recipe: dict, manager, tokenizer, adapter: str | None):
    """The recipe's base model (quantized as the recipe says, no fresh adapter) plus, when given, a
    trained adapter from ``adapter``. Inference only: no k-bit training preparation."""
    from ftk import model as model_mod

    model = model_mod.load_quantized_base(recipe, manager, tokenizer)[0]
    model.config.use_cache = True  # inference: the KV cache speeds generation up
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def load_for_generation(base: str | None, adapter: str | None, who: str):
    """(model, tokenizer) for generating, as `ftk generate` and `ftk chat` load them: the base (``base``, else
    the adapter's own base) unquantized, as `ftk merge` loads it, plus the adapter; on the GPU when there is one."""
    import torch

    from ftk.model import adapter_base_name, load_unquantized

    model, tokenizer = load_unquantized(base or adapter_base_name(adapter), adapter, who=who)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def format_table(metrics: dict, higher_is_better: dict[str, bool] | None = None) -> str:
    """Plain-text metrics table for the terminal (base | fine-tuned | change | better); ``higher_is_better``
    as for ``ftk.report.metrics_table``."""
    from ftk.report import metrics_table, same_warning
    from ftk.tables import format_columns

    rows = [r for r in metrics_table(metrics, higher_is_better) if not r.startswith("|---") and not r.startswith("|:")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if r.startswith("|")]
    if not cells:
        return "\n".join(rows)
    table = format_columns(cells)
    warning = same_warning(metrics)
    return table + (f"\n{warning}" if warning else "")




@click.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="A trained adapter folder (OUTPUT_DIR/adapter). Without it, only the base model is scored.")
@set_option
@click.option("--no-base", is_flag=True, help="With --adapter: skip the base-model comparison.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json, generations.jsonl and report.md into this folder (else nothing is written).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
@click.pass_context
def eval_cmd(ctx, recipe, adapter, overrides, no_base, out, as_json):
    """Score a model on the recipe's validation split without training.

    \b
    Uses the recipe's evaluation section: metrics (perplexity over the validation
    split; BLEU/ROUGE over up to max_samples generated answers) and generation
    settings. With --adapter, the adapter is scored and, unless --no-base, the
    base model too (adapter disabled in the same process).

    \b
    Examples:
      ftk eval examples/quickstart.json
      ftk eval examples/quickstart.json --adapter runs/quickstart/adapter
      ftk eval examples/quickstart.json --adapter runs/quickstart/adapter \\
          --set evaluation.max_samples=5 --set evaluation.generation.num_beams=1 --out runs/eval1

    \b
    Decoding (evaluation.generation) follows the rule in docs/evaluation.md,
    "Generation settings"; a setting that would be ignored is an error.
    """
    from ftk.recipe import load_recipe

    mgr = _manager(ctx)
    r = load_recipe(recipe, overrides, manager=mgr)
    if adapter:
        _check_adapter_dir(adapter)
    from ftk import data as data_mod
    from ftk import evaluate as eval_mod
    from ftk import model as model_mod

    tokenizer = model_mod.load_tokenizer(r)
    prepared = data_mod.prepare_data(r, tokenizer, mgr)
    model = load_for_eval(r, mgr, tokenizer, adapter)
    metrics = eval_mod.evaluate_run(model, tokenizer, prepared, r, mgr, out,
                                    compare_base=False if no_base else None)
    metrics["adapter"] = str(Path(adapter).resolve()) if adapter else None
    if out:
        from ftk.io import atomic_write_json
        from ftk.report import write_report

        atomic_write_json(Path(out) / "metrics.json", metrics)
        write_report(out, r, metrics, mgr)
    if as_json:
        click.echo(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=2))
    else:
        click.echo(format_table(metrics, eval_mod.metric_directions(r, mgr)))


@click.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="A trained adapter folder; its base model comes from adapter_config.json unless --base is given.")
@click.option("--base", "base", default=None, metavar="MODEL",
              help="Base model folder or hub id (alone: generate with the base model, no adapter).")
@decoding_options("Beam width. Unset: 4 (beam search), or 1 when sampling or with --temperature 0 (greedy).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {prompt, response}.")
def generate(prompts, adapter, base, max_new_tokens, num_beams, do_sample, temperature, top_p,
             repetition_penalty, seed, as_json):
    """Print the model's response to each PROMPT (only the new text, up to EOS).

    The prompt is given to the model exactly as written, so for an adapter trained
    on Alpaca-format data write the Alpaca prompt. The base model is loaded
    unquantized (as `ftk merge` does).

    \b
    Decoding follows one rule, the recipe's and the Python API's too (table in
    docs/evaluation.md, "Generation settings"): no option gives 4-beam search;
    --temperature or --top-p alone samples; --temperature 0 is greedy; a flag
    that would be ignored (--no-sample with --temperature, say) is an error.

    \b
    Examples:
      ftk generate --base ../shared/models/stories260K "Once upon a time"
      ftk generate --adapter runs/quickstart/adapter --num-beams 1 "Once upon a time"
      ftk generate --adapter runs/quickstart/adapter --temperature 0.8 --seed 1 "Hi!"
    """
    from ftk.generation import CLI, resolve_decoding

    decoding = resolve_decoding({"do_sample": do_sample, "num_beams": num_beams, "temperature": temperature,
                                 "top_p": top_p}, CLI)  # before anything loads
    if not adapter and not base:
        raise FtkError("generate: give --adapter DIR or --base MODEL")
    if adapter:
        _check_adapter_dir(adapter)
    from ftk.evaluate import QualitativeEvaluator

    model, tokenizer = load_for_generation(base, adapter, "generate")
    responses = QualitativeEvaluator(model, tokenizer).generate(
        list(prompts), max_length=max_new_tokens, repetition_penalty=repetition_penalty, seed=seed, **decoding)
    if as_json:
        click.echo(json.dumps([{"prompt": p, "response": r} for p, r in zip(prompts, responses)],
                              indent=2, ensure_ascii=False))
        return
    for i, r in enumerate(responses):
        if len(prompts) > 1:
            click.echo(f"--- {i + 1}: {prompts[i]}")
        click.echo(r)

"""`ftk chat`. Only click is imported here; torch and friends load inside the command (ftk.chat does the work)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ftk.cmd_eval import decoding_options, load_for_generation
from ftk.errors import FtkError


def locate(target: str) -> tuple[str | None, str | None]:
    """(adapter folder or None, the run's recipe.json or None) for RUN_OR_ADAPTER; a model folder gives
    (None, None). A folder that is none of these: one line naming it."""
    p = Path(target)
    if not p.is_dir():
        raise FtkError(f"chat: {target}: {'not a folder' if p.exists() else 'not found'} (give a run folder, an "
                       f"adapter folder or a model folder)")
    if (p / "adapter_config.json").is_file():  # a run's adapter/ has the run's recipe beside it
        recipe = p.parent / "recipe.json"
        return str(p), (str(recipe) if recipe.is_file() else None)
    if (p / "adapter" / "adapter_config.json").is_file():
        return str(p / "adapter"), (str(p / "recipe.json") if (p / "recipe.json").is_file() else None)
    if (p / "recipe.json").is_file():
        raise FtkError(f"chat: {target}: the run has no adapter (no adapter/adapter_config.json): not trained yet?")
    if (p / "config.json").is_file():
        return None, None
    raise FtkError(f"chat: {target}: not a run folder (recipe.json and adapter/), an adapter folder "
                   f"(adapter_config.json) or a model folder (config.json)")


def run_recipe(path: str):
    """A run's recipe.json as the run resolved it (defaults filled, paths absolute). Not validated again: only
    its data section is read, and a recipe an older ftk wrote may not pass today's checks."""
    from ftk.recipe import Recipe, load_json_file

    raw = load_json_file(path)
    datasets = raw.get("data", {}).get("datasets") if isinstance(raw, dict) else None
    if not isinstance(datasets, list) or not all(isinstance(d, dict) and "loader" in d for d in datasets):
        raise FtkError(f"{path}: not a run's recipe (no data.datasets with loaders)")
    recipe = Recipe(raw)
    recipe.path = str(Path(path).resolve())
    return recipe


@click.command()
@click.argument("run_or_adapter", metavar="RUN_OR_ADAPTER")
@click.option("--base", "base", default=None, metavar="MODEL",
              help="Base model folder or hub id under the adapter (default: the adapter's own base).")
@click.option("--format", "fmt", type=click.Choice(["auto", "conversation", "template"]), default="auto",
              show_default=True,
              help="auto: the run's prompt format (read off its data), or without a run the tokenizer's chat "
                   "template, else ftk's conversation format; conversation: 'User: ...' / 'Assistant: ...' "
                   "lines; template: the tokenizer's chat template.")
@click.option("--dataset", type=click.IntRange(min=0), default=None, metavar="N",
              help="Use the format of the run's data.datasets[N] (default: the first with multi-turn "
                   "conversations, else the first whose format can be told).")
@click.option("--system", default=None, metavar="TEXT", help="A system message opening every conversation.")
@decoding_options("Beam width. Unset: 1 (replies stream); above 1: beam search, each reply printed whole.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Sample from the k most likely tokens only; given alone it turns sampling on.")
@click.pass_context
def chat(ctx, run_or_adapter, base, fmt, dataset, system, max_new_tokens, num_beams, do_sample, temperature,
         top_p, repetition_penalty, seed, top_k):
    """Chat with a tuned model in a terminal, in the prompt format its run trained on.

    RUN_OR_ADAPTER is a run folder (OUTPUT_DIR, with recipe.json and adapter/),
    an adapter folder, or a plain model folder (chat with the base model).
    Replies stream as they are generated and stop at EOS or where the format
    starts the next turn; the conversation so far goes with every message
    (single-turn formats such as Alpaca's answer each message on its own).
    Type /reset to start over, /exit (or Ctrl-D) to quit; Ctrl-C stops a
    reply, or quits at the prompt. With stdin or stdout not a terminal, every
    line read is a message and stdout gets only the replies.

    \b
    Decoding follows the rule of `ftk generate` (docs/evaluation.md,
    "Generation settings") but for one thing: --num-beams unset is 1, so with no
    flag replies are greedy. See docs/chat.md.

    \b
    Examples:
      ftk chat examples/runs/quickstart
      ftk chat examples/runs/quickstart --temperature 0.8 --seed 1
      echo "Hi, how are you?" | ftk chat examples/runs/quickstart --max-new-tokens 40
    """
    from ftk.generation import CLI, resolve_decoding

    # before anything loads: chat streams, so an unset --num-beams is 1 (the rule's one exception here)
    decoding = resolve_decoding({"do_sample": do_sample, "num_beams": 1 if num_beams is None else num_beams,
                                 "temperature": temperature, "top_p": top_p, "top_k": top_k}, CLI)
    if fmt != "auto" and dataset is not None:
        raise FtkError(f"--dataset: chooses the run's format, but --format {fmt} is given; drop one")
    adapter, recipe_path = locate(run_or_adapter)
    if dataset is not None and recipe_path is None:
        raise FtkError(f"--dataset: {run_or_adapter} is not a run (no recipe.json beside the adapter)")
    if adapter is None and base is not None:
        raise FtkError(f"--base: {run_or_adapter} is a model folder already; drop --base")
    from transformers.utils import logging as hf_logging

    from ftk import chat as chat_mod

    # the terminal is the chat's: no "Loading weights" bar, no notes of bitsandbytes (the model is not quantized)
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model, tokenizer = load_for_generation(base or (None if adapter else run_or_adapter), adapter, "chat")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_new_tokens >= limit:
        raise FtkError(f"--max-new-tokens: {max_new_tokens} must be below the model's context length {limit}")
    if fmt == "template" or (fmt == "auto" and recipe_path is None and getattr(tokenizer, "chat_template", None)):
        chat_format = chat_mod.template_format(tokenizer)
    elif fmt == "conversation" or recipe_path is None:
        chat_format = chat_mod.conversation_format()
    else:
        from ftk.manager import get_manager

        obj = ctx.ensure_object(dict)
        manager = obj.setdefault("manager", get_manager())
        chat_format = chat_mod.run_format(run_recipe(recipe_path), manager, tokenizer, dataset)
    if system:
        lack = chat_format.missing(["system", "user"])
        if lack:
            raise FtkError(f"--system: the format of {chat_format.source} has {lack}")
    elif chat_format.missing(["user"]):
        raise FtkError(f"chat: the format of {chat_format.source} has {chat_format.missing(['user'])}; "
                       f"give --system TEXT")
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    gen_kwargs = dict(max_new_tokens=max_new_tokens, **decoding, repetition_penalty=repetition_penalty,
                      eos_token_id=eos, use_cache=True,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    session = chat_mod.Session(chat_format, tokenizer, system=system, limit=limit, max_new=max_new_tokens)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        what = f"{run_or_adapter}" + (f" (adapter on {base})" if base else "")
        decoding_text = ("greedy" if not decoding["do_sample"] and decoding["num_beams"] == 1 else
                         ", ".join(f"{k} {v}" for k, v in decoding.items()))
        click.echo(f"chat with {what}\nformat: {chat_format.describe()}\ndecoding: {decoding_text}, at most "
                   f"{max_new_tokens} new tokens\n/help lists the commands")
    model.eval()
    chat_mod.chat_loop(session, lambda ids, pending, write: chat_mod.generate_reply(
        model, tokenizer, ids, pending, chat_format, gen_kwargs, write), interactive)

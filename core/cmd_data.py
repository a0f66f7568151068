"""`ftk data preview` and `ftk data stats`: see the data exactly as the model will. Loads only the
tokenizer, never the model; heavy imports happen inside the commands."""
from __future__ import annotations

import json
import sys

import click

from ftk.commands import set_option



def _prepare(recipe_path: str, overrides, reuse: bool = True):
    from ftk.data import prepare_data
    from ftk.manager import get_manager
    from ftk.model import load_tokenizer
    from ftk.recipe import load_recipe

    mgr = get_manager()
    recipe = load_recipe(recipe_path, list(overrides), manager=mgr)
    tok = load_tokenizer(recipe)
    return recipe, tok, prepare_data(recipe, tok, mgr, reuse=reuse)


def preview_items(prepared, tokenizer, n: int) -> list[dict]:
    """The first n training examples as the model sees them (after truncation), one per item;
    ``pretokenized``: the loader gave the example's ids itself (``Example.token_ids``)."""
    import numpy as np

    from ftk.data import IGNORE

    out = []
    for ref in prepared.train_refs[:n]:
        blk, i = ref.block, ref.idx
        a, b = int(blk.offsets[i]), int(blk.offsets[i + 1])
        b = min(b, a + int(prepared.stats["settings"]["max_length"]))
        ids = blk.ids[a:b].tolist()
        labels = np.where(blk.mask[a:b] > 0, blk.ids[a:b], IGNORE).tolist()
        part = ref.name.rsplit("#", 1)[0]
        example = prepared.examples[part][i]  # train refs index their dataset's examples as loaded
        out.append({"text": tokenizer.decode(ids, skip_special_tokens=False), "input_ids": ids, "labels": labels,
                    "source": part.split("[")[0], "example": ref.name,
                    "pretokenized": example.token_ids is not None})
    return out


def preview_pairs(prepared, tokenizer, n: int) -> list[dict]:
    """The first n training pairs as the model sees them (after truncation): the ids the trainer gets, the
    prompt and each response decoded, token counts and whether the pair was truncated."""
    out = []
    for ref, feats in zip(prepared.train_refs[:n], prepared.train):
        part = ref.name.rsplit("#", 1)[0]
        full = int(ref.block.offsets[3 * ref.idx + 3] - ref.block.offsets[3 * ref.idx])
        kept = sum(len(v) for v in feats.values())
        out.append({"example": ref.name, "source": part.split("[")[0], **feats,
                    **{k: tokenizer.decode(feats[f"{k}_ids"], skip_special_tokens=False)
                       for k in ("prompt", "chosen", "rejected")},
                    "truncated": kept < full})
    return out


def render_masked(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """Decoded text with masked (untrained) spans bracketed as [[...]] (and dimmed on a terminal)."""
    out, run, run_trained = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run, skip_special_tokens=False)
        if run_trained:
            out.append(text)
        else:
            out.append(click.style(f"[[{text}]]", dim=True) if color else f"[[{text}]]")

    for t, lab in zip(ids, labels):
        trained = lab != -100
        if trained != run_trained and run:
            flush()
            run = []
        run_trained = trained
        run.append(t)
    flush()
    return "".join(out)


@click.group("data")
def data():
    """Look at the data a recipe produces (tokenizer only; the model is not loaded)."""


@data.command("preview")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-n", "n", type=click.IntRange(min=1), default=3, show_default=True, help="Examples to show.")
@click.option("--json", "as_json", is_flag=True,
              help="Print [{text, input_ids, labels, source, example, pretokenized}, ...]; for preference pairs "
                   "[{example, source, prompt_ids, chosen_ids, rejected_ids, prompt, chosen, rejected, truncated}, ...].")
@set_option
def preview(recipe, n, as_json, overrides):
    """The first N training examples exactly as the model sees them. Masked (untrained) tokens are
    shown as [[...]]; everything else, including </s>, carries a label. A preference pair shows its
    prompt (masked) once, then each response: the model sees the prompt followed by each."""
    _, tok, prepared = _prepare(recipe, overrides, reuse=False)  # preview needs the examples themselves
    pairs = prepared.form == "pairs"
    items = (preview_pairs if pairs else preview_items)(prepared, tok, n)
    if as_json:
        click.echo(json.dumps(items, indent=1, ensure_ascii=False))
        return
    color = sys.stdout.isatty()
    for it in items:
        if pairs:
            _echo_pair(tok, it, color)
        else:
            trained = sum(lab != -100 for lab in it["labels"])
            kind = ", pre-tokenized" if it["pretokenized"] else ""
            click.echo(f"=== {it['example']} ({it['source']}{kind}): {len(it['input_ids'])} tokens, {trained} trained")
            click.echo(render_masked(tok, it["input_ids"], it["labels"], color))
        click.echo("")


def _echo_pair(tok, it: dict, color: bool) -> None:
    """A pair as its two sequences: the prompt (masked, shown once) followed by chosen, and by rejected."""
    np_, nc, nr = len(it["prompt_ids"]), len(it["chosen_ids"]), len(it["rejected_ids"])
    click.echo(f"=== {it['example']} ({it['source']}{', truncated' if it['truncated'] else ''}): prompt {np_} "
               f"tokens (masked), chosen {nc}, rejected {nr} (sequences of {np_ + nc} and {np_ + nr})")
    click.echo(render_masked(tok, it["prompt_ids"], [-100] * np_, color))
    for k in ("chosen", "rejected"):
        click.echo(f"--- {k}: " + render_masked(tok, it[f"{k}_ids"], it[f"{k}_ids"], color))


@data.command("stats")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON.")
@set_option
def stats(recipe, as_json, overrides):
    """Examples per dataset and split, token counts, truncated/dropped/skipped, padding waste (preference
    pairs: pairs per dataset and split; tokens are prompt + the longer response)."""
    from ftk.tables import format_columns

    _, _, prepared = _prepare(recipe, overrides)
    st = prepared.stats
    if as_json or st.get("streaming"):  # streaming stats have no per-dataset table
        click.echo(json.dumps(st, indent=1))
        return
    rows = [("DATASET", "TRAIN", "VALID", "TOK MEAN", "P95", "MAX", "TRUNC", "DROPPED", "SKIPPED", "CACHE")]
    for ds in st["datasets"]:
        rows.append((ds["name"], str(ds["examples"]["train"]), str(ds["examples"]["validation"]),
                     str(ds["tokens"]["mean"]), str(ds["tokens"]["p95"]), str(ds["tokens"]["max"]),
                     str(ds["truncated"]), _counts(ds["dropped"]), _counts(ds["skipped"]), ds["cache"]))
    click.echo(format_columns(rows))
    tr, s = st["train"], st["settings"]
    if st.get("form") == "pairs":
        click.echo(f"train: {tr['examples']} pairs ({_counts(tr['per_dataset'])}), {tr['tokens']} tokens; "
                   f"validation: {st['validation']['examples']} pairs")
        if s["truncation"] == "drop":
            click.echo(f"pairs longer than max_length {s['max_length']} are dropped; pairs are not packed")
        else:
            click.echo(f"pairs longer than max_length {s['max_length']} keep at most {s['max_prompt_length']} prompt "
                       f"tokens (truncated); pairs are not packed")
        return
    click.echo(f"train: {tr['examples']} examples ({_counts(tr['per_dataset'])}) in {tr['rows']} rows, "
               f"{tr['tokens']} tokens, {tr['trainable_tokens']} trained; validation: "
               f"{st['validation']['examples']} examples")
    pw = st["padding_waste"]
    click.echo(f"padding waste (batch {s['batch_size']}, max_length {s['max_length']}): "
               f"unpacked {pw['unpacked']:.1%}, unpacked padded to max_length {pw['unpacked_pad_to_max_length']:.1%}, "
               f"packed {pw['packed']:.1%} (packing is {'on' if s['packing'] else 'off'})")


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if v) or "0"

"""`ftk merge`: fold a trained adapter into its (de-quantized) base and save a plain transformers model.
Only click at import time; torch and friends load inside the command."""
from __future__ import annotations

import click


@click.command()
@click.argument("adapter_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder for the merged model (new or empty).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the merged weights.")
@click.option("--base", default=None, metavar="PATH_OR_ID",
              help="Base model to merge into (default: the adapter's base_model_name_or_path).")
def merge(adapter_dir, out_dir, dtype, base):
    """Merge ADAPTER_DIR (e.g. runs/quickstart/adapter) into its base model.

    The base is loaded unquantized in full precision, so the merged weights carry no 4-bit rounding of
    the base; load the result with AutoModelForCausalLM.from_pretrained(OUT).

    \b
    Example:  ftk merge runs/quickstart/adapter --out runs/quickstart/merged
    """
    from ftk.model import merge_adapter

    out = merge_adapter(adapter_dir, out_dir, dtype=dtype, base=base)
    click.echo(f"merged model written to {out}")

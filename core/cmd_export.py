"""`ftk export SOURCE --format NAME --out PATH`: write a run's model (its adapter merged into the
de-quantized base), its adapter alone, or a plain model in another format. The formats are `exporter`
components (the built-in `gguf` is a plugin); the core resolves what SOURCE is, merges when asked,
validates the exporter's options and makes the output appear whole or not at all. Only click at import
time; torch and friends load inside the command."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import click

# a hub id: "name" or "org/name" (what huggingface_hub accepts), for a source that is no local path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_source(source: str, base: str | None = None) -> dict:
    """What SOURCE names: {"source_kind", "adapter_dir", "base"} (see ftk.components.EXPORT_SOURCES), or a
    FtkError saying why it is none of them. ``base`` replaces an adapter's recorded base model."""
    from ftk.errors import FtkError

    p = Path(source)
    if p.is_dir():
        if (p / "adapter" / "adapter_config.json").is_file():
            kind, adapter = "run", p / "adapter"
        elif (p / "adapter_config.json").is_file():
            kind, adapter = "adapter", p
        elif (p / "config.json").is_file():
            if base:
                raise FtkError(f"--base: {source} is a model, not a run or an adapter; --base names an adapter's base")
            return {"source_kind": "model", "adapter_dir": None, "base": str(p.resolve())}
        elif (p / "recipe.json").is_file():
            raise FtkError(f"{source}: a run folder without adapter/ (not finished?); "
                           f"name a checkpoint's adapter folder instead")
        else:
            raise FtkError(f"{source}: not a run, adapter or model folder "
                           f"(no adapter/adapter_config.json, adapter_config.json or config.json)")
        from ftk.model import adapter_base_name

        return {"source_kind": kind, "adapter_dir": str(adapter.resolve()), "base": base or adapter_base_name(adapter)}
    if p.exists():
        raise FtkError(f"{source}: is a file; expected a run, adapter or model folder, or a hub id")
    if source.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(source):
        raise FtkError(f"{source}: no such folder (and not a hub id)")
    if base:
        raise FtkError(f"--base: {source} is a model, not a run or an adapter; --base names an adapter's base")
    return {"source_kind": "model", "adapter_dir": None, "base": source}


def local_model(name: str) -> str:
    """A local folder of model ``name``: the folder itself, or a hub id's snapshot (downloaded once)."""
    from ftk.errors import FtkError

    if Path(name).is_dir():
        return str(Path(name).resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, ignore_patterns=["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf", "original/*"])
    except Exception as e:  # offline, unknown repo, gated: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtkError(f"cannot get the model {name!r}: {first}") from None


def exporter_options(comp, given: dict) -> dict:
    """``given`` checked against the exporter's options schema, defaults filled; FtkError listing every
    problem, each naming the flag it came from."""
    from ftk.errors import FtkError
    from ftk.recipe import _validate, fill_defaults

    schema = comp.options_schema or {"type": "object"}
    errors = _validate(given, schema)
    if errors:
        flags = {"type": "--type", "adapter_only": "--adapter-only"}

        def named(line: str) -> str:
            key = line.split(":", 1)[0].split(".")[0]
            return f"{flags.get(key, '--option ' + key)}: {line.split(': ', 1)[-1]}" if key in given else line

        raise FtkError([f"export format {comp.name!r}: {named(e)}" for e in errors])
    return fill_defaults(dict(given), schema)


def _parse_options(items) -> dict:
    from ftk.errors import FtkError

    out = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip() or "." in key:
            raise FtkError(f"--option {item!r}: expected KEY=VALUE (one of the format's options)")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _check_output(out: Path, overwrite: bool) -> None:
    from ftk.errors import FtkError

    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FtkError(f"--out: {out} exists (add --overwrite to replace it)")
    if not out.parent.is_dir():
        raise FtkError(f"--out: {out.parent} is not a folder")


def run_export(manager, source: str, fmt: str, out: str, options: dict, *, base: str | None = None,
               overwrite: bool = False) -> tuple[Path, list[str]]:
    """Export ``source`` with exporter ``fmt`` to ``out``: (the output path, the exporter's notes)."""
    from ftk.components import ExportContext
    from ftk.errors import FtkError
    from ftk.io import temp_dir

    comp = manager.get("exporter", fmt)
    opts = exporter_options(comp, options)
    output = Path(out).expanduser().absolute()
    _check_output(output, overwrite)
    src = resolve_source(source, base)
    work = temp_dir(output.parent, f".{output.name}.work-")
    staging = work.with_name(work.name.replace(".work-", ".part-"))  # beside the output: the rename is atomic
    merged: dict[str, str] = {}
    local: list[str] = []

    def base_model() -> str:
        if not local:
            local.append(local_model(src["base"]))
        return local[0]

    def merged_model(dtype: str = "float32") -> str:
        if src["source_kind"] == "model":
            return base_model()
        if dtype not in merged:
            from ftk.model import merge_adapter

            merged[dtype] = str(merge_adapter(src["adapter_dir"], work / f"merged-{dtype}", dtype=dtype,
                                              base=src["base"]))
        return merged[dtype]

    ctx = ExportContext(source=source, source_kind=src["source_kind"], adapter_dir=src["adapter_dir"],
                        base=src["base"], output=str(output), staging=str(staging), work_dir=str(work),
                        merged_model=merged_model, base_model=base_model)
    try:
        with manager.calling(comp, "exporting"):
            notes = comp.factory(opts, ctx)
        if not (staging.exists() and not staging.is_symlink()):
            raise FtkError(f"export format {fmt!r} wrote nothing at {staging} (the exporter's staging path)")
        _check_output(output, overwrite)  # still free: nothing else took it meanwhile
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        _remove(staging)
        shutil.rmtree(work, ignore_errors=True)
    return output, [str(n) for n in notes or []]


@click.command("export")
@click.argument("source", metavar="RUN_OR_ADAPTER_OR_MODEL")
@click.option("--format", "fmt", required=True, metavar="NAME", help="Export format (an exporter component, e.g. gguf).")
@click.option("--out", "out", required=True, type=click.Path(), help="Where to write the export (must not exist).")
@click.option("--type", "dtype", default=None, metavar="TYPE",
              help="The format's data type or quantization (gguf: f32, f16, bf16, q8_0, q4_k_m, ...).")
@click.option("--adapter-only", is_flag=True, help="Export the adapter alone instead of the merged model.")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Another option of the format (value parsed as JSON when it parses). Repeatable.")
@click.option("--base", default=None, metavar="PATH_OR_ID",
              help="The adapter's base model (default: the adapter's base_model_name_or_path).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the export succeeded).")
@click.pass_context
def export(ctx, source, fmt, out, dtype, adapter_only, extra, base, overwrite):
    """Export a run (its adapter merged into the de-quantized base), an adapter, or a model.

    RUN_OR_ADAPTER_OR_MODEL is a finished run's folder (its adapter/), an adapter folder, or a plain
    model (a folder with config.json, or a hub id). `ftk plugins list` shows the formats
    (exporter:NAME); `ftk plugins show exporter:NAME` their options.

    \b
    Examples:  ftk export runs/quickstart --format gguf --out quickstart-f16.gguf
               ftk export runs/quickstart --format gguf --adapter-only --out quickstart-lora.gguf
               ftk export ../shared/models/stories260K --format gguf --type q8_0 --out base-q8_0.gguf
    """
    from ftk.manager import get_manager

    obj = ctx.ensure_object(dict)
    manager = obj.setdefault("manager", get_manager())
    options = _parse_options(extra)
    if dtype is not None:
        options["type"] = dtype
    if adapter_only:
        options["adapter_only"] = True
    path, notes = run_export(manager, source, fmt, out, options, base=base, overwrite=overwrite)
    for n in notes:
        click.echo(f"note: {n}")
    click.echo(f"exported to {path}")

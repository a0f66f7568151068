"""Markdown recipe reference generated from the schemas (``ftk schema --markdown``); docs/recipe.md is
this output, and a test keeps the two equal."""
from __future__ import annotations

import json


def _type(s: dict) -> str:
    if "enum" in s:
        return " \\| ".join(json.dumps(v) for v in s["enum"])
    if "const" in s:
        return json.dumps(s["const"])
    if "anyOf" in s:
        return " or ".join(_type(x) for x in s["anyOf"])
    t = s.get("type", "")
    if isinstance(t, list):
        t = " \\| ".join(t)
    if t == "array" and isinstance(s.get("items"), dict) and s["items"].get("type"):
        t = f"array of {_type(s['items'])}"
    return t


def _limits(s: dict) -> str:
    out = []
    for k, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if k in s:
            out.append(f"{sym} {s[k]}")
    if s.get("minItems"):
        out.append(f"at least {s['minItems']} item(s)")
    if s.get("format") in ("path", "path-or-hub-id"):
        out.append("path relative to the recipe" + (" or hub id" if s["format"] == "path-or-hub-id" else ""))
    return ", ".join(out)


def _rows(schema: dict, prefix: str, required: set) -> list[str]:
    rows = []
    for key, sub in schema.get("properties", {}).items():
        if key == "$schema":
            continue
        path = f"{prefix}{key}"
        default = json.dumps(sub["default"]) if "default" in sub else ("required" if key in required else "")
        desc = (sub.get("description") or "").replace("\n", " ").replace("|", "\\|")
        lim = _limits(sub)
        rows.append(f"| `{path}` | {_type(sub)} | {default} | {'; '.join(x for x in (desc, lim) if x)} |")
        if sub.get("type") == "object" and "properties" in sub and sub.get("additionalProperties") is False:
            rows.extend(_rows(sub, path + ".", set(sub.get("required", []))))
    return rows


HEADER = "| key | type | default | notes |\n|---|---|---|---|"


def recipe_reference(manager) -> str:
    from ftk.recipe import base_schema

    base = base_schema()
    out = ["# Recipe reference", "",
           "Generated from `schemas/recipe.schema.json` and the installed components' option schemas",
           "(`ftk schema --markdown`; a test keeps this page equal to that output). Relative paths resolve",
           "against the recipe file's folder; `--set key.path=value` overrides any key (values parse as JSON",
           "when they can). Unknown keys are errors.", "", "## Top level and core sections", "", HEADER]
    out += _rows(base, "", set(base.get("required", [])))
    slots = [("Quantizers", "quantizer", "model.quantization", "method"), ("Adapters", "adapter", "adapter", "method"),
             ("Trainers", "trainer", "trainer", "method"),
             ("Dataset loaders", "dataset", "data.datasets[]", "loader"), ("Metrics", "metric", "evaluation.metrics[]", "name"),
             ("Callbacks", "callback", "callbacks[]", "name")]
    items = base["properties"]["data"]["properties"]["datasets"]["items"]
    out += ["", "Every `data.datasets[]` entry also takes:", "", HEADER]
    out += _rows(items, "data.datasets[].", set(items.get("required", [])))
    for title, kind, where, key in slots:
        out += ["", f"## {title} (`{where}`, chosen by `{key}`)", ""]
        if not manager.components(kind):
            out += ["None installed.", ""]
        for name, comp in sorted(manager.components(kind).items()):
            out += [f"### `{name}` — {comp.description}", "", f"From plugin `{comp.plugin}` (package `{comp.package}`).", ""]
            rows = _rows(comp.options_schema, f"{where}.", set(comp.options_schema.get("required", [])))
            out += [HEADER, *rows, ""] if rows else ["No options.", ""]
    return "\n".join(out).rstrip() + "\n"

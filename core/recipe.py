"""The recipe contract: load JSON, apply ``--set`` overrides, validate against the base schema and
each chosen component's options schema (all errors at once, each naming its JSON path), fill
defaults, and resolve relative paths against the recipe's folder."""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema

from ftk.defaults import section_defaults
from ftk.errors import FtkError
from ftk.generation import recipe_errors

# (section path, key holding the component name, kind) for the component-bearing objects.
_COMPONENT_SLOTS = (
    (("model", "quantization"), "method", "quantizer"),
    (("adapter",), "method", "adapter"),
    (("trainer",), "method", "trainer"),
)


def base_schema() -> dict:
    from ftk.defaults import base_schema as schema

    return schema()


# -- loading --------------------------------------------------------------------------------------
def load_json_file(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FtkError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise FtkError(f"{path}: is a folder, expected a JSON recipe file") from None
    except UnicodeDecodeError as e:
        raise FtkError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise FtkError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FtkError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error: {e.msg}") from None
    except RecursionError:
        raise FtkError(f"{path}: JSON nested too deeply to read") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value); value parsed as JSON when it parses."""
    if "=" not in item:
        raise FtkError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise FtkError(f"--set {item!r}: empty key in {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_override(recipe: dict, parts: list[str], value: Any) -> None:
    node: Any = recipe
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, parts, i, len(node))]
            continue
        if not isinstance(node, dict):
            raise FtkError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i]) or '(root)'} is not an object")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, parts, len(parts) - 1, len(node))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise FtkError(f"--set {'.'.join(parts)}: {'.'.join(parts[:-1])} is not an object")


def _index(part: str, parts: list[str], i: int, n: int) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise FtkError(f"--set {'.'.join(parts)}: {part!r} must be a list index") from None
    if not -n <= idx < n:
        raise FtkError(f"--set {'.'.join(parts)}: index {idx} out of range (list has {n} items)")
    return idx


# -- error formatting -----------------------------------------------------------------------------
def json_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def _format_error(err: jsonschema.ValidationError, prefix: tuple = ()) -> list[str]:
    path = list(prefix) + list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list(err.schema.get("properties", {}))
        out = []
        for key in err.instance:
            if key in allowed or any(re.search(p, key) for p in err.schema.get("patternProperties", {})):
                continue
            msg = f"{json_path(path + [key])}: unknown key {key!r}"
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            msg += f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(sorted(allowed))}"
            out.append(msg)
        return out
    if err.validator == "anyOf" and err.context:
        # report the most specific sub-error rather than "is not valid under any of the given schemas"
        best = jsonschema.exceptions.best_match(err.context)
        return _format_error(best, prefix)
    if err.validator == "enum":
        # strings quoted as before; true/false/null spelled as the recipe's JSON spells them
        show = lambda v: repr(v) if isinstance(v, str) else json.dumps(v)  # noqa: E731
        return [f"{json_path(path)}: {show(err.instance)} is not one of {', '.join(map(show, err.validator_value))}"]
    return [f"{json_path(path)}: {err.message}"]


def _validate(instance: Any, schema: dict, prefix: tuple = ()) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    errors: list[str] = []
    for err in sorted(v.iter_errors(instance), key=lambda e: [str(x) for x in e.absolute_path]):
        errors.extend(_format_error(err, prefix))
    return errors


# -- component schemas ----------------------------------------------------------------------------
def merged_component_schema(common: dict, comp_schema: dict, name_key: str, name: str) -> dict:
    """The slot's common keys plus the component's own options; anything else is unknown."""
    props = dict(common.get("properties", {}))
    props.update(comp_schema.get("properties", {}))
    props[name_key] = {"const": name}
    merged = {k: v for k, v in comp_schema.items() if k not in ("properties", "$schema")}
    merged["type"] = "object"
    merged["properties"] = props
    merged["required"] = sorted(set(common.get("required", [])) | set(comp_schema.get("required", [])))
    merged.setdefault("additionalProperties", False)
    return merged


def _slots(recipe: dict, schema: dict):
    """Yield (path tuple, obj, name_key, kind, common schema) for every component object in a recipe."""
    props = schema["properties"]
    for path, key, kind in _COMPONENT_SLOTS:
        obj = recipe
        common = {"properties": props}
        for p in path:
            obj = obj.get(p) if isinstance(obj, dict) else None
            common = common["properties"].get(p, {}) if common else {}
        if isinstance(obj, dict):
            yield path, obj, key, kind, common
    data = recipe.get("data")
    if isinstance(data, dict) and isinstance(data.get("datasets"), list):
        common = props["data"]["properties"]["datasets"]["items"]
        for i, ds in enumerate(data["datasets"]):
            if isinstance(ds, dict):
                yield ("data", "datasets", i), ds, "loader", "dataset", common
    ev = recipe.get("evaluation")
    if isinstance(ev, dict) and isinstance(ev.get("metrics"), list):
        common = {"properties": {"name": {"type": "string"}}, "required": ["name"]}
        for i, m in enumerate(ev["metrics"]):
            if isinstance(m, dict):
                yield ("evaluation", "metrics", i), m, "name", "metric", common
    if isinstance(recipe.get("callbacks"), list):
        common = props["callbacks"]["items"]
        for i, cb in enumerate(recipe["callbacks"]):
            if isinstance(cb, dict):
                yield ("callbacks", i), cb, "name", "callback", common


def validate_recipe(recipe: Any, manager=None) -> list[str]:
    """Every problem with a recipe, one line each (empty when valid)."""
    schema = base_schema()
    errors = _validate(recipe, schema)
    if not isinstance(recipe, dict):
        return errors
    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    for path, obj, key, kind, common in _slots(recipe, schema):
        name = obj.get(key)
        if not isinstance(name, str):
            continue
        try:
            comp = manager.get(kind, name)
        except FtkError as e:
            errors.append(f"{json_path(list(path) + [key])}: {e.messages[0]}")
            continue
        errors.extend(_validate(obj, merged_component_schema(common, comp.options_schema, key, name), path))
    ev = recipe.get("evaluation")
    if isinstance(ev, dict) and isinstance(ev.get("metrics"), list):
        for i, m in enumerate(ev["metrics"]):
            if isinstance(m, str):
                try:
                    manager.get("metric", m)
                except FtkError as e:
                    errors.append(f"{json_path(['evaluation', 'metrics', i])}: {e.messages[0]}")
    errors.extend(_semantic_checks(recipe))
    return list(dict.fromkeys(errors))


def _semantic_checks(recipe: dict) -> list[str]:
    """Conflicts the schema cannot express."""
    out = []
    data = {**section_defaults("data"), **(recipe.get("data") if isinstance(recipe.get("data"), dict) else {})}
    tr = {**section_defaults("training"),
          **(recipe.get("training") if isinstance(recipe.get("training"), dict) else {})}
    if data["streaming"] and tr["max_steps"] in (-1, None):
        out.append("training.max_steps: streaming data needs max_steps (the length of a stream is unknown)")
    if data.get("streaming") and data.get("mixing") == "balanced":
        out.append("data.mixing: 'balanced' mixing needs the dataset sizes; use 'concat' with streaming")
    if data["packing"] and data["pad_to_max_length"]:
        out.append("data.pad_to_max_length: only applies with packing off (set data.packing to false)")
    vs = data.get("validation_size")
    if isinstance(vs, (int, float)) and not isinstance(vs, bool) and vs >= 1 and vs != int(vs):
        out.append(f"data.validation_size: {vs} must be a fraction below 1 or a whole count")
    out.extend(_missing_trackers(tr.get("report_to")))
    ev = recipe.get("evaluation")
    out.extend(recipe_errors(ev.get("generation") if isinstance(ev, dict) else None))  # settings one would ignore
    return out


# training.report_to entry -> the package transformers imports for it when training starts (tensorboard
# is one of ftk's own dependencies)
_TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}


def _missing_trackers(report_to) -> list[str]:
    """Trackers a recipe names whose package is not installed: without this, transformers' callback raises
    only once the model is loaded. Looked up with find_spec, nothing is imported."""
    import importlib.util

    if not isinstance(report_to, list):
        return []
    return [f"training.report_to: {name} is not installed (pip install {_TRACKERS[name]})"
            for name in dict.fromkeys(r for r in report_to if isinstance(r, str) and r in _TRACKERS)
            if importlib.util.find_spec(_TRACKERS[name]) is None]


def hardware_errors(recipe: dict) -> list[str]:
    """What this machine cannot run of a (valid) recipe: fp16 or bf16 precision the hardware lacks,
    flash_attention_2 without CUDA and flash-attn, activation offloading without CUDA. ``ftk run`` finds the same before loading weights;
    ``ftk validate`` asks here so that it accepts only what can train on this machine. torch is imported
    only when a choice depends on the hardware."""
    from ftk import model as model_mod

    m, t = recipe.get("model") or {}, recipe.get("training") or {}
    checks = []
    if t.get("precision") in ("fp16", "bf16"):
        checks.append((model_mod.resolve_precision, t["precision"]))
    if m.get("attn_implementation") == "flash_attention_2":
        checks.append((model_mod._check_attn, "flash_attention_2"))
    if m.get("activation_offloading") is True:
        checks.append((model_mod._check_offloading, True))
    out = []
    for check, value in checks:
        try:
            check(value)
        except FtkError as e:
            out.extend(e.messages)
    return out


# -- defaults and paths ---------------------------------------------------------------------------
def fill_defaults(instance: Any, schema: dict) -> Any:
    if not isinstance(instance, dict) or schema.get("type") not in ("object", None):
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            if isinstance(instance[key], dict):
                fill_defaults(instance[key], sub)
            elif isinstance(instance[key], list) and isinstance(sub.get("items"), dict):
                for item in instance[key]:
                    fill_defaults(item, sub["items"])
    return instance


def filled_recipe(recipe: dict, manager) -> dict:
    """A copy of a (possibly partial) recipe with the defaults ``load_recipe`` fills: the base schema's and
    each chosen component's own (quantizer, adapter, trainer, ...)."""
    out = copy.deepcopy(dict(recipe))
    out.setdefault("data", {})  # required in a recipe; a partial one here still gets data.max_length's default
    out = fill_defaults(out, base_schema())
    for _, obj, merged in _component_schemas(out, manager):  # each component's defaults, as load_recipe fills them
        fill_defaults(obj, merged)
    return out


def _looks_local(value: str, base: Path) -> bool:
    return value.startswith((".", "/", "~")) or (base / value).exists()


def _resolved(val: Any, sub: dict, base: Path) -> Any:
    """``val`` made absolute when ``sub`` (its schema) says it is a path, else as it is."""
    fmt = sub.get("format")
    if isinstance(val, str) and val and fmt in ("path", "path-or-hub-id"):
        if fmt == "path" or _looks_local(val, base):
            return str((base / os.path.expanduser(val)).resolve())
    return val


def resolve_paths(instance: Any, schema: dict, base: Path) -> Any:
    """Make every path-typed value absolute (``format: path`` or ``path-or-hub-id``), a list's items too."""
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance:
                continue
            val = instance[key]
            if isinstance(val, (dict, list)):
                resolve_paths(val, sub, base)
            else:
                instance[key] = _resolved(val, sub, base)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            if isinstance(item, (dict, list)):
                resolve_paths(item, schema["items"], base)
            else:
                instance[i] = _resolved(item, schema["items"], base)
    return instance


def missing_paths(instance: Any, schema: dict, prefix: tuple = ()) -> list[str]:
    """Local paths that must exist but do not: ``path-or-hub-id`` values that were resolved as local,
    and ``path`` values whose schema says ``"x-must-exist": true``."""
    out: list[str] = []

    def check(val: str, sub: dict, where: tuple) -> None:
        fmt = sub.get("format")
        if fmt == "path-or-hub-id" or (fmt == "path" and sub.get("x-must-exist")):
            if os.path.isabs(val) and not os.path.exists(val):
                out.append(f"{json_path(list(where))}: {val} does not exist")

    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            val = instance.get(key)
            if isinstance(val, str):
                check(val, sub, prefix + (key,))
            elif isinstance(val, (dict, list)):
                out.extend(missing_paths(val, sub, prefix + (key,)))
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            if isinstance(item, str):
                check(item, schema["items"], prefix + (i,))
            else:
                out.extend(missing_paths(item, schema["items"], prefix + (i,)))
    return out


def _component_schemas(recipe: dict, manager):
    """(path, obj, merged schema) for each component object whose component is known."""
    for path, obj, key, kind, common in _slots(recipe, base_schema()):
        try:
            comp = manager.get(kind, obj.get(key))
        except (FtkError, TypeError):
            continue
        yield path, obj, merged_component_schema(common, comp.options_schema, key, obj[key])


def _component_defaults_and_paths(recipe: dict, manager, base: Path) -> list[str]:
    errors = missing_paths(recipe, base_schema())
    for path, obj, merged in _component_schemas(recipe, manager):
        fill_defaults(obj, merged)
        resolve_paths(obj, merged, base)
        errors.extend(missing_paths(obj, merged, path))
    return errors


def normalize_metrics(recipe: dict) -> None:
    ev = recipe.setdefault("evaluation", {})
    ev["metrics"] = [{"name": m} if isinstance(m, str) else m for m in ev.get("metrics", [])]


# -- requires_plugins -----------------------------------------------------------------------------
def check_requirements(recipe: dict) -> list[str]:
    reqs = recipe.get("requires_plugins") or []
    if not isinstance(reqs, list):
        return []
    import importlib.metadata as md

    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for i, r in enumerate(reqs):
        if not isinstance(r, str):
            continue
        try:
            req = Requirement(r)
        except InvalidRequirement as e:
            reason = str(e).strip().splitlines()[0]
            out.append(f"requires_plugins[{i}]: {r!r} is not a valid requirement ({reason})")
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(f"requires_plugins[{i}]: plugin package {req.name!r} is not installed (pip install '{r}')")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"requires_plugins[{i}]: {req.name} {have} is installed but the recipe needs {r!r}")
    return out


# -- the one entry point --------------------------------------------------------------------------
class Recipe(dict):
    """A validated recipe with defaults filled and paths absolute. ``.path`` is the source file."""

    path: str | None = None


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict | None = None, manager=None, base_dir: str | os.PathLike | None = None) -> Recipe:
    """Load (from ``path`` or ``data``), override, validate, fill defaults, resolve paths.

    Raises FtkError with every problem found. ``--set`` values that are paths resolve against the
    current folder (where the user typed them); the file's own paths against the file's folder.
    """
    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    if data is None:
        raw = load_json_file(path)
        base = Path(path).resolve().parent
    else:
        raw = copy.deepcopy(data)
        base = Path(base_dir or os.getcwd()).resolve()
    if not isinstance(raw, dict):
        raise FtkError(f"{path or 'recipe'}: the recipe must be a JSON object, got {type(raw).__name__}")
    errors = check_requirements(raw)
    if errors:
        raise FtkError(errors)
    schema = base_schema()
    # before overrides: paths written in the file are relative to the file's folder
    resolve_paths(raw, schema, base)
    for _, obj, merged in _component_schemas(raw, manager):
        resolve_paths(obj, merged, base)
    parsed = [parse_override(o) for o in overrides or []]
    for parts, value in parsed:
        apply_override(raw, parts, value)
    errors = validate_recipe(raw, manager)
    if errors:
        raise FtkError(errors)
    recipe = fill_defaults(raw, schema)
    # override values resolve against the folder the user typed them in; absolute paths stay as they are
    resolve_paths(recipe, schema, Path(os.getcwd()))
    normalize_metrics(recipe)  # first, so metrics named by a plain string get their schema defaults too
    errors = _component_defaults_and_paths(recipe, manager, Path(os.getcwd()))
    if not errors:  # what the metrics declare (keys, inputs), checked with their options complete
        from ftk.evaluate import check_metrics

        errors = check_metrics(recipe, manager)
    if errors:
        raise FtkError(errors)
    out = Recipe(recipe)
    out.path = str(Path(path).resolve()) if path else None
    return out


def composed_schema(manager=None) -> dict:
    """The base schema plus every installed component's options, for editors (``ftk schema``)."""
    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    schema = base_schema()
    props = schema["properties"]

    def variants(kind, common, key):
        comps = manager.components(kind)
        names = sorted(comps)
        branches = [
            {"if": {"properties": {key: {"const": n}}, "required": [key]},
             "then": merged_component_schema(common, comps[n].options_schema, key, n)}
            for n in names
        ]
        slot = copy.deepcopy(common)
        slot.setdefault("properties", {})[key] = {**slot.get("properties", {}).get(key, {}), "enum": names}
        if branches:  # an empty allOf is not valid JSON Schema (no callback installed, say)
            slot["allOf"] = branches
        return slot

    props["model"]["properties"]["quantization"] = variants(
        "quantizer", props["model"]["properties"]["quantization"], "method")
    props["adapter"] = variants("adapter", props["adapter"], "method")
    props["trainer"] = variants("trainer", props["trainer"], "method")
    items = props["data"]["properties"]["datasets"]["items"]
    props["data"]["properties"]["datasets"]["items"] = variants("dataset", items, "loader")
    metric_obj = variants("metric", {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}, "name")
    props["callbacks"]["items"] = variants("callback", props["callbacks"]["items"], "name")
    props["evaluation"]["properties"]["metrics"]["items"] = {
        "anyOf": [{"enum": sorted(manager.components("metric"))}, metric_obj]}
    return schema

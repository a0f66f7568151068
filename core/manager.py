"""Plugin manager: loads entry points in group ``ftk`` one at a time, keeps a record per plugin,
and builds the component registry. Built-ins load through exactly the same path as third-party
plugins. Build a fresh manager with :func:`get_manager` (no module globals beyond a cache the CLI
and tests can bypass).

Environment switches:
  FTK_LOAD_PLUGINS   comma-separated entry-point names to load (all others are not loaded)
  FTK_BLOCK_PLUGINS  comma-separated entry-point names not to load
  FTK_TRACE_PLUGINS  set to 1 to print every hook call and its result to stderr
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from ftk import hookspecs
from ftk.components import KINDS
from ftk.errors import PluginError

GROUP = "ftk"
_REGISTER_HOOKS = {
    "dataset": "ftk_register_datasets",
    "quantizer": "ftk_register_quantizers",
    "adapter": "ftk_register_adapters",
    "metric": "ftk_register_metrics",
}


@dataclass
class Component:
    kind: str
    name: str
    factory: Callable
    description: str
    options_schema: dict
    plugin: str  # plugin (entry point / registration) name
    package: str  # distribution that ships it
    version: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass
class PluginRecord:
    name: str
    package: str
    version: str
    status: str = "ok"  # "ok" | "error"
    error: str | None = None
    provides: list[str] = field(default_factory=list)
    module: str = ""

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "provides": list(self.provides),
            "module": self.module,
        }


class FtkPluginManager:
    def __init__(self, load_entrypoints: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._components: dict[str, dict[str, Component]] | None = None
        self._duplicates: dict[str, list[Component]] = {}
        if os.environ.get("FTK_TRACE_PLUGINS"):
            self._enable_trace()
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading -------------------------------------------------------------------------------
    def load_entrypoints(self) -> None:
        only = _env_set("FTK_LOAD_PLUGINS")
        blocked = _env_set("FTK_BLOCK_PLUGINS")
        seen: set[str] = set()
        for dist in md.distributions():
            try:
                eps = [ep for ep in dist.entry_points if ep.group == GROUP]
            except Exception:  # a broken distribution's metadata must not take the CLI down
                continue
            pkg = dist.metadata["Name"] or "?"
            for ep in eps:
                if (pkg, ep.name) in seen:  # the same distribution visible twice on sys.path
                    continue
                seen.add((pkg, ep.name))
                if only is not None and ep.name not in only:
                    continue
                if ep.name in blocked:
                    continue
                self._load_one(ep, pkg, dist.version or "?")

    def _load_one(self, ep, package: str, version: str) -> None:
        rec = PluginRecord(name=ep.name, package=package, version=version, module=ep.value)
        if ep.name in self.records:
            other = self.records[ep.name]
            rec.status, rec.error = "error", (
                f"plugin name {ep.name!r} is already used by package {other.package!r}"
            )
            self.records[f"{ep.name} ({package})"] = rec
            return
        self.records[ep.name] = rec
        try:
            obj = ep.load()
        except BaseException as e:  # noqa: BLE001 - any import failure is recorded, not raised
            if isinstance(e, KeyboardInterrupt):
                raise
            rec.status, rec.error = "error", f"import failed: {type(e).__name__}: {e}"
            return
        self._register_obj(obj, rec)

    def register(self, obj: Any, name: str, package: str = "(local)", version: str = "") -> PluginRecord:
        """Register an in-process plugin object or module (tests, notebooks)."""
        rec = PluginRecord(name=name, package=package, version=version, module=getattr(obj, "__name__", repr(obj)))
        self.records[name] = rec
        self._register_obj(obj, rec)
        return rec

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._components = None

    def _register_obj(self, obj: Any, rec: PluginRecord) -> None:
        try:
            self.pm.register(obj, name=rec.name)
            self.pm.check_pending()
        except Exception as e:  # wrong hook arguments, unknown hook names
            if self.pm.has_plugin(rec.name):
                self.pm.unregister(name=rec.name)
            rec.status, rec.error = "error", f"invalid hooks: {e}"
        self._components = None

    # -- registry ------------------------------------------------------------------------------
    def _build(self) -> None:
        comps: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        dups: dict[str, list[Component]] = {}
        for rec in self.records.values():
            if rec.status == "ok":
                rec.provides = []
        for kind, hookname in _REGISTER_HOOKS.items():
            hook = getattr(self.pm.hook, hookname)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                rec = self.records.get(impl.plugin_name)
                if rec is None or rec.status != "ok":
                    continue
                pending: list[Component] = []

                def register(name, factory, description="", options_schema=None, *, _rec=rec, _kind=kind, _p=pending):
                    if not isinstance(name, str) or not name:
                        raise TypeError("register(): name must be a non-empty string")
                    if not callable(factory):
                        raise TypeError(f"register({name!r}): factory must be callable")
                    _p.append(Component(kind=_kind, name=name, factory=factory,
                                        description=(description or "").strip().splitlines()[0] if description else "",
                                        options_schema=options_schema or {"type": "object"},
                                        plugin=_rec.name, package=_rec.package, version=_rec.version))

                try:
                    self._trace(hookname, rec.name)
                    impl.function(register)
                except Exception as e:  # a plugin's hook that raises is recorded, others go on
                    rec.status, rec.error = "error", f"{hookname} raised {type(e).__name__}: {e}"
                    rec.provides = []
                    continue
                for c in pending:
                    if c.name in comps[kind]:
                        dups.setdefault(c.key, [comps[kind][c.name]]).append(c)
                        rec.provides.append(c.key)
                        continue
                    comps[kind][c.name] = c
                    rec.provides.append(c.key)
        # a plugin that errored after registering some components provides nothing
        for kind in KINDS:
            for n, c in list(comps[kind].items()):
                if self.records[c.plugin].status != "ok":
                    del comps[kind][n]
        self._components, self._duplicates = comps, dups

    def components(self, kind: str) -> dict[str, Component]:
        if self._components is None:
            self._build()
        return self._components[kind]

    def duplicates(self) -> dict[str, list[Component]]:
        if self._components is None:
            self._build()
        return self._duplicates

    def get(self, kind: str, name: str) -> Component:
        """The component a recipe chose, or a PluginError naming what went wrong."""
        comps = self.components(kind)
        dup = self._duplicates.get(f"{kind}:{name}")
        if dup:
            who = " and ".join(f"plugin {c.plugin!r} (package {c.package})" for c in dup)
            raise PluginError(f"{kind} {name!r} is registered by more than one plugin: {who}; "
                              f"block one with FTK_BLOCK_PLUGINS")
        if name in comps:
            return comps[name]
        broken = [r for r in self.records.values() if r.status == "error"]
        msg = f"unknown {kind} {name!r}; available: {', '.join(sorted(comps)) or '(none)'}"
        close = difflib.get_close_matches(name, list(comps), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        if broken:
            msg += "; broken plugins that may provide it: " + ", ".join(
                f"{r.name} (package {r.package}): {r.error}" for r in broken)
        msg += "; see `ftk plugins list`"
        raise PluginError(msg)

    def plugin_list(self) -> list[PluginRecord]:
        if self._components is None:
            self._build()
        return sorted(self.records.values(), key=lambda r: (r.package != "ftk", r.name))

    # -- other hooks ---------------------------------------------------------------------------
    def adapter_targets(self, model_type: str, preset: str) -> list[str] | None:
        self._trace("ftk_adapter_targets", f"{model_type}, {preset}")
        return self.pm.hook.ftk_adapter_targets(model_type=model_type, preset=preset)

    def trainer_callbacks(self, recipe: dict, output_dir: str) -> list:
        out = []
        for res in self.pm.hook.ftk_trainer_callbacks(recipe=recipe, output_dir=output_dir):
            if res:
                out.extend(res)
        return out

    def add_commands(self, cli) -> None:
        for impl in self.pm.hook.ftk_register_commands.get_hookimpls():
            rec = self.records.get(impl.plugin_name)
            if rec is None or rec.status != "ok":
                continue
            try:
                impl.function(cli=cli)
            except Exception as e:
                rec.status, rec.error = "error", f"ftk_register_commands raised {type(e).__name__}: {e}"

    # -- tracing -------------------------------------------------------------------------------
    def _enable_trace(self) -> None:
        self._tracing = True

        def before(hook_name, hook_impls, kwargs):
            print(f"[ftk trace] {hook_name}({', '.join(kwargs)}) -> "
                  f"{[i.plugin_name for i in hook_impls]}", file=sys.stderr)

        def after(outcome, hook_name, hook_impls, kwargs):
            try:
                res = outcome.get_result()
            except BaseException as e:  # noqa: BLE001
                res = f"raised {e!r}"
            print(f"[ftk trace] {hook_name} returned {res!r}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    def _trace(self, hook: str, who: str) -> None:
        if getattr(self, "_tracing", False):
            print(f"[ftk trace] {hook} <- {who}", file=sys.stderr)


def _env_set(var: str) -> set[str] | None:
    val = os.environ.get(var)
    if val is None:
        return None if var == "FTK_LOAD_PLUGINS" else set()
    return {v.strip() for v in val.split(",") if v.strip()}


_cached: FtkPluginManager | None = None


def get_manager(fresh: bool = False) -> FtkPluginManager:
    """The process's plugin manager (built once). ``fresh=True`` builds a new one (tests)."""
    global _cached
    if fresh or _cached is None:
        _cached = FtkPluginManager()
    return _cached

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

import contextlib
import difflib
import functools
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
from ftk.errors import FtkError, PluginError, PluginFailure

GROUP = "ftk"
LOCAL = "local"  # the package of components registered in-process (register_component)
_REGISTER_HOOKS = {kind: f"ftk_register_{kind}s" for kind in KINDS}  # the kinds are listed once


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
    info: Any = None  # what the component declares up front (a metric: ftk.components.MetricInfo)
    # why it cannot be used here (e.g. "needs trl: pip install 'ftk[preference]'"): it is listed, and a
    # recipe naming it fails with this reason; None when usable
    unavailable: str | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def qualified(self) -> str:
        """``DISTRIBUTION/NAME``: the name that always picks this component, whatever else is installed."""
        return f"{self.package}/{self.name}"


@dataclass
class PluginRecord:
    name: str
    package: str
    version: str
    status: str = "ok"  # "ok" | "error"
    error: str | None = None
    provides: list[str] = field(default_factory=list)
    module: str = ""
    hooks: list[str] = field(default_factory=list)  # hook names the plugin implements (even when broken)
    # why its components cannot be used in this environment (what they registered as ``unavailable``)
    unavailable: str | None = None

    @property
    def shown_status(self) -> str:
        """What ``ftk plugins list`` says: "unavailable" for a working plugin whose components all are."""
        return "unavailable" if self.status == "ok" and self.unavailable else self.status

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "status": self.shown_status,
            "error": self.error if self.status != "ok" else self.unavailable,
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
        self._all: dict[str, dict[str, Component]] = {}  # kind -> qualified name -> component
        self._noted: set[str] = set()  # ambiguous bare names already explained on stderr
        if os.environ.get("FTK_TRACE_PLUGINS"):
            self._enable_trace()
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading -------------------------------------------------------------------------------
    def load_entrypoints(self) -> None:
        only = _env_set("FTK_LOAD_PLUGINS")
        blocked = _env_set("FTK_BLOCK_PLUGINS")
        seen: set[str] = set()
        # ftk's own distribution first, so that its entry points keep their bare record names whatever the
        # install order; a third party's entry point of the same name is kept as ``DISTRIBUTION/NAME``
        for dist in sorted(md.distributions(), key=lambda d: _dist_name(d) != GROUP):
            try:
                eps = [ep for ep in dist.entry_points if ep.group == GROUP]
            except Exception:  # a broken distribution's metadata must not take the CLI down
                continue
            pkg = _dist_name(dist)
            for ep in eps:
                if (pkg, ep.name) in seen:  # the same distribution visible twice on sys.path
                    continue
                seen.add((pkg, ep.name))
                names = {ep.name, f"{pkg}/{ep.name}"}
                if only is not None and not names & only:
                    continue
                if names & blocked:
                    continue
                self._load_one(ep, pkg, dist.version or "?")

    def _load_one(self, ep, package: str, version: str) -> None:
        # an entry-point name another distribution already took: both load, this one keyed by its
        # qualified name so that neither replaces the other
        name = ep.name if ep.name not in self.records else f"{package}/{ep.name}"
        rec = PluginRecord(name=name, package=package, version=version, module=ep.value)
        self.records[name] = rec
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

    def register_component(self, kind: str, name: str, factory: Callable, description: str = "",
                           options_schema: dict | None = None, *, info: Any = None) -> Component:
        """Register one component in-process (a notebook, a script): no entry point, no package. It is
        checked as an installed plugin's ``register(...)`` call is (options schema, declarations) and its
        code is attributed to plugin ``local:KIND:NAME`` of package ``local``; registering the same kind
        and name again replaces it. Raises PluginError when it is refused."""
        if kind not in _REGISTER_HOOKS:
            raise PluginError(f"register: unknown component kind {kind!r}; one of {', '.join(KINDS)}")
        hookname = _REGISTER_HOOKS[kind]

        class _Local:  # one hookimpl, named like the kind's registration hook
            pass

        def hook(register):
            register(name, factory, description, options_schema, info=info)

        setattr(_Local, hookname, staticmethod(hookspecs.hookimpl(hook)))
        plugin = f"local:{kind}:{name}"
        self.unregister(plugin)
        rec = self.register(_Local(), plugin, package=LOCAL)
        self.components(kind)  # build now, so a refusal is raised here and not at first use
        if rec.status != "ok":
            self.unregister(plugin)
            raise PluginError(f"register {kind} {name!r}: {rec.error}")
        return self._all[kind][f"{LOCAL}/{name}"]

    def unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._components = None

    def _register_obj(self, obj: Any, rec: PluginRecord) -> None:
        rec.hooks = [n for n in dir(obj) if n.startswith("ftk_") and self.pm.parse_hookimpl_opts(obj, n) is not None]
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
        comps: dict[str, dict[str, Component]] = {k: {} for k in KINDS}  # kind -> qualified name -> component
        dups: dict[str, list[Component]] = {}
        for rec in self.records.values():
            if rec.status == "ok":
                rec.provides, rec.unavailable = [], None
        for kind, hookname in _REGISTER_HOOKS.items():
            hook = getattr(self.pm.hook, hookname)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                rec = self.records.get(impl.plugin_name)
                if rec is None or rec.status != "ok":
                    continue
                pending: list[Component] = []

                def register(name, factory, description="", options_schema=None, *, info=None, unavailable=None,
                             _rec=rec, _kind=kind, _p=pending):
                    if not isinstance(name, str) or not name:
                        raise TypeError("register(): name must be a non-empty string")
                    if not callable(factory):
                        raise TypeError(f"register({name!r}): factory must be callable")
                    if not (unavailable is None or (isinstance(unavailable, str) and unavailable.strip())):
                        raise TypeError(f"register({name!r}): unavailable must be None or a non-empty string "
                                        f"saying why (e.g. \"needs trl: pip install 'ftk[preference]'\")")
                    _check_options_schema(f"{_kind} {name!r}", options_schema)
                    _check_info(_kind, name, info)
                    _p.append(Component(kind=_kind, name=name, factory=factory,
                                        description=(description or "").strip().splitlines()[0] if description else "",
                                        options_schema=options_schema or {"type": "object"},
                                        plugin=_rec.name, package=_rec.package, version=_rec.version, info=info,
                                        unavailable=_one_line(unavailable) if unavailable else None))

                try:
                    self._trace(hookname, rec.name)
                    impl.function(register)
                except _BadSchema as e:
                    rec.status, rec.error = "error", f"{hookname}: {e}"
                    rec.provides = []
                    continue
                except Exception as e:  # a plugin's hook that raises is recorded, others go on
                    rec.status, rec.error = "error", f"{hookname} raised {type(e).__name__}: {e}"
                    rec.provides = []
                    continue
                for c in pending:
                    if c.qualified in comps[kind]:  # one distribution registering a name twice
                        dups.setdefault(f"{kind}:{c.qualified}", [comps[kind][c.qualified]]).append(c)
                    else:
                        comps[kind][c.qualified] = c
        # a plugin that errored after registering some components provides nothing
        for kind in KINDS:
            for n, c in list(comps[kind].items()):
                if self.records[c.plugin].status != "ok":
                    del comps[kind][n]
        self._all, self._duplicates = comps, dups
        self._components = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for q, c in comps[kind].items():
                bare = self._by_bare_name(kind, c.name)
                ok = bare is c  # the bare name picks this one
                self._components[kind][c.name if ok else q] = c
                if self.records[c.plugin].status == "ok":
                    self.records[c.plugin].provides.append(c.key if ok else f"{kind}:{q}")
        for key, same in dups.items():  # the later registrations of a doubly registered name
            for c in same[1:]:
                if self.records[c.plugin].status == "ok":
                    self.records[c.plugin].provides.append(key)
        for rec in self.records.values():  # a plugin is unavailable when everything it provides is
            mine = [c for kind in KINDS for c in comps[kind].values() if c.plugin == rec.name]
            if rec.status == "ok" and mine and all(c.unavailable for c in mine):
                rec.unavailable = "; ".join(dict.fromkeys(c.unavailable for c in mine))

    def _by_bare_name(self, kind: str, name: str) -> Component | None:
        """What a bare name resolves to: the one component of that name, or the built-in (distribution
        ``ftk``) among several; None when it is unknown or ambiguous between third parties."""
        same = [c for c in self._all[kind].values() if c.name == name]
        if len(same) > 1:
            same = [c for c in same if c.package == GROUP]
        return same[0] if len(same) == 1 else None

    def components(self, kind: str) -> dict[str, Component]:
        """The names a recipe can use for ``kind``: the bare name of each component a bare name picks, the
        qualified ``DISTRIBUTION/NAME`` of the others (shadowed by a built-in, or ambiguous)."""
        if self._components is None:
            self._build()
        return self._components[kind]

    def all_components(self, kind: str) -> dict[str, Component]:
        """Every working component of ``kind``, keyed by its qualified name ``DISTRIBUTION/NAME``."""
        if self._components is None:
            self._build()
        return self._all[kind]

    def ambiguous(self) -> dict[str, list[Component]]:
        """``kind:name`` -> the components of different distributions sharing that bare name."""
        out: dict[str, list[Component]] = {}
        for kind in KINDS:
            for c in self.all_components(kind).values():
                out.setdefault(c.key, []).append(c)
        return {k: sorted(v, key=lambda c: (c.package != GROUP, c.qualified)) for k, v in out.items() if len(v) > 1}

    def duplicates(self) -> dict[str, list[Component]]:
        if self._components is None:
            self._build()
        return self._duplicates

    def get(self, kind: str, name: str) -> Component:
        """The component a recipe chose, or a PluginError naming what went wrong."""
        comps = self.components(kind)
        everything = self._all[kind]
        qualified = name if "/" in name else None
        if qualified is None:
            same = [c for c in everything.values() if c.name == name]
            picked = self._by_bare_name(kind, name)
            if picked is None and same:
                raise PluginError(f"{kind} {name!r} is provided by several plugin packages; name one: "
                                  + ", ".join(repr(c.qualified) for c in same))
            if picked is not None:
                qualified = picked.qualified
                others = [c.qualified for c in same if c is not picked]
                if others and f"{kind}:{name}" not in self._noted:
                    self._noted.add(f"{kind}:{name}")
                    print(f"note: {kind} {name!r} is the built-in one (package ftk); also installed: "
                          f"{', '.join(repr(o) for o in others)} (write that name to use it)", file=sys.stderr)
        dup = self._duplicates.get(f"{kind}:{qualified}")
        if dup:
            who = " and ".join(f"plugin {c.plugin!r} (package {_pkg(c)})" for c in dup)
            raise PluginError(f"{kind} {name!r} is registered by more than one plugin: {who}; "
                              f"block one with FTK_BLOCK_PLUGINS")
        if qualified in everything:
            comp = everything[qualified]
            if comp.unavailable:
                raise PluginError(f"{kind} {name!r} {comp.unavailable}")
            return comp
        broken = [r for r in self.records.values() if r.status == "error"]
        msg = f"unknown {kind} {name!r}; available: {', '.join(sorted(comps)) or '(none)'}"
        close = difflib.get_close_matches(name, list(comps), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        if broken:
            msg += "; broken plugins that may provide it: " + ", ".join(
                f"{r.name} (package {_pkg(r)}): {r.error}" for r in broken)
        msg += "; see `ftk plugins list`"
        raise PluginError(msg)

    def plugin_list(self) -> list[PluginRecord]:
        if self._components is None:
            self._build()
        return sorted(self.records.values(), key=lambda r: (r.package != "ftk", r.name))

    # -- calling plugin code -------------------------------------------------------------------
    def _record(self, plugin_name: str) -> PluginRecord:
        return self.records.get(plugin_name) or PluginRecord(name=plugin_name, package="?", version="?")

    @contextlib.contextmanager
    def calling(self, who: Component | PluginRecord, phase: str, what: str | None = None,
                passthrough: tuple = ()):
        """Run plugin code: any exception it raises becomes one :class:`PluginFailure` naming the plugin,
        its package and version, the component (``what``, by default ``who``'s key) and ``phase``
        ("loading data", "computing", ...). ``FtkError`` raised on purpose (bad data, a stopped run),
        ``KeyboardInterrupt`` and the ``passthrough`` exception types go through unchanged."""
        try:
            yield
        except FtkError:
            raise
        except Exception as e:
            if passthrough and isinstance(e, passthrough):
                raise
            raise _failure(who, phase, what, e) from e

    def wrap(self, who: Component | PluginRecord, phase: str, fn: Callable, what: str | None = None,
             passthrough: tuple = ()) -> Callable:
        """``fn`` called inside :meth:`calling`."""

        @functools.wraps(fn)
        def attributed(*args, **kwargs):
            with self.calling(who, phase, what, passthrough):
                return fn(*args, **kwargs)

        return attributed

    def wrap_fields(self, who: Component | PluginRecord, obj: Any, phases: dict[str, str]) -> None:
        """Each callable ``obj.<field>`` named in ``phases`` replaced by :meth:`wrap` of it with that phase:
        the plugin code a returned plan holds names its plugin when it raises later."""
        for name, phase in phases.items():
            fn = getattr(obj, name, None)
            if fn is not None:
                setattr(obj, name, self.wrap(who, phase, fn))

    def iterate(self, who: Component | PluginRecord, phase: str, iterable):
        """Iterate over what plugin code yields (a loader's lazy examples) with :meth:`calling`'s
        attribution for exceptions raised while producing the items."""
        with self.calling(who, phase):
            yield from iterable

    def _hookimpls(self, hookname: str, warn_broken: str | None = None):
        """(record, impl) of every working plugin implementing ``hookname``, in pluggy's call order (last
        registered first). ``warn_broken``: say on stderr which broken plugins implement it (and so are
        left out), so that a run never silently goes without them."""
        if warn_broken:
            for r in self.records.values():
                if r.status != "ok" and hookname in r.hooks:
                    print(f"warning: plugin {r.name!r} ({_pkg(r)}) is broken, {warn_broken}: {r.error}",
                          file=sys.stderr)
        for impl in reversed(getattr(self.pm.hook, hookname).get_hookimpls()):
            rec = self._record(impl.plugin_name)
            if rec.status == "ok":
                yield rec, impl

    # -- other hooks ---------------------------------------------------------------------------
    def adapter_targets(self, model_type: str, preset: str) -> list[str] | None:
        """The first non-None answer of ``ftk_adapter_targets``; each plugin called on its own, so one
        that raises is named (and broken plugins are not asked)."""
        self._trace("ftk_adapter_targets", f"{model_type}, {preset}")
        kwargs = {"model_type": model_type, "preset": preset}
        for rec, impl in self._hookimpls("ftk_adapter_targets"):
            with self.calling(rec, "answering ftk_adapter_targets"):
                res = impl.function(*[kwargs[a] for a in impl.argnames])
            if res is not None:
                return res
        return None

    def trainer_callbacks(self, recipe: dict, output_dir: str) -> list:
        """The callbacks of every ``ftk_trainer_callbacks`` plugin, each plugin called on its own. A hook
        or a callback method that raises stops the run with a :class:`PluginFailure` naming its plugin;
        a broken plugin's callbacks are left out with a warning."""
        kwargs = {"recipe": recipe, "output_dir": output_dir}
        out = []
        for rec, impl in self._hookimpls("ftk_trainer_callbacks", "its trainer callbacks are not attached"):
            self._trace("ftk_trainer_callbacks", rec.name)
            out += self._built_callbacks(rec, lambda: impl.function(*[kwargs[a] for a in impl.argnames]))
        return out + self.recipe_callbacks(recipe, output_dir)

    def recipe_callbacks(self, recipe: dict, output_dir: str) -> list:
        """The callbacks of the ``callback`` components the recipe's ``callbacks`` section switches on (an
        entry with ``"enabled": false`` is left out); only those are built. The factory and every ``on_*``
        method run with the component's failure attribution."""
        from ftk.components import TrainerContext

        out = []
        for entry in recipe.get("callbacks") or []:
            if not isinstance(entry, dict) or entry.get("enabled", True) is False:
                continue
            comp = self.get("callback", entry["name"])
            options = {k: v for k, v in entry.items() if k not in ("name", "enabled")}
            self._trace("callback factory", comp.qualified)
            out += self._built_callbacks(
                comp, lambda: comp.factory(options, TrainerContext(recipe=recipe, output_dir=output_dir)))
        return out

    def _built_callbacks(self, who: PluginRecord | Component, make: Callable[[], Any]) -> list:
        """``make()``'s callbacks (a class is instantiated), built and later run with ``who``'s attribution."""
        with self.calling(who, "creating trainer callbacks"):
            cbs = [cb() if isinstance(cb, type) else cb for cb in (make() or [])]
        return [self._attributed_callback(who, cb) for cb in cbs]

    def _attributed_callback(self, rec: PluginRecord | Component, cb):
        """The same callback object, its ``on_*`` methods wrapped so that an exception names the plugin."""
        for event in [n for n in dir(type(cb)) if n.startswith("on_")]:
            fn = getattr(cb, event, None)
            if callable(fn):
                try:
                    setattr(cb, event, self.wrap(rec, f"handling {event}", fn, f"callback {type(cb).__name__}"))
                except (AttributeError, TypeError):  # __slots__ or a read-only object: left as it is
                    pass
        return cb

    def add_commands(self, cli) -> None:
        import click

        keep = (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit)
        for impl in self.pm.hook.ftk_register_commands.get_hookimpls():
            rec = self.records.get(impl.plugin_name)
            if rec is None or rec.status != "ok":
                continue
            before = dict(cli.commands)
            try:
                impl.function(cli=cli)
            except Exception as e:
                rec.status, rec.error = "error", f"ftk_register_commands raised {type(e).__name__}: {e}"
                continue
            for name, cmd in cli.commands.items():
                if before.get(name) is not cmd:
                    _wrap_command(cmd, lambda c, n: self.wrap(rec, "running it", c, f"command {n!r}", keep))

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


class _BadSchema(Exception):
    """A registered options_schema that is not a valid JSON Schema."""


def _check_options_schema(what: str, schema) -> None:
    """Options schemas are JSON Schema draft 2020-12 (as ``ftk.recipe`` validates with): a bad one is
    refused when registered, not when a recipe first uses it."""
    if schema is None:
        return
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "/".join(str(p) for p in e.path)
        raise _BadSchema(f"{what}: options_schema is not a valid JSON Schema (draft 2020-12): {_one_line(e.message)}"
                         + (f" at {at}" if at else "")) from None


def _check_info(kind: str, name: str, info) -> None:
    """``register(..., info=...)``: a metric may declare a ``ftk.components.MetricInfo``, an adapter an
    ``AdapterInfo``; no other kind declares anything yet. A wrong one marks the plugin as error when registered."""
    from ftk.components import MetricInfo

    if info is None:
        return
    if kind == "adapter":
        from ftk.components import AdapterInfo

        if not isinstance(info, AdapterInfo) or not (info.trainable_parameters is None
                                                     or callable(info.trainable_parameters)):
            raise TypeError(f"register({name!r}): an adapter's info must be a ftk.components.AdapterInfo "
                            f"(trainable_parameters: a callable)")
        return
    if kind != "metric":
        raise TypeError(f"register({name!r}): info= is only for metrics and adapters (a {kind} declares nothing)")
    if not isinstance(info, MetricInfo):
        raise TypeError(f"register({name!r}): info must be a ftk.components.MetricInfo, got {type(info).__name__}")
    hib = info.higher_is_better
    if not (hib is None or isinstance(hib, bool) or callable(hib)
            or (isinstance(hib, dict) and all(isinstance(v, bool) for v in hib.values()))):
        raise TypeError(f"register({name!r}): MetricInfo.higher_is_better must be a bool, {{key: bool}} or "
                        f"fn(options)")
    if not (info.keys is None or callable(info.keys)):
        info.keys_for({})  # a fixed list is checked now; a callable when a recipe gives its options


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pkg(rec) -> str:
    return f"{rec.package} {rec.version}".strip()


def _failure(who, phase: str, what: str | None, e: BaseException) -> PluginFailure:
    plugin = getattr(who, "plugin", None) or who.name  # a Component, or a PluginRecord
    if what is None and isinstance(who, Component):
        what = f"{who.kind} {who.name!r}"
    detail = f"{type(e).__name__}: {_one_line(e)}" if str(e) else type(e).__name__
    msg = f"plugin {plugin!r} ({_pkg(who)}){', ' + what if what else ''}, while {phase}: {detail}"
    return PluginFailure(msg, plugin=plugin, package=who.package, version=who.version, component=what or "",
                         phase=phase)


def _wrap_command(cmd, wrap: Callable) -> None:
    """Wrap the callbacks of a plugin's click command (and of a group's subcommands)."""
    if cmd.callback is not None:
        cmd.callback = wrap(cmd.callback, cmd.name)
    for sub in (getattr(cmd, "commands", None) or {}).values():
        _wrap_command(sub, wrap)


def _dist_name(dist) -> str:
    try:
        return dist.metadata["Name"] or "?"
    except Exception:  # a broken distribution's metadata must not take the CLI down
        return "?"


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


def register(kind: str, name: str, factory: Callable, description: str = "", options_schema: dict | None = None,
             *, info: Any = None, manager: FtkPluginManager | None = None):
    """``ftk.register``: add a loader, metric, quantizer, adapter, trainer or callback to this process's
    plugin manager (or ``manager``) without packaging it; see
    :meth:`FtkPluginManager.register_component`. Recipes name it as ``name`` (or ``local/name``)."""
    return (manager or get_manager()).register_component(kind, name, factory, description, options_schema, info=info)

"""Faulty plugins: whatever phase plugin code raises in, `ftk` ends with one line naming the plugin, its
package and version, the component, the phase and the exception (exit 1, never `internal error`); an
FtkError a plugin raises on purpose keeps its own message; a broken plugin does not affect a run that
does not use it; options schemas are checked as JSON Schema when registered."""
from __future__ import annotations

import json

import pytest

from ftk.components import Example, LoadedData, QuantizationPlan, Segment, TrainerPlan
from ftk.errors import DataError, PluginFailure
from ftk.hookspecs import hookimpl
from ftk.testing import tiny_model, tiny_recipe  # noqa: F401

PKG = "ftk-faulty 0.3.1"


def _fault(values):
    return {"type": "object", "properties": {"fault": {"enum": ["none", *values], "default": "none"}}}


def _examples(n):
    return [Example(segments=[Segment(f"Repeat {i}: ", train=False), Segment(str(i), train=True)],
                    prompt=f"Repeat {i}: ", reference=str(i)) for i in range(n)]


def load_faulty(options, ctx):
    fault = options["fault"]
    if fault == "factory":
        return {}["name"]  # KeyError: 'name'
    if fault == "data_error":
        raise DataError("faulty.json record 3: missing field 'text'")

    def lazy():
        for i, ex in enumerate(_examples(12)):
            if i == 5 and fault == "iterate":
                raise ValueError("record 5 is odd")
            yield ex

    return LoadedData(train=lazy(), fingerprint="faulty", reusable=False)


def plan_faulty(options, ctx):
    import torch

    if options["fault"] == "factory":
        raise AttributeError("'NoneType' object has no attribute 'bits'")

    def after_load(model):
        raise RuntimeError("cannot fix layer 0")

    return QuantizationPlan(from_pretrained_kwargs={"dtype": torch.float32},
                            after_load=after_load if options["fault"] == "after_load" else None)


def attach_faulty(model, options, ctx):
    raise IndexError("list index out of range")


class FaultyMetric:
    requires = "text"

    def __init__(self, options):
        if options["fault"] == "factory":
            raise OSError("vocabulary file not found")
        self.fault, self.scale = options["fault"], options["scale"]

    def compute(self, predictions, references):
        return {"faulty_score": 1 / 0 if self.fault == "compute" else self.scale}


class Faulty:
    @hookimpl
    def ftk_register_datasets(self, register):
        register("faulty", load_faulty, options_schema=_fault(["factory", "iterate", "data_error"]))

    @hookimpl
    def ftk_register_quantizers(self, register):
        register("faulty_quant", plan_faulty, options_schema=_fault(["factory", "after_load"]))

    @hookimpl
    def ftk_register_adapters(self, register):
        register("faulty_adapter", attach_faulty, options_schema={"type": "object", "additionalProperties": True})

    @hookimpl
    def ftk_register_metrics(self, register):
        schema = _fault(["factory", "compute"])
        schema["properties"]["scale"] = {"type": "number", "default": 1.0}
        register("faulty_metric", FaultyMetric, options_schema=schema)

    @hookimpl
    def ftk_register_trainers(self, register):
        register("faulty_trainer", plan_faulty_trainer, options_schema=_fault(["factory", "loss"]))


def plan_faulty_trainer(options, ctx):
    if options["fault"] == "factory":
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    def compute_loss(trainer, model, inputs, *args, **kwargs):
        raise ValueError("logits and labels differ in length")

    return TrainerPlan(compute_loss=compute_loss)


class RaisingCallbacks:
    def __init__(self, where):
        self.where = where

    @hookimpl
    def ftk_trainer_callbacks(self, recipe, output_dir):
        from transformers import TrainerCallback

        if self.where == "hook":
            raise RuntimeError("tracker login failed")

        class Tracker(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                raise ZeroDivisionError("division by zero")

        return [Tracker()]


class WrongArgCallbacks:
    @hookimpl
    def ftk_trainer_callbacks(self, recipe, outdir):  # misnamed argument: pluggy refuses the plugin
        return []


@pytest.fixture
def cli_run(tiny_model, tmp_path, monkeypatch, capsys):
    """cli_run(manager, datasets=..., metrics=..., **sections) -> (exit code, stderr) of `ftk run`."""
    import ftk.manager

    def _run(mgr, datasets=None, metrics=None, **sections):
        monkeypatch.setattr(ftk.manager, "_cached", mgr)
        model = sections.pop("model", {})  # tiny_recipe's first argument is also called model
        recipe = tiny_recipe(tiny_model, datasets or [{"loader": "faulty"}], metrics, output_dir=tmp_path / "run",
                             **sections)
        recipe["model"].update(model)
        path = tmp_path / "recipe.json"
        path.write_text(json.dumps(recipe))
        from ftk.cli import main

        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["run", str(path), "--overwrite"])
        return e.value.code, capsys.readouterr().err

    return _run


@pytest.fixture
def mgr(fresh_manager):
    fresh_manager.register(Faulty(), name="faulty", package="ftk-faulty", version="0.3.1")
    return fresh_manager


def _error_line(err):
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


CASES = {
    "dataset factory": (dict(datasets=[{"loader": "faulty", "fault": "factory"}]),
                        "dataset 'faulty', while loading data: KeyError: 'name'"),
    "dataset iteration": (dict(datasets=[{"loader": "faulty", "fault": "iterate"}]),
                          "dataset 'faulty', while reading examples: ValueError: record 5 is odd"),
    "dataset iteration, streaming": (dict(datasets=[{"loader": "faulty", "fault": "iterate"}],
                                          data={"streaming": True, "validation_size": 2}),
                                     "dataset 'faulty', while reading examples: ValueError: record 5 is odd"),
    "quantizer factory": (dict(model={"quantization": {"method": "faulty_quant", "fault": "factory"}}),
                          "quantizer 'faulty_quant', while planning quantization: AttributeError: "
                          "'NoneType' object has no attribute 'bits'"),
    "quantizer after_load": (dict(model={"quantization": {"method": "faulty_quant", "fault": "after_load"}}),
                             "quantizer 'faulty_quant', while preparing the loaded model: RuntimeError: "
                             "cannot fix layer 0"),
    "adapter factory": (dict(adapter={"method": "faulty_adapter"}),
                        "adapter 'faulty_adapter', while attaching the adapter: IndexError: list index out of range"),
    "metric factory": (dict(metrics=[{"name": "faulty_metric", "fault": "factory"}]),
                       "metric 'faulty_metric', while building the metric: OSError: vocabulary file not found"),
    "trainer factory": (dict(trainer={"method": "faulty_trainer", "fault": "factory"}),
                        "trainer 'faulty_trainer', while planning training: TypeError: unsupported operand "
                        "type(s) for +: 'int' and 'str'"),
    "trainer loss": (dict(trainer={"method": "faulty_trainer", "fault": "loss"}),
                     "trainer 'faulty_trainer', while computing the loss: ValueError: logits and labels differ "
                     "in length"),
    "metric compute": (dict(metrics=[{"name": "faulty_metric", "fault": "compute"}]),
                       "metric 'faulty_metric', while computing: ZeroDivisionError: division by zero"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_is_one_attributed_line(mgr, cli_run, tmp_path, case):
    sections, what = CASES[case]
    code, err = cli_run(mgr, **sections)
    assert code == 1, err
    assert _error_line(err) == (f"error: plugin 'faulty' ({PKG}), {what} (set FTK_DEBUG=1 for the traceback)")
    if "streaming" in case:  # the stream is read while training: the run's folder says why it stopped
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and manifest["error"].startswith("plugin 'faulty'")


def test_fault_traceback_with_ftk_debug(mgr, cli_run, monkeypatch):
    monkeypatch.setenv("FTK_DEBUG", "1")
    code, err = cli_run(mgr, datasets=[{"loader": "faulty", "fault": "factory"}])
    assert code == 1
    assert "Traceback" in err and "load_faulty" in err and "internal error" not in err
    assert err.rstrip().splitlines()[-1] == (f"error: plugin 'faulty' ({PKG}), dataset 'faulty', while loading "
                                             f"data: KeyError: 'name'")


def test_ftk_error_from_a_plugin_keeps_its_message(mgr, cli_run):
    code, err = cli_run(mgr, datasets=[{"loader": "faulty", "fault": "data_error"}])
    assert code == 2
    assert _error_line(err) == "error: faulty.json record 3: missing field 'text'"


@pytest.mark.parametrize("where, what", [
    ("hook", "while creating trainer callbacks: RuntimeError: tracker login failed"),
    ("on_log", "callback Tracker, while handling on_log: ZeroDivisionError: division by zero"),
])
def test_raising_callback_is_attributed(mgr, cli_run, tmp_path, where, what):
    mgr.register(RaisingCallbacks(where), name="tracker", package="ftk-tracker", version="2.0")
    code, err = cli_run(mgr)
    assert code == 1, err
    line = f"plugin 'tracker' (ftk-tracker 2.0), {what}"
    assert _error_line(err) == f"error: {line} (set FTK_DEBUG=1 for the traceback)"
    if where == "on_log":  # stopped during training: the manifest says why
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["status"] == "failed" and manifest["error"] == line


def test_broken_plugins_do_not_affect_a_run_that_does_not_use_them(mgr, cli_run):
    """The faulty plugin is installed but unused; a callback plugin with a misnamed argument is listed as
    an error and its absence is said, not silent."""
    rec = mgr.register(WrongArgCallbacks(), name="wrongargs", package="ftk-wrongargs", version="0.1")
    assert rec.status == "error" and "outdir" in rec.error
    code, err = cli_run(mgr)
    assert code == 0, err
    assert ("warning: plugin 'wrongargs' (ftk-wrongargs 0.1) is broken, its trainer callbacks are not attached: "
            "invalid hooks:") in err


def test_component_of_plugin_with_wrong_argument_names_is_named(fresh_manager, cli_run):
    class WrongArgs:
        @hookimpl
        def ftk_register_datasets(self, register, extra):
            register("wrongset", load_faulty)

    fresh_manager.register(WrongArgs(), name="wrongset-plugin", package="ftk-wrongset", version="0.1")
    code, err = cli_run(fresh_manager, datasets=[{"loader": "wrongset"}])
    assert code == 2
    line = _error_line(err)
    assert "unknown dataset 'wrongset'" in line and "wrongset-plugin (package ftk-wrongset 0.1): invalid hooks" in line


def test_same_metric_twice_is_refused_before_loading_the_model(mgr, cli_run, tmp_path):
    code, err = cli_run(mgr, metrics=["faulty_metric", {"name": "faulty_metric"}])
    assert code == 2
    assert _error_line(err) == ("error: evaluation.metrics[1]: metric 'faulty_metric' is listed twice with the same "
                                "options (evaluation.metrics[0]); both would report the same keys")
    assert not (tmp_path / "run").exists()


def test_same_metric_twice_with_other_options_never_overwrites_a_key(mgr, cli_run):
    """Its keys are known only when it reports them (no declaration yet): a clash is an error, not a silent
    overwrite of the first entry's value."""
    code, err = cli_run(mgr, metrics=["faulty_metric", {"name": "faulty_metric", "scale": 2}])
    assert code == 2
    assert _error_line(err) == "error: evaluation.metrics: two 'faulty_metric' entries both report 'faulty_score'"


def test_bad_options_schema_marks_the_plugin_as_error(fresh_manager):
    from click.testing import CliRunner

    from ftk.cli import cli

    class BadSchema:
        @hookimpl
        def ftk_register_datasets(self, register):
            register("badschema", load_faulty, options_schema={"type": "object",
                                                               "properties": {"path": {"type": "strin"}}})

    fresh_manager.register(BadSchema(), name="badschema", package="ftk-bad", version="1.0")
    res = CliRunner().invoke(cli, ["plugins", "list", "--json"], obj={"manager": fresh_manager})
    assert res.exit_code == 0, res.output
    rec = next(r for r in json.loads(res.output) if r["name"] == "badschema")
    assert rec["status"] == "error" and rec["provides"] == []
    assert rec["error"] == ("ftk_register_datasets: dataset 'badschema': options_schema is not a valid JSON Schema "
                            "(draft 2020-12): 'strin' is not valid under any of the given schemas at "
                            "properties/path/type")
    assert "badschema" not in fresh_manager.components("dataset")
    # every built-in schema is valid
    assert all(r.status == "ok" for r in fresh_manager.plugin_list() if r.package == "ftk")


def test_plugin_command_that_raises_is_attributed(fresh_manager, monkeypatch, capsys):
    import click

    import ftk.manager
    from ftk import cli as cli_mod

    class Cmd:
        @hookimpl
        def ftk_register_commands(self, cli):
            @cli.command("faulty-hello")
            def hello():
                raise KeyError("name")

            @cli.command("faulty-exit")
            def bye():
                raise click.ClickException("bad argument")  # click's own errors keep their meaning

    fresh_manager.register(Cmd(), name="cmd", package="ftk-cmd", version="0.2")
    monkeypatch.setattr(ftk.manager, "_cached", fresh_manager)
    try:
        with pytest.raises(SystemExit) as e:
            cli_mod.main(["faulty-hello"])
        assert e.value.code == 1
        assert _error_line(capsys.readouterr().err) == (
            "error: plugin 'cmd' (ftk-cmd 0.2), command 'faulty-hello', while running it: KeyError: 'name' "
            "(set FTK_DEBUG=1 for the traceback)")
        with pytest.raises(SystemExit) as e:
            cli_mod.main(["faulty-exit"])
        assert e.value.code == 2 and "Error: bad argument" in capsys.readouterr().err
    finally:
        for name in ("faulty-hello", "faulty-exit"):
            cli_mod.cli.commands.pop(name, None)


def test_adapter_targets_hook_that_raises_is_attributed(fresh_manager):
    class Targets:
        @hookimpl
        def ftk_adapter_targets(self, model_type, preset):
            raise TypeError("unhashable type: 'list'")

    fresh_manager.register(Targets(), name="targets", package="ftk-targets", version="1.1")
    with pytest.raises(PluginFailure) as e:
        fresh_manager.adapter_targets("llama", "default")
    assert str(e.value) == ("plugin 'targets' (ftk-targets 1.1), while answering ftk_adapter_targets: TypeError: "
                            "unhashable type: 'list'")
    assert e.value.exit_code == 1 and isinstance(e.value.__cause__, TypeError)

"""The one decoding rule (ftk.generation.resolve_decoding): every row of docs/evaluation.md's table, and the
refusals as each entry point reports them: a recipe (load_recipe, `ftk validate`), `ftk generate` flags and the
Python API's keywords. What the resolved settings generate is tested in test_evaluate.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ALPACA, MODEL_DIR, ROOT

from ftk.errors import FtkError
from ftk.generation import API, CLI, RECIPE, recipe_errors, resolve_decoding
from ftk.recipe import load_recipe

KEYS = ("do_sample", "num_beams", "temperature", "top_p")


def doc_table() -> list[tuple[dict, str, dict | None]]:
    """(given settings, decoding name, expected resolution or None when refused) per row of the docs' table."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text[text.index("## Generation settings"):]
    section = section[:section.index("\n## ", 1)]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| given")]
    out = []
    for ln in rows:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        given_cell, decoding, values = cells[0], cells[1], cells[2:]
        given = {} if given_cell == "nothing" else {
            k.strip(): json.loads(v) for k, v in (p.split(":") for p in given_cell.strip("`").split(", "))}
        expected = None if decoding == "refused" else {
            k: json.loads(v) for k, v in zip(KEYS, values) if v}
        out.append((given, decoding, expected))
    return out


TABLE = doc_table()


def test_the_docs_table_covers_every_case():
    decodings = {d for _, d, _ in TABLE}
    assert decodings == {"beam search", "greedy", "sampling", "beam-search sampling", "refused"}
    assert len(TABLE) >= 17
    refused = [g for g, d, _ in TABLE if d == "refused"]
    assert {"do_sample": False, "temperature": 0.7} in refused and {"temperature": 0, "do_sample": True} in refused


@pytest.mark.parametrize("given,decoding,expected", TABLE, ids=[json.dumps(g) for g, _, _ in TABLE])
def test_every_row_of_the_docs_table(given, decoding, expected):
    for naming in (API, CLI, RECIPE):
        if expected is None:
            with pytest.raises(FtkError):
                resolve_decoding(given, naming)
            continue
        got = resolve_decoding(given, naming)
        assert got == expected
        assert got["do_sample"] is (decoding in ("sampling", "beam-search sampling"))
        assert (got["num_beams"] == 1) is (decoding in ("greedy", "sampling"))
        assert resolve_decoding(got, naming) == got  # resolving again changes nothing (entry points resolve twice)


def test_sampling_extras_of_the_api_follow_top_ps_rule():
    assert resolve_decoding({"top_k": 5}) == {"do_sample": True, "num_beams": 1, "temperature": 1.0, "top_p": 1.0,
                                              "top_k": 5}
    with pytest.raises(FtkError, match=r"^min_p=: only applies when sampling, but do_sample=False; drop one$"):
        resolve_decoding({"min_p": 0.1, "do_sample": False})


REFUSED = [  # (settings, the one message per naming)
    ({"do_sample": False, "temperature": 0.7},
     {API: "temperature=: only applies when sampling, but do_sample=False; drop one",
      CLI: "--temperature: only applies when sampling, but --no-sample is given; drop one",
      RECIPE: "evaluation.generation.temperature: only applies when sampling, but evaluation.generation.do_sample "
              "is false; drop one"}),
    ({"do_sample": False, "top_p": 0.9},
     {API: "top_p=: only applies when sampling, but do_sample=False; drop one",
      CLI: "--top-p: only applies when sampling, but --no-sample is given; drop one",
      RECIPE: "evaluation.generation.top_p: only applies when sampling, but evaluation.generation.do_sample is "
              "false; drop one"}),
    ({"temperature": 0, "top_p": 0.9},
     {API: "top_p=: only applies when sampling, but temperature=0 (greedy decoding); drop one",
      CLI: "--top-p: only applies when sampling, but --temperature 0 is given (greedy decoding); drop one",
      RECIPE: "evaluation.generation.top_p: only applies when sampling, but evaluation.generation.temperature is 0 "
              "(greedy decoding); drop one"}),
    ({"temperature": 0, "do_sample": True},
     {API: "temperature=: 0 means greedy decoding, but do_sample=True; drop one",
      CLI: "--temperature: 0 means greedy decoding, but --do-sample is given; drop one",
      RECIPE: "evaluation.generation.temperature: 0 means greedy decoding, but evaluation.generation.do_sample is "
              "true; drop one"}),
]


@pytest.mark.parametrize("settings,messages", REFUSED, ids=[json.dumps(s) for s, _ in REFUSED])
def test_a_refusal_names_both_settings_as_the_entry_point_spells_them(settings, messages):
    for naming, message in messages.items():
        with pytest.raises(FtkError) as e:
            resolve_decoding(settings, naming)
        assert e.value.messages == [message]


def test_every_refused_setting_gets_its_own_line():
    with pytest.raises(FtkError) as e:
        resolve_decoding({"do_sample": False, "temperature": 0.5, "top_p": 0.5}, RECIPE)
    assert [m.split(":")[0] for m in e.value.messages] == ["evaluation.generation.temperature",
                                                            "evaluation.generation.top_p"]


@pytest.mark.parametrize("kw,message", [
    ({"temperature": -0.1}, "temperature=: must be a number >= 0 (0: greedy decoding), got -0.1"),
    ({"top_p": 0}, "top_p=: must be a number above 0 and at most 1, got 0"),
    ({"top_p": 1.5}, "top_p=: must be a number above 0 and at most 1, got 1.5"),
    ({"num_beams": 0}, "num_beams=: must be a whole number >= 1, got 0"),
    ({"num_beams": 2.5}, "num_beams=: must be a whole number >= 1, got 2.5"),
    ({"do_sample": "yes"}, "do_sample=: must be true or false, got 'yes'"),
    ({"temperature": True}, "temperature=: must be a number >= 0 (0: greedy decoding), got True"),
])
def test_api_values_out_of_range_are_refused(kw, message):
    with pytest.raises(FtkError) as e:
        resolve_decoding(kw, API)
    assert e.value.messages == [message]


# -- the recipe: refused by load_recipe / ftk validate, before anything loads ----------------------------
def recipe(generation: dict) -> dict:
    return {"model": {"name": str(MODEL_DIR)}, "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA)}]},
            "evaluation": {"generation": generation}}


@pytest.mark.parametrize("given,decoding,expected", TABLE, ids=[json.dumps(g) for g, _, _ in TABLE])
def test_load_recipe_accepts_and_refuses_the_tables_rows(given, decoding, expected, tmp_path):
    if expected is not None:
        gen = load_recipe(data=recipe(given), base_dir=tmp_path)["evaluation"]["generation"]
        assert {k: gen[k] for k in given} == given and not set(gen) & (set(KEYS) - set(given))  # unset stays unset
        return
    with pytest.raises(FtkError) as e:
        load_recipe(data=recipe(given), base_dir=tmp_path)
    assert e.value.messages == [m for s, ms in REFUSED if s == given for m in [ms[RECIPE]]]


def test_schema_errors_are_not_repeated_by_the_rule(tmp_path):
    with pytest.raises(FtkError) as e:
        load_recipe(data=recipe({"temperature": -1, "do_sample": False}), base_dir=tmp_path)
    assert e.value.messages == ["evaluation.generation.temperature: -1 is less than the minimum of 0"]
    assert recipe_errors(None) == recipe_errors([1]) == recipe_errors({"temperature": "hot", "do_sample": False}) == []


def test_the_recipe_schema_leaves_the_decoding_keys_unset_and_documents_the_rule():
    from ftk.defaults import schema_node

    props = schema_node("evaluation.generation")["properties"]
    for key in KEYS:
        assert "default" not in props[key], key
        assert "Unset" in props[key]["description"], key
    assert "docs/evaluation.md" in props["num_beams"]["description"]


def ftk(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftk", *map(str, args)], capture_output=True, text=True)


def test_ftk_validate_refuses_a_setting_the_decoding_would_ignore(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe({"do_sample": False, "temperature": 0.7})))
    p = ftk("validate", path)
    assert p.returncode == 2
    assert p.stderr == ("error: evaluation.generation.temperature: only applies when sampling, but "
                        "evaluation.generation.do_sample is false; drop one\n")
    p = ftk("validate", path, "--set", "evaluation.generation.do_sample=true")  # sampling at 0.7: fine
    assert p.returncode == 0, p.stderr


# -- ftk generate's flags: exit 2, one line, before any model loads -------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--no-sample", "--temperature", "0.7"], "--temperature: only applies when sampling, but --no-sample is given; "
                                               "drop one"),
    (["--temperature", "0", "--top-p", "0.5"], "--top-p: only applies when sampling, but --temperature 0 is given "
                                                "(greedy decoding); drop one"),
])
def test_ftk_generate_refuses_flags_the_decoding_would_ignore(flags, message, tmp_path):
    p = ftk("generate", "--base", tmp_path / "no-model-here", *flags, "Once upon a time")
    assert p.returncode == 2
    assert p.stderr == f"error: {message}\n" and p.stdout == ""  # not a model-loading error: nothing loaded


def test_the_cli_help_and_docs_point_to_the_rule():
    from click.testing import CliRunner

    from ftk.cmd_eval import eval_cmd, generate

    for cmd in (generate, eval_cmd):
        out = CliRunner().invoke(cmd, ["--help"]).output
        assert 'docs/evaluation.md,' in out and '"Generation settings"' in out, out
    out = CliRunner().invoke(generate, ["--help"]).output
    assert "--do-sample / --no-sample" in out and "--temperature" in out and "--top-p" in out
    assert re.search(r"\(evaluation\.md, \"Generation settings\"\)", (ROOT / "docs" / "cli.md").read_text())


def test_the_report_says_what_the_settings_resolved_to():
    from ftk.report import recipe_summary

    def line(gen):
        r = {"evaluation": {"metrics": ["bleu"], "max_samples": 2, "generation": gen}}
        return next(x for x in recipe_summary(r) if x.startswith("- **Evaluation**"))

    assert line({}).endswith("(beam search, 4 beams)")
    assert line({"temperature": 0.7}).endswith("(sampling at temperature 0.7, top_p 1.0, 1 beam(s))")
    assert line({"temperature": 0}).endswith("(greedy)")

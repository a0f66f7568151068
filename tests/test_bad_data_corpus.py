"""A corpus of malformed data files across the built-in loaders. Each must stop with one clear line
naming the file and the record or line, or, with on_error=skip, be skipped and counted by reason.
Also: hypothesis fuzzing of the loaders and of recipe validation (never a traceback)."""
from __future__ import annotations

import io
import json
import re
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftk.components import DataContext, LoadedData
from ftk.errors import FtkError

A = "alpaca"
DD = "dailydialog"
C = "custom"


def _dd(text, acts=None, emos=None, split="train"):
    files = {f"{split}/dialogues_{split}.txt": text}
    if acts is not None:
        files[f"{split}/dialogues_act_{split}.txt"] = acts
    if emos is not None:
        files[f"{split}/dialogues_emotion_{split}.txt"] = emos
    return files


# (id, loader, files {relative name: str|bytes}, options (path relative to tmp), error regex, skip reason or None)
CASES = [
    ("alpaca-missing-output", A, {"d.json": '[{"instruction":"a","output":"b"},{"instruction":"a"}]'}, {"path": "d.json"},
     r"d\.json.*record 1.*missing field 'output'", "missing_output"),
    ("alpaca-missing-instruction", A, {"d.json": '[{"output":"b"}]'}, {"path": "d.json"}, r"d\.json.*record 0.*'instruction'", True),
    ("alpaca-int-instruction", A, {"d.json": '[{"instruction":1,"output":"b"}]'}, {"path": "d.json"},
     r"d\.json.*record 0.*must be a string", True),
    ("alpaca-null-output", A, {"d.json": '[{"instruction":"a","output":null}]'}, {"path": "d.json"}, r"d\.json.*record 0", True),
    ("alpaca-list-input", A, {"d.json": '[{"instruction":"a","input":["x"],"output":"b"}]'}, {"path": "d.json"},
     r"d\.json.*record 0.*'input'", True),
    ("alpaca-empty-output", A, {"d.json": '[{"instruction":"a","output":""}]'}, {"path": "d.json"}, r"d\.json.*record 0.*empty", True),
    ("alpaca-record-not-object", A, {"d.json": '[{"instruction":"a","output":"b"}, "str"]'}, {"path": "d.json"},
     r"d\.json.*record 1.*expected an object", True),
    ("alpaca-jsonl-bad-line", A, {"d.jsonl": '{"instruction":"a","output":"b"}\n{"instruction": \n'}, {"path": "d.jsonl"},
     r"d\.jsonl:2: line does not parse as JSON", "invalid_json"),
    ("alpaca-jsonl-bad-record", A, {"d.jsonl": '{"instruction":"a","output":"b"}\n{"instruction":"a"}\n'}, {"path": "d.jsonl"},
     r"d\.jsonl.*(:2|record 1)", True),
    ("alpaca-json-too-deep", A, {"d.json": "[" * 100_000 + "]" * 100_000}, {"path": "d.json"},
     r"d\.json: JSON nested too deeply", None),
    ("alpaca-jsonl-too-deep", A, {"d.jsonl": '{"instruction":"a","output":"b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n"},
     {"path": "d.jsonl"}, r"d\.jsonl:2: line is JSON nested too deeply", "invalid_json"),
    ("alpaca-json-syntax", A, {"d.json": '[{"instruction":"a",}]'}, {"path": "d.json"}, r"d\.json:1", None),
    ("alpaca-not-a-list", A, {"d.json": '{"instruction":"a","output":"b"}'}, {"path": "d.json"}, r"d\.json.*list of records", None),
    ("alpaca-not-utf8", A, {"d.json": '[{"instruction":"caf\xe9","output":"b"}]'.encode("latin-1")}, {"path": "d.json"},
     r"d\.json.*not UTF-8", None),
    ("alpaca-missing-file", A, {}, {"path": "nope.json"}, r"nope\.json.*not found", None),
    ("dd-one-turn", DD, _dd("Hi . __eou__ Hello . __eou__\nAlone . __eou__\n"), {"path": "."},
     r"dialogues_train\.txt:2: dialogue has 1 turn", "too_few_turns"),
    ("dd-empty-line", DD, _dd("Hi . __eou__ Hello . __eou__\n\nA . __eou__ B . __eou__\n"), {"path": "."},
     r"dialogues_train\.txt:2", True),
    ("dd-acts-mismatch", DD, _dd("Hi . __eou__ Hello . __eou__\nA . __eou__ B . __eou__\n", acts="1 2 3\n1 2\n"),
     {"path": "."}, r"dialogues_train\.txt:1: 3 acts labels for 2 turns", True),
    ("dd-emotions-mismatch", DD, _dd("Hi . __eou__ Hello . __eou__\nA . __eou__ B . __eou__\n", emos="0\n0 0\n"),
     {"path": "."}, r"dialogues_train\.txt:1: 1 emotion", True),
    ("dd-label-file-length", DD, _dd("Hi . __eou__ Hello . __eou__\n", acts="1 2\n1 2\n"), {"path": "."},
     r"dialogues_act_train\.txt: 2 lines but .* has 1 dialogues", None),
    ("dd-non-numeric-acts", DD, _dd("Hi . __eou__ Hello . __eou__\nA . __eou__ B . __eou__\n", acts="1 x\n1 2\n"),
     {"path": "."}, r"dialogues_train\.txt:1: acts line is not a list of integers", True),
    ("dd-no-files", DD, {"other.txt": "x"}, {"path": "."}, r"no DailyDialog files found", None),
    ("dd-bad-zip", DD, {"train.zip": b"not a zip"}, {"path": "train.zip"}, r"train\.zip", None),
    ("custom-csv-missing-column", C, {"d.csv": "instruction,response\na,b\n"}, {"path": "d.csv"}, r"d\.csv.*'output'", None),
    ("custom-csv-empty-output", C, {"d.csv": "instruction,output\na,b\nc,\n"}, {"path": "d.csv"}, r"d\.csv.*(record 1|:3)", True),
    ("custom-jsonl-bad-line", C, {"d.jsonl": '{"instruction":"a","output":"b"}\nnot json\n'}, {"path": "d.jsonl"},
     r"d\.jsonl:2", "invalid_json"),
    ("custom-unknown-format", C, {"d.txt": "x"}, {"path": "d.txt"}, r"d\.txt: cannot tell the file format", None),
    ("custom-conversation-bad-role", C, {"d.jsonl": '{"messages":[{"role":"robot","content":"x"},{"role":"assistant","content":"y"}]}\n'},
     {"path": "d.jsonl", "shape": "conversation"}, r"d\.jsonl.*(:1|record 0).*robot", True),
    ("custom-conversation-one-turn", C, {"d.jsonl": '{"messages":[{"role":"user","content":"x"}]}\n'},
     {"path": "d.jsonl", "shape": "conversation"}, r"d\.jsonl.*(:1|record 0)", True),
    ("custom-conversation-not-list", C, {"d.jsonl": '{"messages":"hello"}\n'},
     {"path": "d.jsonl", "shape": "conversation"}, r"d\.jsonl.*(:1|record 0)", True),
    ("custom-bad-parquet", C, {"d.parquet": b"PAR1 not really"}, {"path": "d.parquet"}, r"d\.parquet", None),
]


def _write(tmp_path, files):
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)


def _load(manager, loader, options, tmp_path, on_error="raise"):
    from ftk.recipe import base_schema, fill_defaults, merged_component_schema

    comp = manager.get("dataset", loader)
    items = base_schema()["properties"]["data"]["properties"]["datasets"]["items"]
    opts = {"loader": loader, **{k: (str(tmp_path / v) if k == "path" else v) for k, v in options.items()}}
    fill_defaults(opts, merged_component_schema(items, comp.options_schema, "loader", loader))
    ld = comp.factory(opts, DataContext(recipe_dir=str(tmp_path), on_error=on_error))
    assert isinstance(ld, LoadedData)
    list(ld.train)  # iterate: errors may be raised lazily
    return ld


def test_corpus_size():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_data(case, tmp_path, fresh_manager):
    _, loader, files, options, pattern, skip = case
    _write(tmp_path, files)
    with pytest.raises(FtkError) as e:
        _load(fresh_manager, loader, options, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg, msg  # one line
    assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
    if skip:
        ld = _load(fresh_manager, loader, options, tmp_path, on_error="skip")
        assert sum(ld.skipped.values()) >= 1, ld.skipped
        if isinstance(skip, str):
            assert ld.skipped.get(skip) == 1, ld.skipped


# -- fuzzing --------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)
records = st.lists(st.one_of(st.fixed_dictionaries({"instruction": json_values, "output": json_values},
                                                   optional={"input": json_values}), json_values), max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=records, on_error=st.sampled_from(["raise", "skip"]))
def test_fuzz_alpaca_loader_never_crashes(recs, on_error, tmp_path_factory, fresh_manager):
    tmp = tmp_path_factory.mktemp("fz")
    (tmp / "d.json").write_text(json.dumps(recs))
    try:
        ld = _load(fresh_manager, A, {"path": "d.json"}, tmp, on_error=on_error)
    except FtkError as e:
        assert "\n" not in str(e) and "d.json" in str(e)
        return
    for ex in ld.train:
        assert isinstance(ex.text, str)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(alphabet=st.sampled_from(list("ab .?_eou\n")), max_size=40), max_size=4),
       on_error=st.sampled_from(["raise", "skip"]))
def test_fuzz_dailydialog_loader_never_crashes(lines, on_error, tmp_path_factory, fresh_manager):
    tmp = tmp_path_factory.mktemp("fz")
    _write(tmp, _dd("\n".join(lines)))
    try:
        _load(fresh_manager, DD, {"path": "."}, tmp, on_error=on_error)
    except FtkError as e:
        assert "\n" not in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_fuzz_custom_jsonl_never_crashes(text, tmp_path_factory, fresh_manager):
    tmp = tmp_path_factory.mktemp("fz")
    (tmp / "d.jsonl").write_text(text)
    try:
        _load(fresh_manager, C, {"path": "d.jsonl"}, tmp)
    except FtkError as e:
        assert "\n" not in str(e)


recipe_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 600) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["model", "name", "data", "datasets", "loader", "training", "learning_rate", "adapter", "method",
                         "r", "evaluation", "metrics", "quantization", "output_dir", "x", "path", "generation"]), c, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=recipe_like)
def test_fuzz_recipe_validation_never_crashes(recipe, tmp_path_factory):
    from ftk.manager import get_manager
    from ftk.recipe import load_recipe

    f = tmp_path_factory.mktemp("fz") / "r.json"
    f.write_text(json.dumps(recipe))
    try:
        load_recipe(f, manager=get_manager())
    except FtkError as e:
        assert e.messages and all("\n" not in m and ": " in m for m in e.messages)

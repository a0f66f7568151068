"""Recipe contract: the quickstart validates as written, defaults, paths, overrides, and a corpus of
malformed recipes each rejected with exit 2 and one line per problem naming its JSON path."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from conftest import ROOT
from ftk.errors import FtkError
from ftk.recipe import composed_schema, load_recipe

EXAMPLES = ROOT / "examples"
CORPUS = json.loads((Path(__file__).parent / "corpus" / "bad_recipes.json").read_text())
SYNTAX = sorted((Path(__file__).parent / "corpus" / "syntax").glob("*.json"))


def quickstart_abs(tmp_path) -> dict:
    """The quickstart with its relative paths made absolute and output under tmp_path."""
    r = json.loads((EXAMPLES / "quickstart.json").read_text())
    r["model"]["name"] = str((EXAMPLES / r["model"]["name"]).resolve())
    for d in r["data"]["datasets"]:
        d["path"] = str((EXAMPLES / d["path"]).resolve())
    r["output_dir"] = str(tmp_path / "out")
    return r


def _set(d, dotted, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) else d[p]
    last = parts[-1]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def _del(d, dotted):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) else d[p]
    del d[parts[-1]]


def run_cli(argv, capsys):
    from ftk.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_quickstart_validates_as_written(capsys):
    code, out, err = run_cli(["validate", str(EXAMPLES / "quickstart.json")], capsys)
    assert code == 0, err
    assert "valid" in out


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_example_recipe_validates(path):
    load_recipe(path)


def test_defaults_are_the_seed_spec(tmp_path):
    r = quickstart_abs(tmp_path)
    minimal = {"model": {"name": r["model"]["name"]}, "data": {"datasets": r["data"]["datasets"]}}
    res = load_recipe(data=minimal, base_dir=tmp_path)
    assert res["adapter"] == {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                              "target_modules": ["q_proj", "v_proj"], "bias": "none", **{
                                  k: v for k, v in res["adapter"].items()
                                  if k not in ("method", "r", "alpha", "dropout", "target_modules", "bias")}}
    assert res["model"]["quantization"]["method"] == "nf4"
    assert res["model"]["trust_remote_code"] is False
    assert res["data"]["max_length"] == 512
    t = res["training"]
    assert (t["epochs"], t["batch_size"], t["gradient_accumulation_steps"], t["learning_rate"], t["weight_decay"],
            t["warmup_ratio"], t["max_grad_norm"], t["lr_scheduler"], t["optimizer"]) == (
        3, 4, 4, 2e-4, 0.01, 0.03, 0.3, "cosine", "paged_adamw_32bit")
    g = res["evaluation"]["generation"]
    assert g == {"max_new_tokens": 256, "repetition_penalty": 1.0, "batch_size": 8}  # decoding keys: unset
    assert [m["name"] for m in res["evaluation"]["metrics"]] == ["perplexity", "bleu", "rouge"]


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the current folder must not matter
    res = load_recipe(EXAMPLES / "quickstart.json")
    assert Path(res["model"]["name"]) == (ROOT.parent / "shared" / "models" / "stories260K").resolve()
    assert res["data"]["datasets"][0]["path"].endswith("shared/data/alpaca/alpaca_sample.json")
    assert Path(res["output_dir"]) == EXAMPLES / "runs" / "quickstart"


def test_hub_ids_are_left_alone(tmp_path):
    r = quickstart_abs(tmp_path)
    r["model"]["name"] = "meta-llama/Llama-2-7b-hf"
    res = load_recipe(data=r, base_dir=tmp_path)
    assert res["model"]["name"] == "meta-llama/Llama-2-7b-hf"


def test_set_overrides_parse_json_and_validate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = load_recipe(EXAMPLES / "quickstart.json", overrides=[
        "training.learning_rate=1e-3", "adapter.target_modules=[\"q_proj\"]", "output_dir=myrun",
        "data.datasets.0.weight=2", "training.report_to=[\"none\"]"])
    assert res["training"]["learning_rate"] == 1e-3
    assert res["adapter"]["target_modules"] == ["q_proj"]
    assert res["output_dir"] == str(tmp_path / "myrun")  # --set paths are relative to where you typed them
    assert res["data"]["datasets"][0]["weight"] == 2
    with pytest.raises(FtkError) as e:
        load_recipe(EXAMPLES / "quickstart.json", overrides=["training.learning_rate=-2"])
    assert e.value.messages == ["training.learning_rate: -2 is less than the minimum of 0"]
    for bad, msg in [("novalue", "expected key.path=value"), ("data.datasets.9.path=x", "out of range"),
                     ("a..b=1", "empty key")]:
        with pytest.raises(FtkError, match=msg):
            load_recipe(EXAMPLES / "quickstart.json", overrides=[bad])


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_bad_recipe_corpus(case, tmp_path, capsys):
    r = copy.deepcopy(quickstart_abs(tmp_path))
    for k, v in case.get("set", {}).items():
        _set(r, k, v)
    for k in case.get("delete", []):
        _del(r, k)
    f = tmp_path / "recipe.json"
    f.write_text(json.dumps(r))
    code, out, err = run_cli(["validate", str(f)], capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    for expected in case["expect"]:
        assert any(expected in ln for ln in lines), f"{expected!r} not in {lines}"
    for ln in lines:  # one line per problem, each naming where
        assert ln.startswith("error: ") and ": " in ln[len("error: "):], ln
    # `ftk run` refuses the same recipe before writing anything
    code, _, err = run_cli(["run", str(f)], capsys)
    assert code == 2 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_corpus_is_large_enough():
    assert len(CORPUS) + len(SYNTAX) >= 40


@pytest.mark.parametrize("path", SYNTAX, ids=lambda p: p.name)
def test_syntax_errors_name_file_line_column(path, capsys):
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[0]
    assert str(path) in line
    if path.name in ("bad_bracket.json", "trailing_comma.json", "comment.json", "empty.json"):
        assert "JSON syntax error" in line
        loc = line.split(str(path))[1]
        assert loc.split(":")[1].isdigit() and loc.split(":")[2].isdigit(), line
    if path.name == "bad_bracket.json":
        assert f"{path}:3:" in line
    if path.name == "not_utf8.json":
        assert "not UTF-8" in line
    if path.name == "not_object.json":
        assert "must be a JSON object" in line


def test_missing_recipe_file(capsys, tmp_path):
    code, _, err = run_cli(["validate", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "file not found" in err and "Traceback" not in err


def test_validate_warns_on_trust_remote_code(tmp_path, capsys):
    r = quickstart_abs(tmp_path)
    r["model"]["trust_remote_code"] = True
    f = tmp_path / "r.json"
    f.write_text(json.dumps(r))
    code, _, err = run_cli(["validate", str(f)], capsys)
    assert code == 0 and "trust_remote_code is true" in err


def test_composed_schema_is_valid_and_describes_components(tmp_path):
    schema = composed_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    assert not list(v.iter_errors(json.loads((EXAMPLES / "quickstart.json").read_text())))
    bad = quickstart_abs(tmp_path)
    bad["adapter"]["r"] = 0
    assert list(v.iter_errors(bad))
    items = schema["properties"]["data"]["properties"]["datasets"]["items"]
    assert {"alpaca", "dailydialog"} <= set(items["properties"]["loader"]["enum"])


def test_schema_command_prints_json(capsys):
    code, out, _ = run_cli(["schema"], capsys)
    assert code == 0
    assert json.loads(out)["title"] == "ftk recipe"


def test_secrets_never_written(tmp_path):
    from ftk.run import redact

    rec = {"report_to": {"wandb_api_key": "sekrit", "hub_token": "hf_abc"}, "x": [{"password": "p"}], "ok": 1}
    text = json.dumps(redact(rec))
    assert "sekrit" not in text and "hf_abc" not in text and '"p"' not in text and '"ok": 1' in text
    # options that only contain "token" are not secrets: a written recipe.json must load again
    kept = {"tokenize": "13a", "tokenizer": "path/to/tok", "max_new_tokens": 8, "authToken": "x"}
    assert redact(kept) == {**kept, "authToken": "***"}


def test_deeply_nested_recipe_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(["validate", str(f)], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {f}: JSON nested too deeply to read"]

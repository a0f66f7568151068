"""The built-in loaders on the shared real data, every bad-data case (stop with one line naming file
and record, or skip and count), and the `ftk data` commands."""
from __future__ import annotations

import json
import zipfile

import pytest
from conftest import ALPACA, DAILYDIALOG, MODEL_DIR

from ftk.errors import DataError, FtkError


def load(manager, name, on_error="raise", **options):
    """The loader as ftk runs it: options validated and filled with its schema's defaults."""
    from ftk.testing import load_dataset

    return load_dataset(manager, {"loader": name, **options}, on_error=on_error)


def dd_lines(split):
    return (DAILYDIALOG / split / f"dialogues_{split}.txt").read_text(encoding="utf-8").splitlines()


# -- real data ------------------------------------------------------------------------------------
def test_dailydialog_native_folders(fresh_manager):
    ld = load(fresh_manager, "dailydialog", path=str(DAILYDIALOG))
    assert len(ld.train) == 1000 and len(ld.validation) == 150
    line = dd_lines("train")[0]
    turns = [t.strip() for t in line.split("__eou__") if t.strip()]
    ex = ld.train[0]
    assert [m["content"] for m in ex.messages] == turns
    assert ex.text.startswith(f"User: {turns[0]}\nAssistant: {turns[1]}\n")
    trained = "".join(s.text for s in ex.segments if s.train)
    assert trained == "".join(t + ("\n" if k < len(turns) - 1 else "") for k, t in enumerate(turns) if k % 2 == 1)
    acts = (DAILYDIALOG / "train" / "dialogues_act_train.txt").read_text().splitlines()[0].split()
    assert ex.meta["acts"] == [int(a) for a in acts] and len(ex.meta["emotions"]) == len(turns)
    assert ex.reference == turns[max(k for k in range(len(turns)) if k % 2 == 1)]


def test_dailydialog_original_zips(fresh_manager):
    with zipfile.ZipFile(DAILYDIALOG / "original" / "train.zip") as z:
        n_train = sum(1 for ln in z.read("train/dialogues_train.txt").decode().splitlines() if ln.strip())
    with zipfile.ZipFile(DAILYDIALOG / "original" / "validation.zip") as z:
        n_val = sum(1 for ln in z.read("validation/dialogues_validation.txt").decode().splitlines() if ln.strip())
    zpath = str(DAILYDIALOG / "original" / "train.zip")
    # the original release has one dialogue whose act labels disagree with its text (12 turns, 11 acts)
    with pytest.raises(DataError, match=r"train.zip!train/dialogues_train.txt:7852: 11 acts labels for 12 turns"):
        load(fresh_manager, "dailydialog", path=zpath)
    ld = load(fresh_manager, "dailydialog", "skip", path=zpath)
    assert len(ld.train) == n_train - 1 and ld.skipped == {"acts_mismatch": 1}
    assert len(ld.validation) == n_val  # validation.zip beside train.zip is the validation split
    folder = load(fresh_manager, "dailydialog", path=str(DAILYDIALOG / "original"), labels=False)
    assert len(folder.train) == n_train and "acts" not in folder.train[0].meta


def test_dailydialog_next_turn_mode(fresh_manager):
    ld = load(fresh_manager, "dailydialog", path=str(DAILYDIALOG), mode="next_turn", speakers=["A", "B"])
    want = sum(len([t for t in ln.split("__eou__") if t.strip()]) // 2 for ln in dd_lines("train"))
    assert len(ld.train) == want
    ex = ld.train[1]  # dialogue 0, second responding turn
    assert [s.train for s in ex.segments][-1] and sum(s.train for s in ex.segments) == 1
    assert ex.text.startswith("A: ") and "\nB: " in ex.text and ex.reference == ex.segments[-1].text


def test_alpaca_json_and_jsonl_agree(fresh_manager, tmp_path):
    rows = json.loads(ALPACA.read_text())[:50]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = load(fresh_manager, "alpaca", path=str(ALPACA))
    b = load(fresh_manager, "alpaca", path=str(jl))
    assert len(a.train) == 2000 and [e.text for e in a.train[:50]] == [e.text for e in b.train]
    assert a.train[0].reference == rows[0]["output"]


def test_custom_csv_parquet_template_and_conversations(fresh_manager, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_p = tmp_path / "qa.csv"
    csv_p.write_text('question,answer,topic\n"What is 2+2?",4,math\n"Capital of France?",Paris,geo\n')
    opts = dict(fields={"instruction": "question", "output": "answer", "input": None},
                template="[{topic}] Q: {instruction}\nA: {output}\n")
    ld = load(fresh_manager, "custom", path=str(csv_p), **opts)
    assert [e.text for e in ld.train] == ["[math] Q: What is 2+2?\nA: 4\n", "[geo] Q: Capital of France?\nA: Paris\n"]
    assert [s.text for s in ld.train[0].segments if s.train] == ["4\n"]
    pq_p = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["What is 2+2?", "Capital of France?"], "answer": ["4", "Paris"],
                             "topic": ["math", "geo"]}), pq_p)
    assert [e.text for e in load(fresh_manager, "custom", path=str(pq_p), **opts).train] == [e.text for e in ld.train]
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}))
    c = load(fresh_manager, "custom", path=str(conv), shape="conversation",
             fields={"messages": "conversations", "role": "from", "content": "value"},
             roles={"human": "user", "gpt": "assistant"})
    assert c.train[0].text == "User: hi\nAssistant: hello" and c.train[0].messages[1]["role"] == "assistant"


# -- bad data ---------------------------------------------------------------------------------------
BAD_ALPACA = [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', r"record 1: missing field 'output'", "missing_output"),
    ('[{"instruction": 5, "output": "b"}]', r"record 0: field 'instruction' must be a string", "non_string_instruction"),
    ('[{"instruction": "a", "input": "", "output": "  "}]', r"record 0: field 'output' is empty", "empty_output"),
    ('[{"instruction": "a", "output": "b"}, 7]', r"record 1: expected an object", "not_an_object"),
]


@pytest.mark.parametrize("text,msg,reason", BAD_ALPACA)
def test_bad_alpaca_records_stop_or_skip(fresh_manager, tmp_path, text, msg, reason):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(DataError, match=msg) as e:
        load(fresh_manager, "alpaca", path=str(f))
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    ld = load(fresh_manager, "alpaca", on_error="skip", path=str(f))
    assert ld.skipped == {reason: 1}


def test_bad_jsonl_line_names_the_line(fresh_manager, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: line does not parse as JSON"):
        load(fresh_manager, "alpaca", path=str(f))
    ld = load(fresh_manager, "alpaca", on_error="skip", path=str(f))
    assert len(ld.train) == 2 and ld.skipped == {"invalid_json": 1}


def write_dd(folder, text, acts=None):
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "dialogues_train.txt").write_text(text)
    if acts is not None:
        (folder / "train" / "dialogues_act_train.txt").write_text(acts)


def test_dailydialog_too_few_turns_and_label_mismatch(fresh_manager, tmp_path):
    write_dd(tmp_path / "a", "Hi . __eou__ Hello . __eou__\nOnly one . __eou__\n")
    with pytest.raises(DataError, match=r"dialogues_train.txt:2: dialogue has 1 turn"):
        load(fresh_manager, "dailydialog", path=str(tmp_path / "a"))
    assert load(fresh_manager, "dailydialog", "skip", path=str(tmp_path / "a")).skipped == {"too_few_turns": 1}
    write_dd(tmp_path / "b", "Hi . __eou__ Hello . __eou__\nA . __eou__ B . __eou__\n", acts="1 2\n1 2 3\n")
    with pytest.raises(DataError, match=r"dialogues_train.txt:2: 3 acts labels for 2 turns"):
        load(fresh_manager, "dailydialog", path=str(tmp_path / "b"))
    write_dd(tmp_path / "c", "Hi . __eou__ Hello . __eou__\n", acts="1 2\n1 2\n")
    with pytest.raises(DataError, match=r"dialogues_act_train.txt: 2 lines but .* has 1 dialogues"):
        load(fresh_manager, "dailydialog", path=str(tmp_path / "c"))


def test_missing_non_utf8_and_wrong_shape_files(fresh_manager, tmp_path):
    with pytest.raises(FtkError, match=r"data.datasets\[0\].path: .*nope.json does not exist"):
        load(fresh_manager, "alpaca", path=str(tmp_path / "nope.json"))  # refused before the loader runs
    f = tmp_path / "latin1.json"
    f.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.json:1: not UTF-8"):
        load(fresh_manager, "alpaca", path=str(f))
    g = tmp_path / "shape.json"
    g.write_text('{"a": 1}')
    with pytest.raises(DataError, match=r"shape.json: expected a JSON list of records"):
        load(fresh_manager, "alpaca", path=str(g))
    with pytest.raises(DataError, match=r"no DailyDialog files found"):
        load(fresh_manager, "dailydialog", path=str(tmp_path))
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match=r"data.txt: cannot tell the file format"):
        load(fresh_manager, "custom", path=str(txt))



def test_bad_template_csv_field_and_role_are_one_line_errors(fresh_manager, tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[{"instruction": "a", "output": "b"}]')
    with pytest.raises(DataError, match=r"template '\{ \{output\}': unexpected"):
        load(fresh_manager, "custom", path=str(f), template="{ {output}")
    ex = load(fresh_manager, "custom", path=str(f), template="{{x}} {instruction} -> {output!s}").train[0]
    assert [(s.text, s.train) for s in ex.segments] == [("{x} a -> ", False), ("b", True)]
    big = tmp_path / "big.csv"
    big.write_text("instruction,output\na,b\nc," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"big.csv:3: not valid CSV: field larger"):
        load(fresh_manager, "custom", path=str(big))
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": ["u"], "content": "x"}, {"role": "assistant", "content": "y"}]}))
    with pytest.raises(DataError, match=r"c.jsonl:1: message 0: role \['u'\] is not"):
        load(fresh_manager, "custom", path=str(conv), shape="conversation", roles={"human": "user"})


# -- commands ---------------------------------------------------------------------------------------
@pytest.fixture
def recipe_file(tmp_path):
    r = {"model": {"name": str(MODEL_DIR)},
         "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 30},
                               {"loader": "dailydialog", "path": str(DAILYDIALOG), "max_examples": 10}],
                  "cache_dir": str(tmp_path / "cache")}}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r))
    return p


def run_cli(args, capsys):
    from ftk.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_data_preview_json_and_text(recipe_file, capsys):
    from transformers import AutoTokenizer

    code, out, _ = run_cli(["data", "preview", str(recipe_file), "-n", "4", "--json"], capsys)
    assert code == 0
    items = json.loads(out)
    assert len(items) == 4 and {"text", "input_ids", "labels", "source"} <= set(items[0])
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    for it in items:
        assert it["source"] in ("alpaca", "dailydialog")
        assert tok.decode(it["input_ids"]) == it["text"]
        assert len(it["labels"]) == len(it["input_ids"]) and it["labels"][0] == -100
        assert any(lab != -100 for lab in it["labels"])
    code, out, _ = run_cli(["data", "preview", str(recipe_file), "-n", "1", "--set", "data.packing=false"], capsys)
    assert code == 0 and "[[<s>" in out and "tokens," in out


def test_data_stats_json_and_errors(recipe_file, capsys, tmp_path):
    code, out, _ = run_cli(["data", "stats", str(recipe_file), "--json"], capsys)
    st = json.loads(out)
    assert code == 0 and [d["name"] for d in st["datasets"]] == ["alpaca", "dailydialog"]
    assert st["datasets"][1]["examples"] == {"train": 10, "validation": 10}
    assert {"unpacked", "packed", "unpacked_pad_to_max_length"} == set(st["padding_waste"])
    code, out, _ = run_cli(["data", "stats", str(recipe_file)], capsys)
    assert code == 0 and "padding waste" in out and "hit" in out  # second run: cached
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    code, out, err = run_cli(["data", "stats", str(recipe_file), "--set", f"data.datasets.0.path={bad}"], capsys)
    assert code == 2 and err.strip() == f"error: {bad}:2: line does not parse as JSON: Expecting value"

"""Preference pairs (issue 15, data part): the `preference` loader on the shared real pairs and on small
files in every format, each bad record (one line naming file:line, or skipped and counted), the "pairs"
pipeline (ids equal to TRL's DPOTrainer tokenization, truncation, drop, mixing, validation split, cache),
the data-form checks between loaders and trainers, and `ftk data preview/stats` for pairs."""
from __future__ import annotations

import json
import re

import pytest
from conftest import ALPACA, MODEL_DIR, SHARED

from ftk.components import LoadedData, PreferencePair, TrainerPlan
from ftk.data import IGNORE, prepare_data, prepare_tokenizer
from ftk.errors import DataError
from ftk.loaderkit import conversation_example
from ftk.manager import register
from ftk.recipe import load_recipe

PAIRS = SHARED / "data" / "preference" / "dailydialog_pairs.jsonl"
OFFTOPIC = SHARED / "data" / "preference" / "dailydialog_pairs_offtopic.jsonl"
RECORDS = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TEXT_ROWS = [{"question": f"What is {a} plus {b}?", "good": f" It is {a + b}.", "bad": f" It is {a * b + 7}.",
              "topic": "math"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (2, 2)]]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL_DIR))


@pytest.fixture
def mgr(fresh_manager):
    """A manager with a tiny in-process trainer of the "pairs" data form (the DPO plugin is built apart)."""
    register("trainer", "pairs_test", lambda options, ctx: TrainerPlan(data="pairs"), manager=fresh_manager)
    return fresh_manager


def make(manager, tmp_path, datasets, trainer="pairs_test", training=None, **data):
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return load_recipe(data={"model": {"name": str(MODEL_DIR)}, "trainer": {"method": trainer},
                             "training": training or {}, "data": {"datasets": datasets, **data}},
                       manager=manager, base_dir=tmp_path)


def load(manager, on_error="raise", **options):
    from ftk.testing import load_dataset

    return load_dataset(manager, {"loader": "preference", **options}, on_error=on_error)


def pref(path=PAIRS, **kw):
    return {"loader": "preference", "path": str(path), **kw}


def pair_index(name: str) -> int:
    return int(name.rsplit("#", 1)[1])


# -- the loader -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [PAIRS, OFFTOPIC], ids=lambda p: p.name)
def test_loader_reads_the_real_files(fresh_manager, path):
    lines = path.read_text(encoding="utf-8").splitlines()
    ld = load(fresh_manager, path=str(path))
    assert isinstance(ld, LoadedData) and ld.skipped == {} and ld.validation is None
    assert len(ld.train) == len(lines) == {"dailydialog_pairs.jsonl": 986, "dailydialog_pairs_offtopic.jsonl": 1000}[path.name]
    for k in (0, len(lines) // 2, len(lines) - 1):
        rec, pair = json.loads(lines[k]), ld.train[k]
        assert isinstance(pair, PreferencePair) and pair.meta["where"] == f"{path}:{k + 1}"
        assert pair.prompt == [{"role": m["role"], "content": m["content"]} for m in rec["prompt"]]
        assert pair.chosen == rec["chosen"] and pair.rejected == rec["rejected"]
        assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
        assert [m["role"] for m in pair.chosen] == ["assistant"] and pair.chosen != pair.rejected


def _write(path, fmt, rows):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_text_pairs_in_every_format_with_a_field_mapping(fresh_manager, tmp_path, fmt):
    path = _write(tmp_path / f"p.{fmt}", fmt, TEXT_ROWS)
    val = _write(tmp_path / f"v.{fmt}", fmt, TEXT_ROWS[:2])
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    ld = load(fresh_manager, path=str(path), validation_path=str(val), fields=fields)
    assert [(p.prompt, p.chosen, p.rejected) for p in ld.train] == [(r["question"], r["good"], r["bad"]) for r in TEXT_ROWS]
    assert [p.prompt for p in ld.validation] == [r["question"] for r in TEXT_ROWS[:2]]
    where = ld.train[1].meta["where"]
    assert where == (f"{path}:3" if fmt == "csv" else f"{path}:2" if fmt == "jsonl" else f"{path}: record 1")
    # without the mapping the default names are looked for, and their absence is a bad record
    with pytest.raises(DataError, match=r"missing field 'chosen'"):
        load(fresh_manager, path=str(path))


def test_conversational_parquet_and_implicit_prompt_with_roles(fresh_manager, tmp_path):
    # Parquet holds the messages natively; chosen given as a string is the assistant message's content
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"]} for r in RECORDS[:5]]
    ld = load(fresh_manager, path=str(_write(tmp_path / "c.parquet", "parquet", rows)))
    assert [p.chosen for p in ld.train] == [r["chosen"] for r in RECORDS[:5]]
    # implicit prompt: whole conversations sharing their start, with the user's own role names
    rename = {"user": "human", "assistant": "gpt"}
    conv = [{"chosen": [{"from": 0, "role": rename[m["role"]], "content": m["content"]} for m in r["prompt"] + r["chosen"]],
             "rejected": [{"role": rename[m["role"]], "content": m["content"]} for m in r["prompt"] + r["rejected"]]}
            for r in RECORDS[:5]]
    path = _write(tmp_path / "i.jsonl", "jsonl", conv)
    ld = load(fresh_manager, path=str(path), roles={"human": "user", "gpt": "assistant"})
    for pair, rec in zip(ld.train, RECORDS[:5]):
        assert (pair.prompt, pair.chosen, pair.rejected) == (rec["prompt"], rec["chosen"], rec["rejected"])


GOOD = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
USER = [{"role": "user", "content": "Hi"}]
ASSIST = [{"role": "assistant", "content": "Hello"}]
BAD_RECORDS = [
    ("missing-chosen", {"prompt": "Q", "rejected": "no"}, r"missing field 'chosen'", "missing_chosen"),
    ("missing-prompt-text", {"chosen": "yes", "rejected": "no"}, r"missing field 'prompt'", "missing_prompt"),
    ("empty-response", {"prompt": "Q", "chosen": "  ", "rejected": "no"}, r"field 'chosen' is empty", "empty_chosen"),
    ("empty-turn", {"prompt": [{"role": "user", "content": ""}], "chosen": ASSIST, "rejected": "no"},
     r"field 'prompt': message 0 is empty", "empty_turn"),
    ("same-responses", {"prompt": USER, "chosen": ASSIST, "rejected": "Hello"},
     r"fields 'chosen' and 'rejected' are the same response", "same_responses"),
    ("bad-role", {"prompt": [{"role": "bot", "content": "Hi"}], "chosen": ASSIST, "rejected": "no"},
     r"field 'prompt': message 0: role 'bot' is not system/user/assistant", "bad_messages"),
    ("prompt-ends-with-assistant", {"prompt": USER + ASSIST, "chosen": ASSIST, "rejected": "no"},
     r"ends with an assistant message", "prompt_ends_with_assistant"),
    ("no-user-turn", {"prompt": [{"role": "system", "content": "Be nice"}], "chosen": ASSIST, "rejected": "no"},
     r"has no user message", "no_user_turn"),
    ("two-response-messages", {"prompt": USER, "chosen": ASSIST + ASSIST, "rejected": "no"},
     r"field 'chosen' must be one assistant message, got roles \['assistant', 'assistant'\]", "bad_response"),
    ("user-response", {"prompt": USER, "chosen": "yes", "rejected": USER},
     r"field 'rejected' must be one assistant message, got roles \['user'\]", "bad_response"),
    ("int-response", {"prompt": "Q", "chosen": 5, "rejected": "no"}, r"field 'chosen' must be a string, got int",
     "wrong_type_chosen"),
    ("dict-prompt", {"prompt": {"text": "Q"}, "chosen": "yes", "rejected": "no"},
     r"field 'prompt' must be a string or a list of messages, got dict", "wrong_type_prompt"),
    ("mixed-forms", {"prompt": "Q", "chosen": ASSIST, "rejected": "no"}, r"field 'prompt' is text but 'chosen' is a list",
     "mixed_forms"),
    ("no-shared-prompt", {"chosen": USER + ASSIST, "rejected": [{"role": "user", "content": "Yo"}] + ASSIST},
     r"share no prompt messages", "no_shared_prompt"),
    ("not-an-object", [1, 2], r"expected an object with fields, got list", "not_an_object"),
]


@pytest.mark.parametrize("case", BAD_RECORDS, ids=lambda c: c[0])
def test_bad_record_stops_with_file_line_or_is_skipped_and_counted(fresh_manager, tmp_path, case):
    _, bad, message, reason = case
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as e:
        load(fresh_manager, path=str(path))
    text = str(e.value)
    assert text.startswith(f"{path}:2: ") and "\n" not in text
    assert re.search(message, text), text
    ld = load(fresh_manager, "skip", path=str(path))
    assert len(ld.train) == 2 and ld.skipped == {reason: 1}


def test_skipped_records_are_counted_in_the_stats(mgr, tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*[GOOD] * 3, {"prompt": "Q"}, "oops", GOOD])
                    + "not json\n")
    p = prepare_data(make(mgr, tmp_path, [pref(path, on_error="skip")], validation_size=0), tok, mgr)
    assert p.stats["skipped"] == {"missing_chosen": 1, "not_an_object": 1, "invalid_json": 1}
    assert p.stats["datasets"][0]["skipped"] == p.stats["skipped"] and len(p.train) == 4


# -- the pipeline ---------------------------------------------------------------------------------
def _trl_tokenized(tok, rows):
    """TRL 1.16's own DPO preprocessing (DPOTrainer._prepare_dataset) of these rows."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)  # only the preprocessing is used: no model, no training
    trainer._tokenizer = tok
    args = DPOConfig(output_dir="unused", max_length=None, report_to=[], bf16=False, use_cpu=True)
    return list(DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tok, args, "train"))


def _by_index(prepared):
    return {pair_index(ref.name): f for ref, f in zip(prepared.train_refs, prepared.train)}


def test_ids_equal_trls_dpo_tokenization_in_ftks_format(mgr, tmp_path, tok):
    """Conversations rendered in ftk's format, tokenized: the same ids TRL's DPOTrainer gives for the same text
    pairs (BOS first in both: the LLaMA tokenizer adds it for TRL, ftk adds it itself; EOS after each response
    in both), with no truncation."""
    n = 60
    p = prepare_data(make(mgr, tmp_path, [pref(max_examples=n)], validation_size=0, max_length=4096), tok, mgr)
    assert p.form == "pairs" and p.stats["truncated"] == 0 and len(p.train) == n
    rendered = p.examples["preference"]
    rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rendered]
    trl = _trl_tokenized(tok, rows)
    mine = _by_index(p)
    for k in range(n):
        assert set(mine[k]) == {"prompt_ids", "chosen_ids", "rejected_ids"}
        assert mine[k] == {key: trl[k][key] for key in mine[k]}, k
        assert mine[k]["prompt_ids"][0] == tok.bos_token_id and mine[k]["chosen_ids"][-1] == tok.eos_token_id
    # the text is the conversation exactly as the rows pipeline renders it for supervised training
    rec = RECORDS[3]
    conv = conversation_example(rec["prompt"] + rec["chosen"])
    assert rendered[3].prompt + rendered[3].chosen == conv.text and rendered[3].prompt == conv.prompt
    assert mine[3]["prompt_ids"] + mine[3]["chosen_ids"] == tok(conv.text)["input_ids"] + [tok.eos_token_id]
    assert all(type(t) is int for f in p.train for v in f.values() for t in v)


def test_ids_equal_trls_with_the_chat_template(mgr, tmp_path):
    from transformers import AutoTokenizer

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL_DIR))
    tok.chat_template = CHAT
    n = 30
    p = prepare_data(make(mgr, tmp_path, [pref(max_examples=n, template="chat")], validation_size=0,
                          max_length=4096), tok, mgr)
    trl = _trl_tokenized(tok, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in RECORDS[:n]])
    mine = _by_index(p)
    for k in range(n):
        assert mine[k] == {key: trl[k][key] for key in mine[k]}, k
        # BOS and EOS come from the template only: one of each where it puts them
        assert mine[k]["prompt_ids"][0] == tok.bos_token_id and mine[k]["prompt_ids"][1] != tok.bos_token_id
        assert mine[k]["chosen_ids"].count(tok.eos_token_id) == 1 and mine[k]["chosen_ids"][-1] == tok.eos_token_id
    r = p.examples["preference"][0]
    assert r.prompt == tok.apply_chat_template(RECORDS[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert r.reference == RECORDS[0]["chosen"][0]["content"]
    # without a chat template: one clear error, not a silent fallback
    plain = prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL_DIR))
    with pytest.raises(DataError, match="template 'chat' needs a tokenizer with a chat template"):
        prepare_data(make(mgr, tmp_path, [pref(max_examples=3, template="chat")]), plain, mgr)
    with pytest.raises(DataError, match=r"template 'Q: \{prompt\}': preference pairs take \"default\""):
        prepare_data(make(mgr, tmp_path, [pref(max_examples=3, template="Q: {prompt}")]), plain, mgr)


def test_truncation_keeps_the_prompts_end_and_the_responses_start(mgr, tmp_path, tok):
    kw = {"validation_size": 0, "cache_dir": str(tmp_path / "cache")}
    full = _by_index(prepare_data(make(mgr, tmp_path, [pref(max_examples=200)], max_length=4096, **kw), tok, mgr))
    max_length, mpl = 96, 40
    p = prepare_data(make(mgr, tmp_path, [pref(max_examples=200)], max_length=max_length, max_prompt_length=mpl, **kw),
                     tok, mgr)
    cut, n_long = _by_index(p), 0
    for k, f in full.items():
        c = cut[k]
        lp, longer = len(f["prompt_ids"]), max(len(f["chosen_ids"]), len(f["rejected_ids"]))
        if lp + longer <= max_length:
            assert c == f, k
            continue
        n_long += 1
        keep = min(lp, mpl)
        assert c["prompt_ids"] == ([tok.bos_token_id] + f["prompt_ids"][lp - keep + 1:] if keep < lp else f["prompt_ids"])
        for key in ("chosen_ids", "rejected_ids"):
            assert c[key] == f[key][: max_length - keep]
        assert len(c["prompt_ids"]) + max(len(c["chosen_ids"]), len(c["rejected_ids"])) <= max_length
    assert 20 < n_long < 200 and p.stats["truncated"] == n_long == p.stats["datasets"][0]["truncated"]
    assert p.stats["settings"]["max_prompt_length"] == mpl and p.stats["dropped"] == {"too_long": 0}
    # null: max_length // 2
    d = prepare_data(make(mgr, tmp_path, [pref(max_examples=200)], max_length=max_length, **kw), tok, mgr)
    assert d.stats["settings"]["max_prompt_length"] == max_length // 2
    assert max(len(f["prompt_ids"]) for k, f in _by_index(d).items()
               if len(full[k]["prompt_ids"]) + max(len(full[k]["chosen_ids"]), len(full[k]["rejected_ids"])) > max_length
               ) <= max_length // 2
    # drop: the long pairs are left out and counted
    dropped = prepare_data(make(mgr, tmp_path, [pref(max_examples=200)], max_length=max_length, truncation="drop", **kw),
                           tok, mgr)
    assert dropped.stats["dropped"] == {"too_long": n_long} and dropped.stats["truncated"] == 0
    assert len(dropped.train) == 200 - n_long and all(_by_index(dropped)[k] == full[k] for k in _by_index(dropped))
    with pytest.raises(DataError, match=r"data\.max_prompt_length \(96\) must be below data\.max_length \(96\)"):
        prepare_data(make(mgr, tmp_path, [pref(max_examples=5)], max_length=96, max_prompt_length=96), tok, mgr)


def test_balanced_mixing_of_two_pair_files(mgr, tmp_path, tok):
    r = make(mgr, tmp_path, [pref(PAIRS, max_examples=120), pref(OFFTOPIC, max_examples=40, weight=0.5)],
             mixing="balanced", validation_size=0)
    p = prepare_data(r, tok, mgr)
    assert p.stats["train"]["per_dataset"] == {"preference[0]": 120, "preference[1]": 60}
    assert len(p.train) == 180 and [ds["name"] for ds in p.stats["datasets"]] == ["preference[0]", "preference[1]"]
    off = [json.loads(line) for line in OFFTOPIC.read_text(encoding="utf-8").splitlines()[:40]]
    for ref, f in zip(p.train_refs, p.train):
        if ref.name.startswith("preference[1]"):
            rej = off[pair_index(ref.name)]["rejected"][0]["content"]
            assert tok.decode(f["rejected_ids"], skip_special_tokens=True).strip() == rej.strip()
    names = [ref.name for ref in p.train_refs]
    assert names[:20] != sorted(names[:20])  # shuffled together, not one file after the other
    concat = prepare_data(make(mgr, tmp_path, [pref(PAIRS, max_examples=120), pref(OFFTOPIC, max_examples=40)],
                               validation_size=0), tok, mgr)
    assert concat.stats["train"]["per_dataset"] == {"preference[0]": 120, "preference[1]": 40}


def test_validation_split_and_what_evaluation_gets(mgr, tmp_path, tok):
    r = make(mgr, tmp_path, [pref(max_examples=100)], validation_size=10, seed=5)
    p = prepare_data(r, tok, mgr)
    assert len(p.train) == 90 and len(p.validation) == 10 and p.stats["validation"]["examples"] == 10
    assert p.stats["datasets"][0]["validation_from"] == "validation_size 10"
    train_idx = {pair_index(ref.name) for ref in p.train_refs}
    val_idx = sorted(set(range(100)) - train_idx)
    assert len(val_idx) == 10
    again = prepare_data(r, tok, mgr)
    assert again.validation == p.validation and again.fingerprint == p.fingerprint
    rendered = p.examples["preference"]
    assert p.eval_pairs == [(rendered[k].prompt, RECORDS[k]["chosen"][0]["content"]) for k in val_idx]
    # perplexity rows: prompt + chosen, the prompt (its BOS too) masked, the response trained
    assert len(p.validation_unpacked) == 10
    for f, row in zip(p.validation, p.validation_unpacked):
        assert row["input_ids"] == f["prompt_ids"] + f["chosen_ids"]
        assert row["labels"] == [IGNORE] * len(f["prompt_ids"]) + f["chosen_ids"]
    batch = p.collator([p.validation_unpacked[0], p.validation_unpacked[1]])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    # a dataset's own validation file is used as it is
    val = tmp_path / "v.jsonl"
    val.write_text("".join(PAIRS.read_text(encoding="utf-8").splitlines(keepends=True)[900:920]))
    own = prepare_data(make(mgr, tmp_path, [pref(max_examples=50, validation_path=str(val))]), tok, mgr)
    assert own.stats["datasets"][0]["validation_from"] == "own split" and len(own.validation) == 20
    assert len(own.train) == 50 and own.eval_pairs[0][1] == RECORDS[900]["chosen"][0]["content"]


def test_tokenized_pairs_are_cached_by_content(mgr, tmp_path, tok):
    r = make(mgr, tmp_path, [pref(max_examples=50)], validation_size=0)
    first = prepare_data(r, tok, mgr)
    second = prepare_data(r, tok, mgr)
    assert [ds["cache"] for ds in (first.stats["datasets"][0], second.stats["datasets"][0])] == ["miss", "hit"]
    assert second.train == first.train
    # other pairs (another max_examples) are another entry; the cache off tokenizes every time
    assert prepare_data(make(mgr, tmp_path, [pref(max_examples=40)], validation_size=0), tok, mgr
                        ).stats["datasets"][0]["cache"] == "miss"
    off = prepare_data(make(mgr, tmp_path, [pref(max_examples=50)], validation_size=0, cache=False), tok, mgr)
    assert off.stats["datasets"][0]["cache"] == "miss" and off.train == first.train


# -- data forms: the loader and the trainer must agree ---------------------------------------------
def test_a_rows_trainer_given_pairs_and_a_pairs_trainer_given_rows_fail_naming_the_entry(mgr, tmp_path, tok):
    with pytest.raises(DataError) as e:
        prepare_data(make(mgr, tmp_path, [pref(max_examples=5)], trainer="sft"), tok, mgr)
    assert str(e.value) == ("data.datasets[0] (preference): loader 'preference' gives preference pairs, but trainer "
                            "'sft' trains on rows of examples (data form \"rows\"); use a preference trainer or a "
                            "loader of examples")
    with pytest.raises(DataError) as e:
        prepare_data(make(mgr, tmp_path, [pref(max_examples=5), {"loader": "alpaca", "path": str(ALPACA),
                                                                 "max_examples": 5}]), tok, mgr)
    assert str(e.value) == ("data.datasets[1] (alpaca): loader 'alpaca' gives examples (rows), but trainer "
                            "'pairs_test' trains on preference pairs (data form \"pairs\"); use a loader of pairs "
                            "such as 'preference'")
    # the form passed by a caller that already has the trainer's plan wins over asking the trainer again
    assert prepare_data(make(mgr, tmp_path, [pref(max_examples=5)], trainer="sft"), tok, mgr, form="pairs").form == "pairs"


def test_settings_that_do_not_apply_to_pairs_are_refused(mgr, tmp_path, tok):
    with pytest.raises(DataError, match=r"^data\.streaming: not available for preference pairs"):
        prepare_data(make(mgr, tmp_path, [pref(max_examples=5)], training={"max_steps": 2}, streaming=True), tok, mgr)
    with pytest.raises(DataError, match=r"^data\.train_on_inputs, data\.pad_to_max_length: not available"):
        prepare_data(make(mgr, tmp_path, [pref(max_examples=5)], train_on_inputs=True, pad_to_max_length=True,
                          packing=False), tok, mgr)
    with pytest.raises(DataError, match=r"^data\.max_prompt_length applies to preference pairs; trainer 'sft'"):
        prepare_data(make(mgr, tmp_path, [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 5}], trainer="sft",
                          max_prompt_length=10), tok, mgr)
    # packing (on by default) applies to rows only: pairs are never packed, and the stats say so
    p = prepare_data(make(mgr, tmp_path, [pref(max_examples=5)], packing=True), tok, mgr)
    assert p.stats["settings"]["packing"] is False and all("position_ids" not in row for row in p.validation_unpacked)


def test_a_malformed_pair_from_any_loader_is_one_line(mgr, tmp_path, tok):
    def bad(options, ctx):
        return LoadedData(train=[PreferencePair("Q", "A", "B"), PreferencePair("Q", "A", "A")])

    register("dataset", "bad_pairs", bad, manager=mgr)
    with pytest.raises(DataError) as e:
        prepare_data(make(mgr, tmp_path, [{"loader": "bad_pairs"}]), tok, mgr)
    assert str(e.value) == ("data.datasets[0] (bad_pairs) pair 1: fields 'chosen' and 'rejected' are the same "
                            "response (loader 'bad_pairs')")


# -- ftk data preview / stats ------------------------------------------------------------------------
def test_preview_and_stats_show_pairs_as_the_model_sees_them(mgr, tmp_path, tok, monkeypatch, capsys):
    import ftk.manager
    from ftk.cli import main

    monkeypatch.setattr(ftk.manager, "get_manager", lambda *a, **k: mgr)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"model": {"name": str(MODEL_DIR)}, "trainer": {"method": "pairs_test"},
                                "data": {"datasets": [pref(max_examples=40)], "max_length": 128,
                                         "cache_dir": str(tmp_path / "cache")}}))

    def cli(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        assert e.value.code == 0
        return capsys.readouterr().out

    p = prepare_data(load_recipe(str(path), [], manager=mgr), tok, mgr)
    whole = _by_index(prepare_data(load_recipe(str(path), ["data.max_length=4096"], manager=mgr), tok, mgr))
    items = json.loads(cli("data", "preview", str(path), "-n", "12", "--json"))
    assert len(items) == 12 and any(it["truncated"] for it in items)
    for it, ref, f in zip(items, p.train_refs, p.train):
        assert it["example"] == ref.name and it["source"] == "preference"
        assert {k: it[k] for k in f} == f
        assert it["chosen"] == tok.decode(f["chosen_ids"]) and it["prompt"].rstrip().endswith("\nAssistant:")
        assert it["prompt"].startswith("<s> User:" if not it["truncated"] else "<s>")
        assert it["truncated"] == (f != whole[pair_index(ref.name)])
    out = cli("data", "preview", str(path), "-n", "1")
    it = items[0]
    np_, nc, nr = (len(it[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert out.startswith(f"=== {it['example']} (preference{', truncated' if it['truncated'] else ''}): prompt {np_} "
                          f"tokens (masked), chosen {nc}, rejected {nr} (sequences of {np_ + nc} and {np_ + nr})\n")
    assert f"[[{tok.decode(it['prompt_ids'])}]]\n" in out
    assert f"--- chosen: {tok.decode(it['chosen_ids'])}\n" in out and f"--- rejected: {tok.decode(it['rejected_ids'])}\n" in out
    stats = cli("data", "stats", str(path))
    assert stats.splitlines()[1].split()[:3] == ["preference", str(len(p.train)), str(len(p.validation))]
    assert f"train: {len(p.train)} pairs (preference {len(p.train)})" in stats and "pairs are not packed" in stats
    assert json.loads(cli("data", "stats", str(path), "--json"))["truncated"] == p.stats["truncated"] > 0

"""The data pipeline on the shared real data: rendering, label masks, EOS, splits, mixing, packing
(loss-equal to unpacked on the real model), truncation, caching, chat templates, class loaders."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ALPACA, DAILYDIALOG, MODEL_DIR

from ftk.data import IGNORE, prepare_data, prepare_tokenizer
from ftk.errors import DataError, PluginFailure
from ftk.recipe import load_recipe

ROWS = json.loads(ALPACA.read_text())


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL_DIR))


def make(manager, tmp_path, datasets, **data):
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return load_recipe(data={"model": {"name": str(MODEL_DIR)}, "data": {"datasets": datasets, **data}},
                       manager=manager, base_dir=tmp_path)


def alpaca(n=None, **kw):
    return {"loader": "alpaca", "path": str(ALPACA), **({"max_examples": n} if n else {}), **kw}


def trained_ids(feature):
    return [t for t, lab in zip(feature["input_ids"], feature["labels"]) if lab != IGNORE]


def test_prepare_tokenizer_pads_with_unk_not_eos(tok):
    assert tok.pad_token == tok.unk_token and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    n = len(tok)
    prepare_tokenizer(tok)
    assert len(tok) == n and tok.pad_token == "<unk>"


def test_alpaca_rendering_masks_and_eos(fresh_manager, tmp_path, tok):
    r = make(fresh_manager, tmp_path, [alpaca(40)], packing=False, validation_size=0)
    p = prepare_data(r, tok, fresh_manager)
    exs = p.examples["alpaca"]
    assert len(exs) == 40 and len(p.train) == 40
    rec = ROWS[0]  # has an input
    assert exs[0].text == (f"### Instruction:\n{rec['instruction']}\n\n### Input:\n{rec['input']}\n\n"
                           f"### Response:\n{rec['output']}")
    no_input = next(i for i, r_ in enumerate(ROWS[:40]) if not r_["input"])
    assert exs[no_input].text == f"### Instruction:\n{ROWS[no_input]['instruction']}\n\n### Response:\n{ROWS[no_input]['output']}"
    # reference: plain tokenizer over the whole text; trained tokens are exactly the response + EOS
    for ref in p.train_refs[:10]:
        k = int(ref.name.split("#")[1])
        f = next(f for f in p.train if f["example_ids"] == [ref.name])
        prompt = exs[k].prompt
        want = tok(prompt + ROWS[k]["output"])["input_ids"] + [tok.eos_token_id]
        assert f["input_ids"] == want[:512]
        n_prompt = len(tok(prompt)["input_ids"])
        assert trained_ids(f) == want[n_prompt:512]
        if len(want) <= 512:
            assert f["labels"][-1] == tok.eos_token_id  # EOS is learned, never masked as padding


def test_validation_split_is_seeded_and_counted(fresh_manager, tmp_path, tok):
    a = prepare_data(make(fresh_manager, tmp_path, [alpaca()], seed=3), tok, fresh_manager)
    b = prepare_data(make(fresh_manager, tmp_path, [alpaca()], seed=3), tok, fresh_manager)
    c = prepare_data(make(fresh_manager, tmp_path, [alpaca()], seed=4), tok, fresh_manager)
    assert a.stats["datasets"][0]["examples"]["validation"] == 100  # 5% of 2,000
    assert a.stats["datasets"][0]["examples"]["train"] + a.stats["dropped"]["no_trainable_tokens"] == 1900
    assert a.eval_pairs == b.eval_pairs and a.eval_pairs != c.eval_pairs
    assert len(a.eval_pairs) == 100
    counts = prepare_data(make(fresh_manager, tmp_path, [alpaca()], validation_size=7), tok, fresh_manager)
    assert counts.stats["validation"]["examples"] == 7
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_truncate_and_drop_counts_match_plain_tokenizer(fresh_manager, tmp_path, tok):
    n = 300
    lens = [len(tok(ex_text)["input_ids"]) + 1 for ex_text in
            (f"### Instruction:\n{r['instruction']}\n\n" + (f"### Input:\n{r['input']}\n\n" if r["input"] else "")
             + f"### Response:\n{r['output']}" for r in ROWS[:n])]
    too_long = sum(x > 128 for x in lens)
    assert too_long > 0
    t = prepare_data(make(fresh_manager, tmp_path, [alpaca(n)], max_length=128, validation_size=0), tok, fresh_manager)
    st = t.stats["datasets"][0]
    assert st["truncated"] + st["dropped"]["no_trainable_tokens"] == too_long
    assert max(len(f["input_ids"]) for f in t.train) <= 128
    d = prepare_data(make(fresh_manager, tmp_path, [alpaca(n)], max_length=128, validation_size=0,
                          truncation="drop"), tok, fresh_manager)
    assert d.stats["dropped"]["too_long"] == too_long and d.stats["train"]["examples"] == n - too_long
    assert t.stats["tokens"]["max"] == max(lens) and t.stats["tokens"]["mean"] == round(float(np.mean(lens)), 1)


def test_train_on_inputs_trains_everything_but_the_first_token(fresh_manager, tmp_path, tok):
    p = prepare_data(make(fresh_manager, tmp_path, [alpaca(5)], packing=False, validation_size=0,
                          train_on_inputs=True), tok, fresh_manager)
    for f in p.train:
        assert f["labels"][0] == IGNORE and f["labels"][1:] == f["input_ids"][1:]


def test_no_trainable_label_is_an_error_naming_examples(fresh_manager, tmp_path, tok):
    # max_length so short that the prompt fills it: no response token survives truncation
    with pytest.raises(DataError, match=r"no example has a trainable label.*alpaca#0"):
        prepare_data(make(fresh_manager, tmp_path, [alpaca(3)], max_length=8, validation_size=0), tok, fresh_manager)
    p = prepare_data(make(fresh_manager, tmp_path, [alpaca(3)], packing=False, validation_size=0), tok, fresh_manager)
    feats = [dict(p.train[0]), dict(p.train[1])]
    for f in feats:
        f["labels"] = [IGNORE] * len(f["labels"])
    with pytest.raises(DataError, match=r"batch has no trainable label.*alpaca#"):
        p.collator(feats)


def test_dynamic_padding_and_pad_to_max_length(fresh_manager, tmp_path, tok):
    p = prepare_data(make(fresh_manager, tmp_path, [alpaca(8)], packing=False, validation_size=0), tok, fresh_manager)
    feats = [p.train[i] for i in range(4)]
    b = p.collator(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert b["input_ids"].shape == (4, longest) and "position_ids" not in b
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        assert b["attention_mask"][i].sum() == k and (b["labels"][i, k:] == IGNORE).all()
        assert (b["input_ids"][i, k:] == tok.pad_token_id).all()
    r = make(fresh_manager, tmp_path, [alpaca(8)], packing=False, pad_to_max_length=True, max_length=600)
    assert prepare_data(r, tok, fresh_manager).collator(feats)["input_ids"].shape == (4, 600)


def test_packing_gives_the_same_loss_as_unpacked_on_the_real_model(fresh_manager, tmp_path, tok):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    kw = dict(validation_size=0, max_length=256, seed=1)
    packed = prepare_data(make(fresh_manager, tmp_path, [alpaca(12)], packing=True, **kw), tok, fresh_manager)
    plain = prepare_data(make(fresh_manager, tmp_path, [alpaca(12)], packing=False, **kw), tok, fresh_manager)
    assert len(packed.train) < len(plain.train) == 12
    pf = list(packed.train)
    assert any(len(f["example_ids"]) > 1 for f in pf)
    for f in pf:  # positions restart per example; each example's first label is masked
        starts = [i for i, p_ in enumerate(f["position_ids"]) if p_ == 0]
        assert len(starts) == len(f["example_ids"]) and all(f["labels"][s] == IGNORE for s in starts)
    with torch.no_grad():
        lp = model(**packed.collator(pf), use_cache=False).loss
        lu = model(**plain.collator(list(plain.train)), use_cache=False).loss
    assert lp.item() == pytest.approx(lu.item(), abs=1e-5)
    # and the packed rows really are a set of separate examples: the same tokens unpacked, regrouped
    assert sorted(sum((f["example_ids"] for f in pf), [])) == sorted(f["example_ids"][0] for f in plain.train)
    assert packed.stats["padding_waste"]["packed"] < packed.stats["padding_waste"]["unpacked"]


def test_cache_hit_skips_tokenization_and_gives_identical_rows(fresh_manager, tmp_path, tok, monkeypatch):
    import ftk.datacache as data_mod  # cached_tokenize looks tokenize_examples up there

    r = make(fresh_manager, tmp_path, [alpaca(200)])
    first = prepare_data(r, tok, fresh_manager)
    assert first.stats["datasets"][0]["cache"] == "miss"
    assert list((tmp_path / "cache" / "data").iterdir())

    def boom(*a, **k):
        raise AssertionError("re-tokenized despite the cache")

    monkeypatch.setattr(data_mod, "tokenize_examples", boom)
    second = prepare_data(r, tok, fresh_manager)
    assert second.stats["datasets"][0]["cache"] == "hit"
    assert list(first.train) == list(second.train) and first.fingerprint == second.fingerprint
    # a different setting that changes tokens misses
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_data(make(fresh_manager, tmp_path, [alpaca(200)], train_on_inputs=True), tok, fresh_manager)


def test_cache_dir_from_environment(fresh_manager, tmp_path, tok, monkeypatch):
    monkeypatch.setenv("FTK_CACHE_DIR", str(tmp_path / "envcache"))
    r = make(fresh_manager, tmp_path, [alpaca(5)], cache_dir=None)
    prepare_data(r, tok, fresh_manager)
    assert any((tmp_path / "envcache" / "data").iterdir())


def test_balanced_mixing_with_weights(fresh_manager, tmp_path, tok):
    dd = {"loader": "dailydialog", "path": str(DAILYDIALOG), "max_examples": 30}
    r = make(fresh_manager, tmp_path, [alpaca(100), dd], mixing="balanced", validation_size=0.1)
    st = prepare_data(r, tok, fresh_manager).stats
    n_a = st["datasets"][0]["examples"]["train"]
    assert st["train"]["per_dataset"] == {"alpaca": n_a, "dailydialog": n_a}
    r = make(fresh_manager, tmp_path, [alpaca(100), {**dd, "weight": 0.5}], mixing="balanced", validation_size=0.1)
    assert prepare_data(r, tok, fresh_manager).stats["train"]["per_dataset"]["dailydialog"] == round(n_a / 2)
    r = make(fresh_manager, tmp_path, [alpaca(100), dd], mixing="balanced", balance_to="smallest")
    assert prepare_data(r, tok, fresh_manager).stats["train"]["per_dataset"] == {"alpaca": 30, "dailydialog": 30}
    r = make(fresh_manager, tmp_path, [alpaca(100), dd], mixing="concat", validation_size=0.1)
    c = prepare_data(r, tok, fresh_manager).stats
    assert c["train"]["per_dataset"] == {"alpaca": 90, "dailydialog": 30}  # dailydialog has its own validation


CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def test_chat_template_trains_only_assistant_turns(fresh_manager, tmp_path):
    from transformers import AutoTokenizer

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL_DIR))
    tok.chat_template = CHAT
    dd = {"loader": "dailydialog", "path": str(DAILYDIALOG), "max_examples": 4, "template": "chat"}
    p = prepare_data(make(fresh_manager, tmp_path, [dd], packing=False, max_length=2048), tok, fresh_manager)
    ex = p.examples["dailydialog"][0]
    msgs = ex.messages
    assert ex.text == tok.apply_chat_template(msgs, tokenize=False)
    f = next(f for f in p.train if f["example_ids"] == ["dailydialog#0"])
    assert f["input_ids"] == tok(ex.text, add_special_tokens=False)["input_ids"]  # BOS/EOS from the template only
    trained = tok.decode(trained_ids(f))
    for m in msgs:
        if m["role"] == "assistant":
            assert m["content"] in trained
        else:
            assert m["content"] not in trained
    assert trained.count(tok.eos_token) == sum(m["role"] == "assistant" for m in msgs)
    prompt, ref = p.eval_pairs[0]
    val0 = p.examples["dailydialog"][4]  # first validation dialogue (4 train examples come first)
    last = max(i for i, m in enumerate(val0.messages) if m["role"] == "assistant")
    assert prompt == tok.apply_chat_template(val0.messages[:last], tokenize=False, add_generation_prompt=True)
    assert ref == val0.messages[last]["content"]


def test_chat_template_missing_is_a_clear_error(fresh_manager, tmp_path, tok):
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        prepare_data(make(fresh_manager, tmp_path, [alpaca(3, template="chat")]), tok, fresh_manager)


def test_seed_style_loader_class_as_a_plugin(tmp_path, tok):
    from ftk.data import loader_from_class
    from ftk.errors import PluginFailure
    from ftk.hookspecs import hookimpl
    from ftk.manager import FtkPluginManager

    class MyLoader:  # the seed's extension shape
        def __init__(self, tokenizer, max_length):
            self.tokenizer, self.max_length = tokenizer, max_length

        def load(self):
            from datasets import Dataset, DatasetDict

            rows = ROWS[:20]
            cols = {k: [r[k] for r in rows] for k in ("instruction", "input", "output")}
            return DatasetDict({"train": Dataset.from_dict({k: v[:16] for k, v in cols.items()}),
                                "validation": Dataset.from_dict({k: v[16:] for k, v in cols.items()})})

    class Plugin:
        @hookimpl
        def ftk_register_datasets(self, register):
            register("mine", loader_from_class(MyLoader), description="a seed-style class loader")

    mgr = FtkPluginManager(load_entrypoints=True)
    mgr.register(Plugin(), name="mine-plugin")
    p = prepare_data(make(mgr, tmp_path, [{"loader": "mine"}], packing=False), tok, mgr)
    assert p.stats["datasets"][0]["examples"] == {"train": 16, "validation": 4}
    assert p.stats["datasets"][0]["validation_from"] == "own split"
    assert p.eval_pairs[0] == (p.examples["mine"][16].prompt, ROWS[16]["output"])


def test_streaming_yields_packed_rows_and_holds_out_validation(fresh_manager, tmp_path, tok):
    r = load_recipe(data={"model": {"name": str(MODEL_DIR)},
                          "data": {"datasets": [alpaca(60)], "streaming": True, "validation_size": 10},
                          "training": {"max_steps": 2}}, manager=fresh_manager, base_dir=tmp_path)
    p = prepare_data(r, tok, fresh_manager)
    rows = list(p.train)
    names = sum((f["example_ids"] for f in rows), [])
    assert p.stats["validation"]["examples"] == 10 and len(names) == 50 - sum(p.stats["train"]["dropped"].values())
    assert sorted(names, key=lambda x: int(x.split("#")[1])) == [f"alpaca#{k}" for k in range(10, 60)
                                                                 if f"alpaca#{k}" in names]
    assert all(len(f["input_ids"]) <= 512 for f in rows) and "position_ids" in rows[0]
    assert len(p.eval_pairs) == 10



def test_streaming_counts_skipped_records_as_the_stream_is_read(fresh_manager, tmp_path, tok):
    src = tmp_path / "s.jsonl"
    good = [json.dumps(r) for r in ROWS[:1100]]
    src.write_text("\n".join(good[:1050] + ["not json"] + good[1050:]) + "\n")  # the bad line is in chunk 2
    r = load_recipe(data={"model": {"name": str(MODEL_DIR)},
                          "data": {"datasets": [{"loader": "custom", "path": str(src), "on_error": "skip"}],
                                   "streaming": True, "validation_size": 0},
                          "training": {"max_steps": 2}}, manager=fresh_manager, base_dir=tmp_path)
    p = prepare_data(r, tok, fresh_manager)
    list(p.train)
    assert p.stats["skipped"] == {"invalid_json": 1} and p.stats["train"]["examples"] > 1024


def test_prepared_rows_cache_skips_loading_until_a_source_changes(fresh_manager, tmp_path, tok, monkeypatch):
    import json as _json
    import os

    rows = _json.loads(ALPACA.read_text())[:60]
    src = tmp_path / "mine.json"
    src.write_text(_json.dumps(rows))
    r = make(fresh_manager, tmp_path, [{"loader": "alpaca", "path": str(src)}])
    first = prepare_data(r, tok, fresh_manager)
    comp = fresh_manager.get("dataset", "alpaca")
    calls = []
    orig = comp.factory
    monkeypatch.setattr(comp, "factory", lambda o, c: calls.append(1) or orig(o, c))
    second = prepare_data(r, tok, fresh_manager)
    assert calls == []  # served from the prepared-rows cache: the file was not parsed again
    assert list(first.train) == list(second.train) and list(first.validation) == list(second.validation)
    assert first.eval_pairs == second.eval_pairs and first.fingerprint == second.fingerprint
    src.write_text(_json.dumps(rows[:50]))  # a changed source is noticed (size and mtime)
    os.utime(src, ns=(1, 1))
    third = prepare_data(r, tok, fresh_manager)
    assert calls == [1]
    total = lambda p: sum(len(x["input_ids"]) for x in p.train) + sum(len(x["input_ids"]) for x in p.validation)
    assert total(third) < total(first)


def test_prepared_rows_cache_checks_files_a_loader_declares(tmp_path, tok):
    """A loader that reads a file its options do not name declares it (LoadedData.source_files); a
    loader whose data ftk cannot check (reusable=False, e.g. seed-style classes) is rebuilt each run."""
    import os

    from ftk.components import Example, LoadedData, Segment
    from ftk.data import loader_from_class
    from ftk.hookspecs import hookimpl
    from ftk.manager import FtkPluginManager

    index = tmp_path / "elsewhere" / "index.txt"  # not named by the recipe entry
    index.parent.mkdir()
    index.write_text("\n".join(f"word{i}" for i in range(30)))
    calls = []

    def load_indexed(options, ctx):
        calls.append("indexed")
        words = index.read_text().split()
        train = [Example(segments=[Segment(f"Say {w}: ", train=False), Segment(w, train=True)]) for w in words]
        return LoadedData(train=train, fingerprint="indexed", source_files=[str(index)])

    class SeedStyle:
        def __init__(self, tokenizer, max_length):
            pass

        def load(self):
            from datasets import Dataset, DatasetDict

            calls.append("seed")
            rows = ROWS[:12]
            return DatasetDict({"train": Dataset.from_dict({k: [r[k] for r in rows]
                                                            for k in ("instruction", "input", "output")})})

    class Plugin:
        @hookimpl
        def ftk_register_datasets(self, register):
            register("indexed", load_indexed, description="words from an index file")
            register("seedstyle", loader_from_class(SeedStyle), description="a seed-style class")

    mgr = FtkPluginManager(load_entrypoints=True)
    mgr.register(Plugin(), name="indexed-plugin")
    r = make(mgr, tmp_path, [{"loader": "indexed"}], validation_size=0)
    first = prepare_data(r, tok, mgr)
    second = prepare_data(r, tok, mgr)
    assert calls == ["indexed"] and list(first.train) == list(second.train)  # second run: cache hit
    index.write_text("\n".join(f"other{i}" for i in range(10)))
    os.utime(index, ns=(1, 1))
    third = prepare_data(r, tok, mgr)
    assert calls == ["indexed", "indexed"]  # the declared file changed: loaded again
    assert third.stats["train"]["examples"] == 10 < first.stats["train"]["examples"]
    index.unlink()
    # gone: no stale rows served, the loader runs (and fails, attributed to its plugin)
    with pytest.raises(PluginFailure, match=r"plugin 'indexed-plugin' .*dataset 'indexed', while loading data: "
                                            r"FileNotFoundError") as e:
        prepare_data(r, tok, mgr)
    assert isinstance(e.value.__cause__, FileNotFoundError)

    calls.clear()
    r = make(mgr, tmp_path, [{"loader": "seedstyle"}], validation_size=0)
    prepare_data(r, tok, mgr)
    prepare_data(r, tok, mgr)
    assert calls == ["seed", "seed"]


def test_streaming_and_in_memory_keep_and_name_the_same_examples(fresh_manager, tmp_path, tok):
    """Same data both ways (DailyDialog with its own validation split, truncation "drop", unpacked rows):
    the same examples survive, under the same names (#k train as loaded, #vj own validation)."""
    def prep(streaming):
        r = load_recipe(data={"model": {"name": str(MODEL_DIR)},
                              "data": {"datasets": [{"loader": "dailydialog", "path": str(DAILYDIALOG),
                                                     "max_examples": 40}],
                                       "max_length": 128, "truncation": "drop", "packing": False,
                                       "streaming": streaming, "cache": False},
                              "training": {"max_steps": 2}}, manager=fresh_manager, base_dir=tmp_path)
        return prepare_data(r, tok, fresh_manager)

    mem, stream = prep(False), prep(True)
    ids = lambda rows: [x for f in rows for x in f["example_ids"]]
    assert sorted(ids(mem.train)) == sorted(ids(stream.train)) and ids(mem.train)
    assert ids(mem.validation) == ids(stream.validation) and ids(mem.validation)[0].startswith("dailydialog#v")
    assert len(ids(mem.validation)) < 40  # over-long validation dialogues dropped both ways
    assert mem.eval_pairs == stream.eval_pairs

"""Already-tokenized rows (issue 14, spec 8.1): a seed-style loader class tokenizes real Alpaca records
itself with the real stories260K tokenizer and returns input_ids (labels, attention_mask); ftk trains on
exactly those ids and labels, truncated, packed with text rows, cached by content, shown by
`ftk data preview`; bad rows stop with one line naming class, split and row, or are skipped and counted."""
from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import ALPACA, MODEL_DIR

from ftk.components import Example, LoadedData
from ftk.data import IGNORE, loader_from_class, prepare_data, prepare_tokenizer
from ftk.errors import DataError
from ftk.hookspecs import hookimpl
from ftk.manager import FtkPluginManager
from ftk.recipe import load_recipe

ROWS = json.loads(ALPACA.read_text())


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(MODEL_DIR))


def user_prompt(r: dict) -> str:
    return f"Question: {r['instruction']} {r['input']}".rstrip() + "\nAnswer:"


def user_tokens(tokenizer, rows, labels=True) -> list[dict]:
    """What a spec user's class does: its own prompt format, tokenized with the tokenizer it was given,
    prompt masked with -100, EOS appended."""
    out = []
    for r in rows:
        prompt = user_prompt(r)
        n_prompt = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(f"{prompt} {r['output']}")["input_ids"] + [tokenizer.eos_token_id]
        row = {"input_ids": ids}
        if labels:
            row["labels"] = [IGNORE] * n_prompt + ids[n_prompt:]
        out.append(row)
    return out


def class_loader(make_splits, name="PreTok"):
    """A seed-style class: ``make_splits(tokenizer) -> {split: rows}``, returned as a DatasetDict when the
    rows' columns are uniform (as a user would), else as plain lists of rows."""

    def load(self):
        from datasets import Dataset, DatasetDict

        splits = make_splits(self.tokenizer)
        if not all(isinstance(rows, list) and rows and all(r.keys() == rows[0].keys() for r in rows)
                   for rows in splits.values()):
            return splits
        return DatasetDict({s: Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
                            for s, rows in splits.items()})

    def init(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    return type(name, (), {"__init__": init, "load": load})


def manager_with(**loaders) -> FtkPluginManager:
    class Plugin:
        @hookimpl
        def ftk_register_datasets(self, register):
            for name, factory in loaders.items():
                register(name, factory, description=f"test loader {name}")

    mgr = FtkPluginManager(load_entrypoints=True)
    mgr.register(Plugin(), name="pretok-test-plugin")
    return mgr


def recipe(mgr, tmp_path, datasets, training=None, **data):
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return load_recipe(data={"model": {"name": str(MODEL_DIR)}, "data": {"datasets": datasets, **data},
                             **({"training": training} if training else {})}, manager=mgr, base_dir=tmp_path)


def by_name(rows) -> dict:
    """Unpacked rows by the example they hold."""
    out = {}
    for f in rows:
        assert len(f["example_ids"]) == 1
        out[f["example_ids"][0]] = f
    return out


def first_unlabelled(labels):
    return [IGNORE] + list(labels[1:])


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_rows_are_exactly_what_the_class_returned(tmp_path, tok, with_labels):
    train = user_tokens(tok, ROWS[:24], with_labels)
    val = user_tokens(tok, ROWS[24:30], with_labels)
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": train, "validation": val})))
    p = prepare_data(recipe(mgr, tmp_path, [{"loader": "mine"}], packing=False, max_length=1024), tok, mgr)
    assert max(len(r["input_ids"]) for r in train + val) <= 1024  # nothing truncated here
    got = by_name(p.train)
    assert sorted(got) == sorted(f"mine#{k}" for k in range(24))
    for k, row in enumerate(train):
        f = got[f"mine#{k}"]
        assert f["input_ids"] == row["input_ids"]
        # the user's labels as they are (their first is -100 already); none given: every token trained,
        # but the first (nothing predicts it, as for every example)
        want = row["labels"] if with_labels else first_unlabelled(row["input_ids"])
        assert f["labels"] == want
    assert [f["input_ids"] for f in p.validation] == [r["input_ids"] for r in val]
    assert p.stats["datasets"][0]["examples"] == {"train": 24, "validation": 6}
    assert p.eval_pairs == []  # no prompt/reference: generation metrics have nothing to compare
    # the ids and EOS are the user's, nothing added: exactly one BOS and the EOS the class appended
    assert all(f["input_ids"].count(tok.bos_token_id) == 1 and f["input_ids"][-1] == tok.eos_token_id
               for f in p.train)


@pytest.mark.parametrize("fmt", [None, "numpy", "torch"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_mask_padding_is_dropped(tmp_path, tok, fmt, side):
    texts = [f"{user_prompt(r)} {r['output']}" for r in ROWS[:12]]

    class Padded:
        def __init__(self, tokenizer, max_length):
            self.tokenizer = tokenizer

        def load(self):
            from datasets import Dataset, DatasetDict

            t = copy.deepcopy(self.tokenizer)
            t.padding_side = side
            enc = t(texts, padding="longest")  # one padded batch, as users tokenize
            labels = [[i if m else IGNORE for i, m in zip(ids, mask)] for ids, mask in
                      zip(enc["input_ids"], enc["attention_mask"])]
            ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                    "labels": labels})
            return DatasetDict({"train": ds.with_format(fmt) if fmt else ds})

    mgr = manager_with(padded=loader_from_class(Padded))
    plain = [tok(text)["input_ids"] for text in texts]
    assert len({len(x) for x in plain}) > 1  # the batch really was padded
    p = prepare_data(recipe(mgr, tmp_path, [{"loader": "padded"}], packing=False, validation_size=0), tok, mgr)
    got = by_name(p.train)
    for k, ids in enumerate(plain):
        f = got[f"padded#{k}"]
        assert f["input_ids"] == ids and tok.pad_token_id not in ids
        assert f["labels"] == first_unlabelled(ids)


def test_truncated_at_max_length_or_dropped(tmp_path, tok):
    train = user_tokens(tok, ROWS[:40])
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": train})))
    n = 100
    trainable = {k for k, r in enumerate(train) if any(lab != IGNORE for lab in r["labels"][1:n])}
    longer = {k for k, r in enumerate(train) if len(r["input_ids"]) > n}
    assert longer and trainable and longer - trainable and longer & trainable  # every case is present
    p = prepare_data(recipe(mgr, tmp_path, [{"loader": "mine"}], packing=False, validation_size=0, max_length=n),
                     tok, mgr)
    got = by_name(p.train)
    assert sorted(got) == sorted(f"mine#{k}" for k in trainable)
    for k in trainable:
        assert got[f"mine#{k}"]["input_ids"] == train[k]["input_ids"][:n]
        assert got[f"mine#{k}"]["labels"] == train[k]["labels"][:n]
    st = p.stats["datasets"][0]
    assert st["truncated"] == len(longer & trainable)
    assert st["dropped"] == {"no_trainable_tokens": 40 - len(trainable)}
    assert st["tokens"]["max"] == max(len(r["input_ids"]) for r in train)  # counted before truncation
    d = prepare_data(recipe(mgr, tmp_path, [{"loader": "mine"}], packing=False, validation_size=0, max_length=n,
                            truncation="drop"), tok, mgr)
    assert sorted(by_name(d.train)) == sorted(f"mine#{k}" for k in set(range(40)) - longer)
    assert d.stats["dropped"]["too_long"] == len(longer)


def test_packed_together_with_alpaca_text_rows(tmp_path, tok):
    train = user_tokens(tok, ROWS[100:120])
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": train})))
    r = recipe(mgr, tmp_path, [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 40}, {"loader": "mine"}],
               mixing="balanced", packing=True, validation_size=0, max_length=512)
    p = prepare_data(r, tok, mgr)
    n_a = p.stats["datasets"][0]["examples"]["train"]
    assert p.stats["train"]["per_dataset"] == {"alpaca": n_a, "mine": n_a}  # balanced: mine repeated
    rows = list(p.train)
    assert any({n.split("#")[0] for n in f["example_ids"]} == {"alpaca", "mine"} for f in rows)
    seen = 0
    for f in rows:  # split each packed row at its position restarts: every mine# piece is the class's row
        starts = [i for i, pos in enumerate(f["position_ids"]) if pos == 0] + [len(f["input_ids"])]
        assert len(starts) - 1 == len(f["example_ids"])
        for name, a, b in zip(f["example_ids"], starts, starts[1:]):
            if name.startswith("mine#"):
                want = train[int(name.split("#")[1])]
                assert f["input_ids"][a:b] == want["input_ids"][:512] and f["labels"][a:b] == want["labels"][:512]
                seen += 1
            else:
                assert f["labels"][a] == IGNORE and any(lab != IGNORE for lab in f["labels"][a:b])
    assert seen == n_a


def test_streaming_gives_the_same_rows(tmp_path, tok):
    train = user_tokens(tok, ROWS[:20])
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": train})))
    kw = dict(packing=False, validation_size=0, max_length=128, cache=False)
    mem = prepare_data(recipe(mgr, tmp_path, [{"loader": "mine"}], **kw), tok, mgr)
    stream = prepare_data(recipe(mgr, tmp_path, [{"loader": "mine"}], {"max_steps": 2}, streaming=True, **kw), tok, mgr)
    assert by_name(stream.train) == by_name(mem.train) and len(mem.train) > 10


# (case, how row 2 of the split is broken, skip reason, what the one line says)
BAD = [
    ("empty", lambda r: {"input_ids": []}, "empty_input_ids", r"input_ids is empty"),
    ("floats", lambda r: {"input_ids": [float(x) for x in r["input_ids"]]}, "non_int_input_ids",
     r"input_ids must be a list of ints; input_ids\[0\] is 1\.0 \(float\)"),
    ("strings", lambda r: {"input_ids": "hello"}, "non_int_input_ids", r"input_ids must be a list of ints, got str"),
    ("nested", lambda r: {"input_ids": [r["input_ids"]]}, "non_int_input_ids", r"input_ids\[0\] is \[1, "),
    ("labels-length", lambda r: {**r, "labels": r["labels"][:-1]}, "labels_length",
     r"labels has \d+ entries for \d+ input_ids"),
    ("labels-shifted", lambda r: {**r, "labels": r["labels"][1:] + [IGNORE]}, "labels_not_ids",
     r"labels\[\d+\] is \d+ but input_ids\[\d+\] is \d+"),
    ("all-untrained", lambda r: {**r, "labels": [IGNORE] * len(r["labels"])}, "no_trained_tokens",
     r"no token after the first is trained"),
    ("out-of-vocab", lambda r: {**r, "input_ids": r["input_ids"][:3] + [512] + r["input_ids"][4:]},
     "id_out_of_vocabulary", r"input_ids\[3\] is 512, outside the tokenizer's vocabulary \(0\.\.511\)"),
    ("negative-id", lambda r: {**r, "input_ids": [-1] + r["input_ids"][1:]}, "id_out_of_vocabulary",
     r"input_ids\[0\] is -1, outside"),
    ("mask-length", lambda r: {**r, "attention_mask": [1] * (len(r["input_ids"]) + 2)}, "attention_mask_length",
     r"attention_mask has \d+ entries for \d+ input_ids"),
    ("mask-values", lambda r: {**r, "attention_mask": [2] * len(r["input_ids"])}, "bad_attention_mask",
     r"attention_mask must hold only 0 \(padding\) and 1"),
]


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("case,broken,reason,says", BAD, ids=[c[0] for c in BAD])
def test_bad_rows_stop_with_one_line_or_are_counted(tmp_path, tok, case, broken, reason, says, split):
    splits = {"train": user_tokens(tok, ROWS[:8]), "validation": user_tokens(tok, ROWS[8:12])}
    splits[split][2] = broken(splits[split][2])
    mgr = manager_with(bad=loader_from_class(class_loader(lambda t: splits, name="BadLoader")))
    with pytest.raises(DataError) as e:
        prepare_data(recipe(mgr, tmp_path, [{"loader": "bad"}]), tok, mgr)
    msg = str(e.value)
    assert "\n" not in msg and re.match(rf"BadLoader {split} row 2: .*{says}", msg), msg
    p = prepare_data(recipe(mgr, tmp_path, [{"loader": "bad"}], on_error="skip"), tok, mgr)
    st = p.stats["datasets"][0]
    assert st["skipped"] == {reason: 1}
    assert st["examples"]["train"] + st["examples"]["validation"] + sum(st["dropped"].values()) == 11


def test_any_loader_may_give_tokenized_examples_and_the_core_checks_them(tmp_path, tok):
    rows = user_tokens(tok, ROWS[:6])
    given = {"ids": [r["input_ids"] for r in rows]}

    def raw(options, ctx):  # a plain factory, not a class: Example(token_ids=..., token_labels=...) itself
        train = [Example(token_ids=ids, token_labels=r["labels"]) for ids, r in zip(given["ids"], rows)]
        return LoadedData(train=train, fingerprint="raw", reusable=False)

    mgr = manager_with(raw=raw)
    p = prepare_data(recipe(mgr, tmp_path, [{"loader": "raw"}], packing=False, validation_size=0), tok, mgr)
    assert [by_name(p.train)[f"raw#{k}"]["labels"] for k in range(6)] == [r["labels"] for r in rows]
    given["ids"][1] = rows[1]["input_ids"][:-1] + [5]  # the labels still say the EOS
    with pytest.raises(DataError, match=r"^data\.datasets\[0\] \(raw\) example 1: labels\[\d+\] is \d+ but input_ids"):
        prepare_data(recipe(mgr, tmp_path, [{"loader": "raw"}]), tok, mgr)
    given["ids"][1] = [len(tok) + 7] + rows[1]["input_ids"][1:]
    with pytest.raises(DataError, match=r"^data\.datasets\[0\] \(raw\) example 1: input_ids\[0\] is 519, "
                                        r"outside the tokenizer's vocabulary \(0\.\.511\)"):
        prepare_data(recipe(mgr, tmp_path, [{"loader": "raw"}]), tok, mgr)


def test_cache_misses_when_ids_or_labels_change(tmp_path, tok):
    train = user_tokens(tok, ROWS[:30])
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": copy.deepcopy(train)})))
    r = recipe(mgr, tmp_path, [{"loader": "mine"}], packing=False, validation_size=0)

    def run():
        p = prepare_data(r, tok, mgr)
        return p.stats["datasets"][0]["cache"], by_name(p.train)

    assert run()[0] == "miss"
    assert run()[0] == "hit"
    assert train[3]["labels"][2] == IGNORE
    train[3]["input_ids"][2] = (train[3]["input_ids"][2] + 1) % 512  # one prompt id changed, labels the same
    cache, rows = run()
    assert cache == "miss" and rows["mine#3"]["input_ids"] == train[3]["input_ids"]
    assert run()[0] == "hit"
    train[5]["labels"][-2] = IGNORE  # one label changed, ids the same
    cache, rows = run()
    assert cache == "miss" and rows["mine#5"]["labels"] == train[5]["labels"]


def test_data_preview_shows_a_pretokenized_row(tmp_path, tok, monkeypatch, capsys):
    import ftk.manager
    from ftk.cli import main

    train = user_tokens(tok, ROWS[:3])
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": train})))
    monkeypatch.setattr(ftk.manager, "get_manager", lambda *a, **k: mgr)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"model": {"name": str(MODEL_DIR)},
                                "data": {"datasets": [{"loader": "mine"}], "packing": False, "validation_size": 0,
                                         "cache_dir": str(tmp_path / "cache")}}))

    def preview(*args):
        with pytest.raises(SystemExit) as e:
            main(["data", "preview", str(path), *args])
        assert e.value.code == 0
        return capsys.readouterr().out

    items = json.loads(preview("-n", "3", "--json"))
    assert [it["pretokenized"] for it in items] == [True] * 3
    for it in items:
        row = train[int(it["example"].split("#")[1])]
        assert it["input_ids"] == row["input_ids"] and it["labels"] == row["labels"]
        assert it["text"] == tok.decode(row["input_ids"]) and it["source"] == "mine"
    out = preview("-n", "1")
    it = items[0]
    row = train[int(it["example"].split("#")[1])]
    n_prompt = next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE)
    trained = sum(lab != IGNORE for lab in row["labels"])
    assert f"=== {it['example']} (mine, pre-tokenized): {len(row['input_ids'])} tokens, {trained} trained" in out
    prompt, response = tok.decode(row["input_ids"][:n_prompt]), tok.decode(row["input_ids"][n_prompt:])
    assert prompt.startswith("<s> Question:") and response.endswith("</s>")
    assert f"[[{prompt}]]{response}" in out  # the masked prompt bracketed, the trained answer plain


def test_training_on_pretokenized_rows_moves_the_adapter(tmp_path, tok):
    import torch

    from ftk import model as M
    from ftk import train as T

    torch.set_num_threads(1)
    train = user_tokens(tok, ROWS[:24])
    mgr = manager_with(mine=loader_from_class(class_loader(lambda t: {"train": train})))
    r = load_recipe(data={
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"datasets": [{"loader": "mine"}], "max_length": 64, "validation_size": 0, "cache": False},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0,
                     "precision": "fp32", "report_to": ["none"]},
        "output_dir": str(tmp_path / "out")}, manager=mgr, base_dir=tmp_path)
    tokenizer = M.load_tokenizer(r)
    prepared = prepare_data(r, tokenizer, mgr)
    model, _ = M.load_model(r, mgr, tokenizer)
    batch = prepared.collator(list(prepared.train)[:4])

    def loss():
        model.train()
        with torch.enable_grad():
            return model(**batch).loss.item()

    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    loss_before = loss()
    metrics = T.train(model, tokenizer, prepared, r, mgr, str(tmp_path / "out"))
    after = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert metrics["steps"] == 4 and len(before) == 10
    assert not [n for n in before if torch.equal(before[n], after[n])]
    assert loss() < loss_before
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()

"""The sharegpt loader, exercised the way ftk runs it: options validated against its schema,
defaults filled, paths resolved, then the factory called (ftk.testing.load_dataset)."""
import json
from pathlib import Path

import pytest

import ftk_sharegpt.plugin
from ftk.errors import DataError, FtkError
from ftk.testing import load_dataset

DATA = Path(__file__).parent / "data"
SHAREGPT = DATA / "sample_sharegpt.json"
MESSAGES = DATA / "sample_messages.jsonl"


@pytest.fixture
def mgr(fresh_manager, register_plugin):
    register_plugin(ftk_sharegpt.plugin)
    return fresh_manager


def _load(mgr, **opts):
    return load_dataset(mgr, {"loader": "sharegpt", **opts}, base_dir=DATA)


def test_sharegpt_roles_mapped_and_loss_on_assistant_only(mgr):
    raw = json.loads(SHAREGPT.read_text())
    data = _load(mgr, path="sample_sharegpt.json")  # relative: resolved against base_dir
    assert len(data.train) == len(raw)
    for rec, ex in zip(raw, data.train):
        want_roles = [{"human": "user", "gpt": "assistant", "system": "system"}[t["from"]] for t in rec["conversations"]]
        assert [m["role"] for m in ex.messages] == want_roles
        assert [m["content"] for m in ex.messages] == [t["value"] for t in rec["conversations"]]
        replies = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        # trained text is exactly the replies; every other word (user, system, prefixes) is masked
        assert "".join(s.text for s in ex.segments if s.train) == "".join(r + "\n" for r in replies)
        masked = "".join(s.text for s in ex.segments if not s.train)
        for t in rec["conversations"]:
            if t["from"] != "gpt":
                assert t["value"] in masked
        assert ex.reference == replies[-1]
        assert ex.text == ex.prompt + replies[-1] + "\n"
        assert ex.prompt.endswith("Assistant: ")
        assert ex.meta["record"] == rec_index(raw, rec) and ex.meta["id"] == rec["id"]


def rec_index(raw, rec):
    return raw.index(rec)


def test_openai_messages_jsonl(mgr):
    lines = [json.loads(x) for x in MESSAGES.read_text().splitlines()]
    data = _load(mgr, path=str(MESSAGES))
    assert [ex.messages for ex in data.train] == [rec["messages"] for rec in lines]


def test_messages_render_with_the_tokenizers_chat_template(mgr, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = _load(mgr, path=str(SHAREGPT)).train[0]
    text = tok.apply_chat_template(ex.messages, tokenize=False)
    assert "<|user|>" in text and "<|assistant|>" in text and "<|system|>" in text
    assert "<|human|>" not in text and "<|gpt|>" not in text


def test_plain_template_options(mgr):
    ex = _load(mgr, path=str(MESSAGES), user_prefix="### Q: ", assistant_prefix="### A: ",
               system_prompt="Be kind.").train[0]
    assert ex.text == "System: Be kind.\n### Q: Translate 'good morning' into French.\n### A: Bonjour.\n"
    assert ex.messages[0] == {"role": "system", "content": "Be kind."}


def _write(tmp_path, records, name="bad.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records) if name.endswith(".json") else "\n".join(json.dumps(r) for r in records))
    return p


GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


@pytest.mark.parametrize("bad, words", [
    ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "unknown speaker 'robot'"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}, "expected a user turn"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]}, "expected a string"),
    ({"text": "hello"}, "neither 'conversations'"),
    ([1, 2], "expected an object"),
])
def test_bad_record_names_file_and_index(mgr, tmp_path, bad, words):
    p = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        _load(mgr, path=str(p))
    assert str(p) in str(e.value) and "record 2" in str(e.value) and words in str(e.value)


def test_jsonl_error_names_line(mgr, tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + '{"conversations": [' + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:3: line does not parse as JSON"):
        _load(mgr, path=str(p))
    # like any bad record, it is skipped and counted with on_error "skip"
    data = load_dataset(mgr, {"loader": "sharegpt", "path": str(p)}, on_error="skip")
    assert len(data.train) == 1 and data.skipped == {"invalid_json": 1}


def test_skip_counts_bad_records(mgr, tmp_path):
    bad = {"conversations": [{"from": "robot", "value": "hi"}]}
    p = _write(tmp_path, [GOOD, bad, GOOD, bad, {"x": 1}])
    data = load_dataset(mgr, {"loader": "sharegpt", "path": str(p)}, on_error="skip")
    assert len(data.train) == 2
    assert data.skipped == {"unknown role": 2, "no turns": 1}


def test_roles_option_maps_extra_speakers(mgr, tmp_path):
    rec = {"conversations": [{"from": "customer", "value": "hi"}, {"from": "agent", "value": "hello"}]}
    p = _write(tmp_path, [rec])
    data = _load(mgr, path=str(p), roles={"customer": "user", "agent": "assistant"})
    assert [m["role"] for m in data.train[0].messages] == ["user", "assistant"]


def test_trailing_user_turn_dropped(mgr, tmp_path):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "unanswered"}]}
    ex = _load(mgr, path=str(_write(tmp_path, [rec]))).train[0]
    assert [m["content"] for m in ex.messages] == ["a", "b"] and "unanswered" not in ex.text


def test_validation_file_is_the_validation_split(mgr):
    data = _load(mgr, path=str(SHAREGPT), validation_path=str(MESSAGES))
    assert len(data.train) == 8 and len(data.validation) == 4


def test_fingerprint_follows_content(mgr, tmp_path):
    p = _write(tmp_path, [GOOD])
    a = _load(mgr, path=str(p)).fingerprint
    p.write_text(json.dumps([GOOD, GOOD]))
    b = _load(mgr, path=str(p)).fingerprint
    assert b != a
    assert _load(mgr, path=str(p), user_prefix="Q: ").fingerprint != b  # options that change the text count


@pytest.mark.parametrize("opts, where", [
    ({"path": "x.json", "format": "xml"}, "data.datasets[0].format"),
    ({"path": "x.json", "roles": {"bot": "robot"}}, "data.datasets[0].roles.bot"),
    ({"path": "x.json", "shuffle": True}, "data.datasets[0].shuffle: unknown key 'shuffle'"),
    ({"format": "sharegpt"}, "'path' is a required property"),
])
def test_bad_options_name_their_json_path(mgr, opts, where):
    with pytest.raises(FtkError) as e:
        _load(mgr, **opts)
    assert where in str(e.value)


def test_missing_file(mgr, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        _load(mgr, path=str(tmp_path / "nope.json"))

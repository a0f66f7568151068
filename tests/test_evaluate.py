"""Evaluators on the real tiny LLaMA, compared with plain transformers / sacreBLEU; the run evaluation,
the report and the eval/generate commands."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import types

import pytest
import sacrebleu
import torch
from conftest import MODEL_DIR

from ftk.components import PreparedData
from ftk.errors import FtkError
from ftk.evaluate import PerplexityEvaluator, QualitativeEvaluator, evaluate_run
from ftk.hookspecs import hookimpl

torch.set_num_threads(1)

TEXTS = [
    ("Once upon a time", " there was a little dog named Max. He liked to run in the park with his friends."),
    ("Lily had a red ball.", " She threw it high."),
    ("The sun was hot.", " Tom and his mom went to the beach to swim in the cool blue water all day long."),
    ("A cat sat", " on the mat."),
    ("One day, a bird", " sang a happy song to the little girl who lived in the big house."),
]
PROMPTS = ["Once upon a time", "Lily and Tom went to the park. They saw a big", "The dog"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def rows(tok, train_on_inputs=False):
    """Feature dicts as ftk.data makes them: prompt tokens masked with -100 unless train_on_inputs."""
    out = []
    for prompt, resp in TEXTS:
        p = tok(prompt)["input_ids"]
        ids = tok(prompt + resp)["input_ids"]
        labels = list(ids) if train_on_inputs else [-100] * len(p) + ids[len(p):]
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(features):
    """Right padding with attention mask; packed rows carry position_ids and no mask."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
        "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features]),
    }
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor([f["position_ids"] + [0] * (width - len(f["position_ids"]))
                                              for f in features])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                                for f in features])
    return batch


def reference_nll(model, feats):
    """Per example: transformers' own mean loss times its number of shifted labelled tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total, count


# -- perplexity -------------------------------------------------------------------------------------
def test_perplexity_is_token_weighted_and_batch_independent(model, tok):
    feats = rows(tok)
    nll, n = reference_nll(model, feats)
    expected = math.exp(nll / n)
    ev = PerplexityEvaluator(model, tok)
    for bs in (1, 2, 5):
        batches = [collate(feats[i:i + bs]) for i in range(0, len(feats), bs)]
        assert ev.compute_perplexity(batches) == pytest.approx(expected, rel=1e-5)
    # the examples differ in length, so a mean of per-batch means would be a different (wrong) number
    with torch.no_grad():
        means = [model(**{k: v for k, v in collate([f]).items()}).loss.item() for f in feats]
    assert abs(math.exp(sum(means) / len(means)) - expected) > 1e-3 * expected
    assert ev.compute_nll(iter(collate([f]) for f in feats))[1] == n  # a one-pass iterator is enough


def test_packed_rows_score_like_unpacked_rows(model, tok):
    feats = rows(tok, train_on_inputs=True)  # every token labelled: the example boundaries matter
    nll, n = reference_nll(model, feats)
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for f in feats:
        packed["input_ids"] += f["input_ids"]
        packed["labels"] += f["labels"]
        packed["position_ids"] += list(range(len(f["input_ids"])))
    got_nll, got_n = PerplexityEvaluator(model, tok).compute_nll([collate([packed])])
    assert got_n == n
    assert got_nll == pytest.approx(nll, rel=1e-4)


# -- generation -------------------------------------------------------------------------------------
def plain_generate(model, tok, prompt, **kw):
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, **kw)
    return out[0, enc.input_ids.shape[1]:].tolist()


def test_greedy_equals_plain_generate_single_and_batched(model, tok):
    saved = tok.padding_side
    tok.padding_side = "right"
    try:
        qe = QualitativeEvaluator(model, tok)
        expected = [tok.decode(plain_generate(model, tok, p, num_beams=1, max_new_tokens=30),
                               skip_special_tokens=True) for p in PROMPTS]
        assert [qe.generate_response(p, max_length=30, num_beams=1) for p in PROMPTS] == expected
        assert qe.generate(PROMPTS, max_length=30, num_beams=1, batch_size=3) == expected
        assert tok.padding_side == "right"
        assert all(not e.startswith(p) for e, p in zip(expected, PROMPTS))  # only the new text
    finally:
        tok.padding_side = saved


def test_default_beam_search_equals_plain_beam_search(model, tok):
    qe = QualitativeEvaluator(model, tok)
    expected = tok.decode(plain_generate(model, tok, PROMPTS[0], num_beams=4, max_new_tokens=20),
                          skip_special_tokens=True)
    assert qe.generate_response(PROMPTS[0], max_length=20) == expected


def test_generation_stops_at_eos(model, tok):
    full = plain_generate(model, tok, PROMPTS[0], num_beams=1, max_new_tokens=30)
    stop = full[6]  # pretend a token the model really produces is the EOS
    ids = QualitativeEvaluator(model, tok).generate_ids([PROMPTS[0]], max_length=30, num_beams=1,
                                                        eos_token_id=stop)
    assert ids == [full[:full.index(stop)]]


def test_sampling_uses_temperature_and_is_seeded(model, tok):
    from transformers import set_seed

    qe = QualitativeEvaluator(model, tok)
    set_seed(3)
    a = qe.generate(PROMPTS, max_length=15, do_sample=True, num_beams=1, temperature=1.5)
    set_seed(3)
    b = qe.generate(PROMPTS, max_length=15, do_sample=True, num_beams=1, temperature=1.5)
    greedy = qe.generate(PROMPTS, max_length=15, num_beams=1)
    assert a == b and a != greedy


def sampled_generate(model, tok, prompt, seed, **kw):
    """transformers' own sampling under ``torch.manual_seed(seed)``, cut at EOS as ftk cuts it."""
    enc = tok(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    row = model.generate(**enc, do_sample=True, pad_token_id=tok.eos_token_id, **kw)[0, enc.input_ids.shape[1]:]
    row = row.tolist()
    return tok.decode(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row,
                      skip_special_tokens=True)


def test_temperature_alone_samples_as_transformers_does(model, tok):
    """The specification's call, generate_response(prompt, max_length=N, temperature=0.7), samples at 0.7."""
    qe = QualitativeEvaluator(model, tok)
    got = {s: qe.generate_response(PROMPTS[0], max_length=25, temperature=0.7, seed=s) for s in (1, 2, 3)}
    for s, text in got.items():
        assert text == sampled_generate(model, tok, PROMPTS[0], s, temperature=0.7, max_new_tokens=25)
    assert len(set(got.values())) == 3  # each seed its own sample
    beam = tok.decode(plain_generate(model, tok, PROMPTS[0], num_beams=4, max_new_tokens=25), skip_special_tokens=True)
    assert qe.generate_response(PROMPTS[0], max_length=25) == beam  # nothing given: the deterministic default
    assert beam not in got.values()
    # top_p alone samples too (temperature 1.0); temperature 0 is greedy decoding
    assert qe.generate_response(PROMPTS[0], max_length=25, top_p=0.8, seed=4) == sampled_generate(
        model, tok, PROMPTS[0], 4, top_p=0.8, temperature=1.0, max_new_tokens=25)
    greedy = tok.decode(plain_generate(model, tok, PROMPTS[0], num_beams=1, max_new_tokens=25),
                        skip_special_tokens=True)
    assert qe.generate_response(PROMPTS[0], max_length=25, temperature=0) == greedy


def test_num_beams_with_sampling_is_transformers_beam_sampling(model, tok):
    qe = QualitativeEvaluator(model, tok)
    got = qe.generate_response(PROMPTS[1], max_length=20, temperature=0.9, num_beams=3, seed=5)
    assert got == sampled_generate(model, tok, PROMPTS[1], 5, temperature=0.9, num_beams=3, max_new_tokens=20)
    assert got != qe.generate_response(PROMPTS[1], max_length=20, temperature=0.9, num_beams=1, seed=5)


def test_api_refuses_a_keyword_it_would_ignore(model, tok):
    qe = QualitativeEvaluator(model, tok)
    with pytest.raises(FtkError, match=r"^temperature=: only applies when sampling, but do_sample=False; drop one$"):
        qe.generate_response(PROMPTS[0], max_length=5, temperature=0.7, do_sample=False)
    with pytest.raises(FtkError, match=r"^top_k=: only applies when sampling, but do_sample=False; drop one$"):
        qe.generate(PROMPTS, max_length=5, do_sample=False, top_k=5)


def test_a_seed_leaves_the_callers_random_state_alone(model, tok):
    qe = QualitativeEvaluator(model, tok)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    qe.generate_response(PROMPTS[0], max_length=5, temperature=0.7, seed=9)
    assert torch.equal(torch.get_rng_state(), state)


def test_compute_bleu_and_rouge_follow_the_reference_packages(model, tok):
    qe = QualitativeEvaluator(model, tok)
    refs, hyps = ["the cat sat on the mat", "a dog ran"], ["the cat sat on a mat", "dogs were running"]
    assert qe.compute_bleu(refs, hyps) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100)
    assert set(qe.compute_rouge(refs, hyps)) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


# -- a run's evaluation -----------------------------------------------------------------------------
class CharRatio:
    """A plugin metric: mean prediction/reference length ratio in characters."""

    requires = "text"

    def __init__(self, options):
        self.key = options.get("key", "char_ratio")

    def compute(self, predictions, references):
        return {self.key: sum(len(p) / max(1, len(r)) for p, r in zip(predictions, references)) / len(predictions)}


@pytest.fixture
def manager():
    from ftk.manager import FtkPluginManager

    mgr = FtkPluginManager()
    plugin = types.SimpleNamespace(ftk_register_metrics=hookimpl(
        lambda register: register("char_ratio", CharRatio, options_schema={
            "type": "object", "properties": {"key": {"type": "string"}}})))
    mgr.register(plugin, "test-metrics")
    return mgr


@pytest.fixture
def peft_model(model):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: non-zero B so the fine-tuned model differs from the base
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def run_recipe(metrics, **ev):
    return {"training": {"batch_size": 2},
            "evaluation": {"metrics": metrics, "max_samples": 2, "compare_base": True, "num_examples_in_report": 1,
                           "generation": {"max_new_tokens": 12, "num_beams": 1}, **ev}}


def test_evaluate_run_base_vs_finetuned(model, tok, peft_model, manager, tmp_path):
    feats = rows(tok)
    pairs = [(p, r) for p, r in TEXTS[:3]]
    prepared = PreparedData(train=None, validation=None, collator=collate, eval_pairs=pairs,
                            validation_unpacked=feats)
    recipe = run_recipe(["perplexity", "bleu", {"name": "rouge", "use_stemmer": False}, "char_ratio"])
    peft_model.train()
    res = evaluate_run(peft_model, tok, prepared, recipe, manager, tmp_path)
    assert peft_model.training  # the caller's mode comes back

    nll, n = reference_nll(model, feats)  # the base model loaded on its own
    assert res["base"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    ft_nll, _ = reference_nll(peft_model.eval(), feats)  # adapter active again after the comparison
    assert res["finetuned"]["perplexity"] == pytest.approx(math.exp(ft_nll / n), rel=1e-5)
    assert res["finetuned"]["perplexity"] != pytest.approx(res["base"]["perplexity"], rel=1e-3)

    base_gen = [tok.decode(plain_generate(model, tok, p, num_beams=1, max_new_tokens=12), skip_special_tokens=True)
                for p, _ in pairs[:2]]
    refs = [r for _, r in pairs[:2]]
    assert res["base"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(base_gen, [refs]).score / 100, abs=1e-12)
    for side in ("base", "finetuned"):
        assert {"perplexity", "bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "char_ratio"} <= set(res[side])
        assert res[side]["eval_samples"] == 2 and res[side]["eval_tokens"] == n
    assert res["samples"] == [{"prompt": pairs[0][0], "reference": pairs[0][1], "finetuned": res["samples"][0]
                               ["finetuned"], "base": base_gen[0]}]
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["base"] for x in lines] == base_gen


def test_evaluate_run_without_adapter_is_base_only(model, tok, manager, tmp_path):
    prepared = PreparedData(train=None, validation=None, collator=collate, eval_pairs=[], validation_unpacked=rows(tok))
    res = evaluate_run(model, tok, prepared, run_recipe(["perplexity"]), manager, tmp_path)
    assert set(res) == {"base", "samples"} and res["samples"] == []
    with pytest.raises(FtkError, match="no.*pairs|none"):
        evaluate_run(model, tok, prepared, run_recipe(["bleu"]), manager, tmp_path)


def test_sampled_evaluation_is_reproducible(model, tok, manager, tmp_path):
    """A run's evaluation seeds torch with training.seed right before generating: two evaluations of the same
    model give the same text, whatever the random state before; another seed, another sample."""
    prepared = PreparedData(train=None, validation=None, collator=collate, eval_pairs=TEXTS[:3])

    def texts(seed, **gen):
        recipe = {"training": {"seed": seed},
                  "evaluation": {"metrics": ["bleu"], "max_samples": 3, "compare_base": False,
                                 "generation": {"max_new_tokens": 20, **gen}}}
        torch.rand(int(torch.randint(1, 50, ())))  # whatever happened before must not matter
        return [s["base"] for s in evaluate_run(model, tok, prepared, recipe, manager, None)["samples"]]

    first = texts(7, temperature=0.8)
    assert texts(7, temperature=0.8) == first
    assert texts(8, temperature=0.8) != first
    prompts = [p for p, _ in TEXTS[:3]]  # the seed is training.seed, as the API's seed= keyword takes it
    assert first == QualitativeEvaluator(model, tok).generate(prompts, max_length=20, temperature=0.8, seed=7)
    beam = [tok.decode(plain_generate(model, tok, p, num_beams=4, max_new_tokens=20), skip_special_tokens=True)
            for p, _ in TEXTS[:3]]
    assert texts(7) == texts(8) == beam  # not sampling: the seed changes nothing
    with pytest.raises(FtkError, match=r"^evaluation\.generation\.top_p: only applies when sampling, but "
                                       r"evaluation\.generation\.do_sample is false; drop one$"):
        texts(7, top_p=0.5, do_sample=False)  # a recipe that skipped load_recipe: same rule, same naming


def test_two_metrics_reporting_one_key_is_an_error(model, tok, manager, tmp_path):
    prepared = PreparedData(train=None, validation=None, collator=collate, eval_pairs=TEXTS[:1])
    recipe = run_recipe(["bleu", {"name": "char_ratio", "key": "bleu"}], generation={"max_new_tokens": 2})
    with pytest.raises(FtkError, match="'bleu' and 'char_ratio' both report 'bleu'"):
        evaluate_run(model, tok, prepared, recipe, manager, tmp_path)


# -- report -----------------------------------------------------------------------------------------
def test_report_with_everything(tmp_path):
    from ftk.report import write_report

    log = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)] + [{"step": 5, "eval_loss": 2.8},
                                                                         {"step": 10, "eval_loss": 2.5}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log) + '{"step": 11, "lo')
    metrics = {"train": {"train_loss": 2.4},
               "finetuned": {"perplexity": 12.0, "bleu": 0.2, "eval_samples": 3},
               "base": {"perplexity": 20.0, "bleu": 0.1, "eval_samples": 3},
               "samples": [{"prompt": "Say ```hi```", "reference": "hello", "finetuned": "hi there", "base": "what"}]}
    recipe = {"model": {"name": "m", "quantization": {"method": "nf4", "nested": True}},
              "adapter": {"method": "lora", "r": 8}, "data": {"datasets": [{"loader": "alpaca", "path": "a.json"}]}}
    text = write_report(tmp_path, recipe, metrics).read_text()
    assert "| perplexity | 20.0000 | 12.0000 | -8.0000 (-40.0%) | fine-tuned |" in text
    assert "| bleu | 0.1000 | 0.2000 | +0.1000 (+100.0%) | fine-tuned |" in text
    assert "![training and validation loss](loss_curve.png)" in text
    assert "10 training and 2 validation points" in text
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "````text\nSay ```hi```\n````" in text and "hi there" in text and "`nf4`" in text


def test_report_without_base_or_log(tmp_path):
    from ftk.report import write_report

    text = write_report(tmp_path, {}, {"finetuned": {"perplexity": 9.5}}).read_text()
    assert "| metric | fine-tuned |" in text and "| perplexity | 9.5000 |" in text
    assert "No loss curve" in text and not (tmp_path / "loss_curve.png").exists()


# -- commands ---------------------------------------------------------------------------------------
def test_generate_command_prints_greedy_text(model, tok):
    from click.testing import CliRunner

    from ftk.cmd_eval import generate

    res = CliRunner().invoke(generate, ["--base", str(MODEL_DIR), "--num-beams", "1", "--max-new-tokens", "20",
                                        PROMPTS[0]], catch_exceptions=False)
    assert res.exit_code == 0
    expected = tok.decode(plain_generate(model, tok, PROMPTS[0], num_beams=1, max_new_tokens=20),
                          skip_special_tokens=True)
    assert res.stdout == expected + "\n"  # weight-loading progress goes to stderr


def test_generate_command_temperature_samples_like_the_api(model, tok):
    from click.testing import CliRunner

    from ftk.cmd_eval import generate

    args = ["--base", str(MODEL_DIR), "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "3", PROMPTS[0]]
    res = CliRunner().invoke(generate, args, catch_exceptions=False)
    assert res.exit_code == 0
    expected = sampled_generate(model, tok, PROMPTS[0], 3, temperature=0.8, max_new_tokens=20)
    assert res.stdout == expected + "\n"
    assert expected == QualitativeEvaluator(model, tok).generate_response(PROMPTS[0], max_length=20,
                                                                          temperature=0.8, seed=3)


def test_command_help_and_usage_errors():
    from click.testing import CliRunner

    from ftk.cmd_eval import eval_cmd, generate

    for cmd, words in ((eval_cmd, ["--adapter", "--set", "--out"]), (generate, ["--adapter", "--base", "--num-beams"])):
        out = CliRunner().invoke(cmd, ["--help"]).output
        assert all(w in out for w in words), out
    p = subprocess.run([sys.executable, "-m", "ftk", "generate", "hello"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: generate: give --adapter DIR or --base MODEL"


# -- ftk eval on a real recipe, 4-bit NF4 model -----------------------------------------------------
def test_eval_command_4bit_base_then_adapter(tmp_path, model):
    from click.testing import CliRunner
    from peft import LoraConfig, get_peft_model

    from conftest import ALPACA

    from ftk.cmd_eval import eval_cmd

    recipe = {"model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4", "compute_dtype": "float32"}},
              "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 40}],
                       "validation_size": 6, "cache": False},
              "training": {"batch_size": 3, "precision": "fp32"},
              "evaluation": {"metrics": ["perplexity", "bleu"], "max_samples": 2,
                             "generation": {"max_new_tokens": 6, "num_beams": 1}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    adapter = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    adapter.save_pretrained(tmp_path / "adapter")

    run = CliRunner()
    base = run.invoke(eval_cmd, [str(path), "--json"], catch_exceptions=False)
    assert base.exit_code == 0, base.output
    base = json.loads(base.stdout)
    assert set(base) == {"base", "adapter"} and base["adapter"] is None
    both = run.invoke(eval_cmd, [str(path), "--adapter", str(tmp_path / "adapter"), "--json",
                                 "--out", str(tmp_path / "ev")], catch_exceptions=False)
    assert both.exit_code == 0, both.output
    both = json.loads(both.stdout)
    # the adapter-disabled pass is the same 4-bit base model: identical numbers
    assert both["base"]["perplexity"] == pytest.approx(base["base"]["perplexity"], rel=1e-6)
    assert both["finetuned"]["perplexity"] != pytest.approx(base["base"]["perplexity"], rel=1e-3)
    assert both["base"]["eval_samples"] == 2 and base["base"]["eval_tokens"] > 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["finetuned"] == both["finetuned"]
    assert "| perplexity |" in (tmp_path / "ev" / "report.md").read_text()


def test_report_redacts_secret_looking_options(tmp_path):
    from ftk.report import write_report

    recipe = {"model": {"name": "m", "quantization": {"method": "nf4", "hub_token": "hf_SECRET1"}},
              "adapter": {"method": "lora", "api_key": "SECRET2"}}
    text = write_report(tmp_path, recipe, {}).read_text()
    assert "SECRET" not in text and '"hub_token": "***"' in text


def test_metrics_json_says_where_the_time_went(tmp_path, fresh_manager):
    """metrics.json "seconds": data, model, train, evaluation, and per scored model the evaluation's parts
    (validation loss, generation, the metrics' own computing); the report shows them."""
    from conftest import ALPACA

    from ftk.recipe import load_recipe
    from ftk.run import run_recipe
    from ftk.testing import tiny_recipe

    raw = tiny_recipe(MODEL_DIR, [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                      metrics=["perplexity", "bleu"], output_dir=tmp_path / "run",
                      evaluation={"compare_base": True})
    run_recipe(load_recipe(data=raw, manager=fresh_manager), manager=fresh_manager)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sec = m["seconds"]
    assert {"data", "model", "train", "evaluation"} <= set(sec) and all(sec[k] > 0 for k in ("model", "train"))
    parts = sec["evaluation_parts"]
    assert set(parts) == {"finetuned", "base"}
    for scored in parts.values():
        assert set(scored) == {"loss", "generation", "metrics"} and scored["generation"] > 0
    assert sum(sum(p.values()) for p in parts.values()) <= sec["evaluation"]
    assert "seconds" not in m["finetuned"] and "seconds" not in m["base"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Time" in report and "evaluation of the base model: loss" in report


def test_generation_prompts_end_where_training_put_the_reply(tok, fresh_manager):
    """A DailyDialog prompt ends in "Assistant: "; training tokenized that space with the reply's first word,
    so the generation prompt's ids are the training ids up to the reply, not a lone space token."""
    from conftest import DAILYDIALOG

    from ftk import data as D
    from ftk.recipe import load_recipe

    r = load_recipe(data={"model": {"name": str(MODEL_DIR)}, "data": {
        "datasets": [{"loader": "dailydialog", "path": str(DAILYDIALOG), "max_examples": 30}],
        "validation_size": 8, "cache": False}}, manager=fresh_manager)
    pairs = D.prepare_data(r, tok, fresh_manager).eval_pairs
    ev = QualitativeEvaluator(None, tok)
    spaced = [(p, ref) for p, ref in pairs if p.endswith(" ")]
    assert spaced
    for prompt, ref in spaced:
        ids = ev._prompt_ids(prompt, None, 8)
        trained = tok(prompt + ref)["input_ids"]
        assert trained[:len(ids)] == ids, prompt[-30:]
        assert tok.convert_ids_to_tokens(trained[len(ids)]).startswith("▁")  # the reply's first word, its space
        assert tok(prompt)["input_ids"] != ids  # what was used before: ends with the lone space token

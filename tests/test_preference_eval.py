"""Evaluation of preference runs (issue #15): the log-probabilities of held-out pairs equal TRL's DPOTrainer's,
the `preference` metric (reward accuracy, margin, log-probs) follows its formulas, base vs fine-tuned, refusal
of a pairs metric in a run of rows, and the report's reward curves.

The pairs are real (../shared/data/preference/dailydialog_pairs.jsonl) and tokenized with the real tokenizer
into the "pairs" data form as ftk.components documents it (prompt from BOS, each response ending in EOS)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import ALPACA, MODEL_DIR, SHARED
from test_evaluate import model, tok  # noqa: F401 (the stories260K model and tokenizer, module fixtures)

from ftk.components import PreparedData
from ftk.errors import FtkError
from ftk.evaluate import PreferenceEvaluator, build_metrics, evaluate_run
from ftk.testing import make_metric

torch.set_num_threads(1)

PAIRS_FILE = SHARED / "data" / "preference" / "dailydialog_pairs.jsonl"
KEYS = ["reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"]


@pytest.fixture(scope="module")
def mgr():
    from ftk.manager import FtkPluginManager

    return FtkPluginManager()


def render(turns: list[dict]) -> str:
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


def real_pairs(tok, n: int, start: int = 0, prompt_max: int = 96) -> list[dict]:
    """The "pairs" data form from the real records: the prompt keeps BOS and its last tokens, responses end in EOS."""
    lines = PAIRS_FILE.read_text().splitlines()[start:start + n]
    out = []
    for rec in map(json.loads, lines):
        prompt = tok(render(rec["prompt"]))["input_ids"]
        prompt = [tok.bos_token_id] + prompt[-(prompt_max - 1):] if len(prompt) > prompt_max else prompt
        resp = [tok(" " + rec[k][0]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for k in ("chosen", "rejected")]
        out.append({"prompt_ids": prompt, "chosen_ids": resp[0], "rejected_ids": resp[1]})
    return out


def one_logp(model, prompt: list[int], response: list[int]) -> float:
    """Independently: one sequence, no padding, float64 log-softmax, summed over the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logp[len(prompt) - 1:].sum())


def peft(model, scale=0.05, seed=0):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():  # lora_A's initialisation draws from torch's random state
        torch.manual_seed(seed)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # a "trained" adapter: policy != reference
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape) * scale)
    return pm.eval()


def prepared_pairs(tok, pairs) -> PreparedData:
    """What the data pipeline hands over for the "pairs" form: pairs, plus prompt+chosen rows (perplexity) and
    (prompt, chosen) texts (generation metrics)."""
    rows = [{"input_ids": p["prompt_ids"] + p["chosen_ids"],
             "labels": [-100] * len(p["prompt_ids"]) + p["chosen_ids"]} for p in pairs]

    def collate(feats):
        w = max(len(f["input_ids"]) for f in feats)
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * (w - len(f["input_ids"])) for f in feats]),
                "labels": torch.tensor([f["labels"] + [-100] * (w - len(f["labels"])) for f in feats]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (w - len(f["input_ids"]))
                                                for f in feats])}

    texts = [tuple(tok.decode(p[k], skip_special_tokens=True) for k in ("prompt_ids", "chosen_ids")) for p in pairs]
    return PreparedData(train=pairs, validation=pairs, collator=collate, eval_pairs=texts, validation_unpacked=rows,
                        form="pairs")


def recipe(metrics, **ev):
    return {"training": {"batch_size": 3},
            "evaluation": {"metrics": metrics, "max_samples": 2, "compare_base": True, "num_examples_in_report": 1,
                           "generation": {"max_new_tokens": 4, "num_beams": 1}, **ev}}


# -- the log-probabilities are TRL's ----------------------------------------------------------------
def test_logps_equal_trl_dpo_trainers(model, tok, mgr, tmp_path):
    """TRL 1.16's DPOTrainer on the same model and pairs (its own collator, its compute_ref_log_probs with the
    fused LM head): the policy's log-probs (TRL's "ref" adapter is a copy of the trained one) and the reference's
    (the "ref" adapter removed: the adapter disabled, as for a new adapter), per pair; and TRL's logged eval
    metrics for the batch equal the `preference` metric's keys."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):  # ftk hands over ids: TRL's own tokenization is skipped
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    pairs = real_pairs(tok, 12)
    pm = peft(model, scale=0.1, seed=2)  # 4 of the 12 pairs prefer chosen, none is near a tie
    ours = PreferenceEvaluator(pm, tok).compute_logps(pairs, batch_size=5)  # batches differ from TRL's one batch
    with pm.disable_adapter():
        ours_ref = PreferenceEvaluator(pm, tok).compute_logps(pairs, batch_size=4)

    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=None,
                     per_device_eval_batch_size=12)
    trl_model = copy.deepcopy(pm)
    tr = PreTokenized(model=trl_model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    batch = tr.data_collator(pairs)
    assert "ref" in trl_model.peft_config  # TRL's copy of the adapter as it was when the trainer was built
    policy = tr.compute_ref_log_probs(tr.model, batch)
    trl_model.delete_adapter("ref")
    reference = tr.compute_ref_log_probs(tr.model, batch)
    for mine, theirs in ((ours, policy), (ours_ref, reference)):
        for side in (0, 1):
            # float32 sums, as TRL's: equal up to float32 rounding of the sum (seen: |Δ| <= 6.1e-5 on sums
            # near -880, one float32 step there; relative <= 2e-7)
            assert mine[side] == pytest.approx(theirs[side].tolist(), rel=1e-6, abs=1e-5)
    assert ours[0] != pytest.approx(ours_ref[0], rel=1e-3)  # the adapter matters

    # TRL's own metrics for this batch (eval mode), beta 0.1, against the metric's on our numbers
    trl_model.eval()
    with torch.no_grad():
        tr.compute_loss(tr.model, batch)
    logged = {k: v[-1] for k, v in tr._metrics["eval"].items()}
    got = make_metric(mgr, {"name": "preference", "beta": 0.1}).compute(
        chosen_logps=ours[0], rejected_logps=ours[1], ref_chosen_logps=ours_ref[0], ref_rejected_logps=ours_ref[1])
    assert got["reward_accuracy"] == 4 / 12  # no ties here: TRL's convention (a tie counts 0) does not enter
    assert got["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"], abs=1e-7)  # TRL: a float32 mean
    assert got["reward_margin"] == pytest.approx(logged["rewards/margins"], rel=1e-5, abs=1e-5)
    assert got["logps_chosen"] == pytest.approx(logged["logps/chosen"], rel=1e-6)
    assert got["logps_rejected"] == pytest.approx(logged["logps/rejected"], rel=1e-6)


def test_logps_are_the_unbatched_sums_whatever_the_batch(model, tok):
    pairs = real_pairs(tok, 7, start=20)
    want = ([one_logp(model, p["prompt_ids"], p["chosen_ids"]) for p in pairs],
            [one_logp(model, p["prompt_ids"], p["rejected_ids"]) for p in pairs])
    for bs in (1, 3, 7):
        got = PreferenceEvaluator(model, tok).compute_logps(pairs, batch_size=bs)
        for side in (0, 1):
            assert got[side] == pytest.approx(want[side], rel=1e-6, abs=1e-5)
    assert not model.training


def test_a_malformed_pair_is_one_line(model, tok):
    with pytest.raises(FtkError, match=r"^evaluation: validation pair 1 is not a \{prompt_ids, chosen_ids, "
                                       r"rejected_ids\} dict of token id lists \(KeyError: 'rejected_ids'\)$"):
        PreferenceEvaluator(model, tok).compute_logps([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]},
                                                       {"prompt_ids": [1], "chosen_ids": [2]}])


# -- the metric's formulas --------------------------------------------------------------------------
def test_preference_metric_formulas(mgr):
    chosen, rejected = [-10.0, -20.0, -5.0, -7.0], [-12.0, -18.0, -5.0, -9.0]
    ref_c, ref_r = [-11.0, -20.0, -5.5, -7.0], [-11.0, -19.0, -5.5, -9.0]
    # rewards beta*(policy - ref): chosen 0.1, 0, 0.05, 0 ; rejected -0.1, 0.1, 0.05, 0 (beta 0.1)
    got = make_metric(mgr, "preference").compute(chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_c,
                                                ref_rejected_logps=ref_r)
    assert set(got) == set(KEYS)
    assert got["reward_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)  # pairs 3 and 4 are ties: 0.5 each
    assert got["reward_margin"] == pytest.approx((0.2 - 0.1 + 0 + 0) / 4)
    assert got["logps_chosen"] == pytest.approx(-42 / 4) and got["logps_rejected"] == pytest.approx(-44 / 4)
    twice = make_metric(mgr, {"name": "preference", "beta": 0.2}).compute(
        chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    assert twice["reward_margin"] == pytest.approx(2 * got["reward_margin"])  # beta scales the margin only
    assert twice["reward_accuracy"] == got["reward_accuracy"]


def test_preference_metric_refuses_bad_input(mgr):
    m = make_metric(mgr, "preference")
    with pytest.raises(FtkError, match="no preference pairs"):
        m.compute(chosen_logps=[], rejected_logps=[], ref_chosen_logps=[], ref_rejected_logps=[])
    with pytest.raises(FtkError, match="2, 2, 1, 2 log-probabilities"):
        m.compute(chosen_logps=[1, 2], rejected_logps=[1, 2], ref_chosen_logps=[1], ref_rejected_logps=[1, 2])
    with pytest.raises(FtkError, match="NaN"):
        m.compute(chosen_logps=[math.nan], rejected_logps=[1], ref_chosen_logps=[1], ref_rejected_logps=[1])
    with pytest.raises(FtkError, match="beta"):
        make_metric(mgr, {"name": "preference", "beta": 0})


def test_builtin_declaration(mgr):
    from ftk.components import MetricInfo

    assert mgr.components("metric")["preference"].info == MetricInfo(
        keys=KEYS, higher_is_better={"reward_accuracy": True, "reward_margin": True}, requires="pairs")
    assert make_metric(mgr, "preference").requires == "pairs"


# -- base vs fine-tuned -----------------------------------------------------------------------------
def test_evaluate_run_base_is_a_tie_and_finetuned_against_base(model, tok, mgr, tmp_path):
    """The base scored against itself: every reward 0, so accuracy is the tie value 0.5 and the margin 0; the
    fine-tuned model scored against the base (its adapter disabled). Perplexity and generation metrics work on
    the same run; the adapter is active again afterwards."""
    pairs = real_pairs(tok, 8, start=40)
    pm = peft(model)
    base_c = [one_logp(model, p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    base_r = [one_logp(model, p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    ft_c = [one_logp(pm, p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    ft_r = [one_logp(pm, p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    res = evaluate_run(pm, tok, prepared_pairs(tok, pairs), recipe(["preference", "perplexity", "bleu"]), mgr,
                       tmp_path)
    base, ft = res["base"], res["finetuned"]
    assert base["reward_accuracy"] == 0.5 and base["reward_margin"] == 0.0
    assert base["logps_chosen"] == pytest.approx(sum(base_c) / 8, rel=1e-6)
    assert base["logps_rejected"] == pytest.approx(sum(base_r) / 8, rel=1e-6)
    margins = [0.1 * (c - bc) - 0.1 * (r - br) for c, r, bc, br in zip(ft_c, ft_r, base_c, base_r)]
    assert ft["reward_margin"] == pytest.approx(sum(margins) / 8, rel=1e-4, abs=1e-6)
    assert ft["reward_accuracy"] == sum(m > 0 for m in margins) / 8
    assert ft["logps_chosen"] == pytest.approx(sum(ft_c) / 8, rel=1e-6)
    for side in (base, ft):
        assert {*KEYS, "perplexity", "bleu", "eval_pairs", "eval_tokens", "eval_samples"} <= set(side)
        assert side["eval_pairs"] == 8
    assert one_logp(pm, pairs[0]["prompt_ids"], pairs[0]["chosen_ids"]) == ft_c[0]  # adapter active again


def test_without_adapter_only_the_base_at_chance(model, tok, mgr):
    pairs = real_pairs(tok, 4)
    res = evaluate_run(model, tok, prepared_pairs(tok, pairs), recipe(["preference"]), mgr, None)
    assert set(res) == {"base", "samples"}
    assert res["base"]["reward_accuracy"] == 0.5 and res["base"]["reward_margin"] == 0.0


def test_accuracy_rises_when_the_adapter_prefers_chosen(model, tok, mgr):
    """Perturb the adapter by a few DPO steps on the held-out pairs themselves (a hand-written loss on
    independently computed log-probs): the evaluated accuracy rises from the tie value 0.5 to the share of pairs
    whose margin the independent computation finds positive, which is most of them."""
    pairs = real_pairs(tok, 10, start=60)
    pm = peft(model, scale=0.0)  # a fresh adapter: B = 0, policy == reference
    res0 = evaluate_run(pm, tok, prepared_pairs(tok, pairs), recipe(["preference"], compare_base=False), mgr, None)
    assert res0["finetuned"]["reward_accuracy"] == 0.5 and res0["finetuned"]["reward_margin"] == 0.0

    def seq_logp(ids, n_prompt):  # differentiable, one sequence
        logits = pm(input_ids=torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        return lp[n_prompt - 1:].sum()

    ref = {i: (one_logp(model, p["prompt_ids"], p["chosen_ids"]), one_logp(model, p["prompt_ids"], p["rejected_ids"]))
           for i, p in enumerate(pairs)}
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for _ in range(4):
        opt.zero_grad()
        loss = 0
        for i, p in enumerate(pairs):
            c = seq_logp(p["prompt_ids"] + p["chosen_ids"], len(p["prompt_ids"]))
            r = seq_logp(p["prompt_ids"] + p["rejected_ids"], len(p["prompt_ids"]))
            loss = loss - torch.nn.functional.logsigmoid(0.1 * ((c - ref[i][0]) - (r - ref[i][1])))
        loss.backward()
        opt.step()
    pm.eval()
    margins = [0.1 * ((one_logp(pm, p["prompt_ids"], p["chosen_ids"]) - ref[i][0])
                      - (one_logp(pm, p["prompt_ids"], p["rejected_ids"]) - ref[i][1])) for i, p in enumerate(pairs)]
    expected = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(pairs)
    res = evaluate_run(pm, tok, prepared_pairs(tok, pairs), recipe(["preference"]), mgr, None)
    assert res["finetuned"]["reward_accuracy"] == expected
    assert expected >= 0.8  # the steps made chosen preferred on most pairs
    assert res["finetuned"]["reward_margin"] == pytest.approx(sum(margins) / len(pairs), rel=1e-4)
    assert res["finetuned"]["reward_margin"] > 0 and res["base"]["reward_accuracy"] == 0.5


# -- a pairs metric in a run of rows ----------------------------------------------------------------
def _rows_recipe(tmp_path, metrics):
    return {"model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
            "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 8}], "validation_size": 2},
            "evaluation": {"metrics": metrics}, "output_dir": str(tmp_path / "run")}


REFUSAL = ("evaluation.metrics[1]: metric 'preference' scores preference pairs, but trainer 'sft' trains on 'rows' "
           "data; use a trainer of preference pairs (trainer.method, e.g. dpo) or drop the metric")


def test_a_rows_run_with_the_preference_metric_is_refused_in_one_line(mgr, tmp_path, monkeypatch, capsys):
    """`ftk run` refuses it before any data or weights load (build_metrics asks the trainer's plan for its data
    form); the evaluation of prepared rows (`ftk eval`, the API) refuses it too."""
    import ftk.data
    import ftk.manager
    import ftk.model
    from ftk.cli import main

    def no_load(*a, **k):
        raise AssertionError("data or model loaded")

    monkeypatch.setattr(ftk.model, "load_model", no_load)
    monkeypatch.setattr(ftk.data, "prepare_data", no_load)
    raw = _rows_recipe(tmp_path, ["perplexity", "preference"])
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    monkeypatch.setattr(ftk.manager, "_cached", mgr)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["run", str(path)])
    assert ex.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {REFUSAL}"]
    assert not (tmp_path / "run").exists()
    with pytest.raises(FtkError) as e:
        build_metrics(raw, mgr)
    assert e.value.messages == [REFUSAL]
    rows = PreparedData(train=None, validation=None, collator=None, form="rows")
    with pytest.raises(FtkError) as e:
        evaluate_run(None, None, rows, raw, mgr, None)
    assert e.value.messages == [REFUSAL]
    assert [n for n, _ in build_metrics(raw, mgr, data_form="pairs")] == ["perplexity", "preference"]


def test_a_pairs_run_without_validation_pairs_says_so(model, tok, mgr):
    prepared = prepared_pairs(tok, [])
    prepared.validation = []
    with pytest.raises(FtkError, match=r"^evaluation: preference need\(s\) preference pairs in the validation split"):
        evaluate_run(model, tok, prepared, recipe(["preference"]), mgr, None)


# -- the report -------------------------------------------------------------------------------------
def test_report_draws_the_reward_curves_when_the_log_has_rewards(tmp_path):
    from ftk.report import read_reward_log, write_report

    log = ([{"step": s, "loss": 0.69 - 0.02 * s, "rewards/accuracies": min(1.0, 0.1 * s),
             "rewards/margins": 0.01 * s, "rewards/chosen": 0.0} for s in range(1, 9)]
           + [{"step": 4, "eval_loss": 0.6, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.05},
              {"step": 8, "eval_loss": 0.5, "eval_rewards/accuracies": 0.875, "eval_rewards/margins": float("nan")}])
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    metrics = {"base": {"reward_accuracy": 0.5, "reward_margin": 0.0, "logps_chosen": -40.0, "eval_pairs": 8,
                        "eval_samples": 0},
               "finetuned": {"reward_accuracy": 0.875, "reward_margin": 0.31, "logps_chosen": -38.5, "eval_pairs": 8,
                             "eval_samples": 0}}
    curves = read_reward_log(tmp_path / "train_log.jsonl")
    assert [len(t) for t, _ in curves.values()] == [8, 8] and [len(e) for _, e in curves.values()] == [2, 1]
    text = write_report(tmp_path, {"evaluation": {"metrics": ["preference"]}}, metrics).read_text()
    assert "| reward_accuracy | 0.5000 | 0.8750 | +0.3750 (+75.0%) | fine-tuned |" in text
    assert "| reward_margin | 0.0000 | 0.3100 | +0.3100 | fine-tuned |" in text
    assert "| logps_chosen | -40.0000 | -38.5000 | +1.5000 (-3.8%) | – |" in text  # no verdict declared
    assert "preference metrics over 8 validation pairs" in text
    assert "![reward accuracy and margin](reward_curves.png)" in text
    assert "rewards/accuracies: 8 training and 2 validation points" in text
    assert (tmp_path / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "loss_curve.png").exists()


def test_report_without_rewards_has_no_reward_section(tmp_path):
    from ftk.report import write_report

    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    text = write_report(tmp_path, {}, {"finetuned": {"perplexity": 9.5}}).read_text()
    assert "Reward curves" not in text and not (tmp_path / "reward_curves.png").exists()
    text = write_report(tmp_path / "none", {}, {}).read_text()  # no log at all
    assert "Reward curves" not in text


# -- end to end: `ftk run` with the dpo trainer -----------------------------------------------------
def _have(mgr, kind, name) -> bool:
    return name in mgr.components(kind)


def test_ftk_run_dpo_reports_preference_base_vs_finetuned(mgr, tmp_path, monkeypatch, capsys):
    """A tiny DPO run through `ftk run` (the `preference` loader, the "pairs" data form, the `dpo` trainer) on
    real pairs: metrics.json has the preference keys for base and fine-tuned, the fine-tuned model's held-out
    reward accuracy is above the base's tie value, and the report draws the trainer's reward curves."""
    if not (_have(mgr, "trainer", "dpo") and _have(mgr, "dataset", "preference")):
        pytest.skip("the dpo trainer or the preference loader is not installed")
    import ftk.manager
    from ftk.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(PAIRS_FILE.read_text().splitlines(keepends=True)[:40]))
    recipe = {"model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
              "adapter": {"method": "lora", "r": 8, "alpha": 16},
              "trainer": {"method": "dpo", "beta": 0.1},
              "data": {"datasets": [{"loader": "preference", "path": str(data)}], "max_length": 96,
                       "validation_size": 8, "cache": False},
              "training": {"max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                           "warmup_ratio": 0, "optimizer": "adamw_torch", "precision": "fp32", "report_to": ["none"],
                           "logging_steps": 1, "compile": False},
              "evaluation": {"metrics": [{"name": "preference", "beta": 0.1}, "perplexity"], "compare_base": True},
              "output_dir": str(tmp_path / "run")}
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(recipe))
    monkeypatch.setattr(ftk.manager, "_cached", mgr)
    with pytest.raises(SystemExit) as ex:
        main(["run", str(path)])
    assert ex.value.code == 0, capsys.readouterr().err[-2000:]
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    base, ft = metrics["base"], metrics["finetuned"]
    assert {*KEYS, "perplexity", "eval_pairs"} <= set(base) and {*KEYS, "perplexity", "eval_pairs"} <= set(ft)
    assert base["eval_pairs"] == ft["eval_pairs"] == 8
    assert base["reward_accuracy"] == 0.5 and base["reward_margin"] == 0.0
    assert ft["reward_accuracy"] > base["reward_accuracy"] and ft["reward_margin"] > 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # the trainer's logged reference log-probs of the validation pairs before training are the base's here
    before = next(r for r in log if "eval_logps/chosen" in r)
    assert before["eval_logps/chosen"] == pytest.approx(base["logps_chosen"], rel=1e-5)
    report = (out / "report.md").read_text()
    assert "| reward_accuracy | 0.5000 |" in report and "![reward accuracy and margin](reward_curves.png)" in report
    assert (out / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Built-in metrics: `perplexity`, `bleu`, `rouge`, `preference`.

BLEU and ROUGE delegate to the reference packages (sacreBLEU, rouge-score) so ftk's numbers are the
numbers papers report; ftk only adapts the calling convention. The packages are imported inside the
factories so `ftk plugins list` stays instant. docs/evaluation.md gives each formula.
"""
from __future__ import annotations

import math

from ftk.components import MetricInfo
from ftk.errors import FtkError
from ftk.hookspecs import hookimpl

PERPLEXITY_SCHEMA = {"type": "object", "properties": {}}

BLEU_SCHEMA = {
    "type": "object",
    "properties": {
        # Only the tokenizers that need no extra packages (mecab / sentencepiece models are downloads).
        "tokenize": {"enum": ["13a", "none", "intl", "char", "zh"], "default": "13a",
                     "description": "sacreBLEU tokenizer; 13a is sacreBLEU's (and WMT's) default."},
        "smooth_method": {"enum": ["exp", "none", "floor", "add-k"], "default": "exp"},
        "smooth_value": {"type": ["number", "null"], "minimum": 0, "default": None,
                         "description": "For floor (default 0.1) and add-k (default 1)."},
        "lowercase": {"type": "boolean", "default": False},
        "max_ngram_order": {"type": "integer", "minimum": 1, "maximum": 10, "default": 4},
        "sentence_level": {"type": "boolean", "default": False,
                           "description": "Mean of per-sentence BLEU (effective order) instead of corpus BLEU."},
    },
}

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
ROUGE_SCHEMA = {
    "type": "object",
    "properties": {
        "rouge_types": {"type": "array", "minItems": 1, "uniqueItems": True,
                        "items": {"type": "string", "pattern": "^(rouge[1-9]|rougeL|rougeLsum)$"},
                        "default": ROUGE_TYPES},
        "use_stemmer": {"type": "boolean", "default": True,
                        "description": "Porter stemming of tokens longer than 3 characters (ROUGE-1.5.5 -m)."},
        "precision_recall": {"type": "boolean", "default": False,
                             "description": "Also report <type>_precision and <type>_recall."},
    },
}


PREFERENCE_SCHEMA = {
    "type": "object",
    "properties": {
        "beta": {"type": "number", "exclusiveMinimum": 0, "default": 0.1,
                 "description": "DPO's beta: reward = beta x (log-prob under the model - under the reference). "
                                "Set it to the trainer's beta (0.1 is TRL's default)."},
    },
}
PREFERENCE_KEYS = ["reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"]


def _with_defaults(metric: str, options: dict | None, schema: dict) -> dict:
    """Options as a recipe gives them (``name`` included, defaults maybe not filled) -> full options."""
    opts = {k: v for k, v in (options or {}).items() if k != "name"}
    unknown = sorted(set(opts) - set(schema["properties"]))
    if unknown:
        raise FtkError(f"metric {metric!r}: unknown option(s) {', '.join(unknown)}; "
                       f"known: {', '.join(schema['properties']) or '(none)'}")
    for key, sub in schema["properties"].items():
        opts.setdefault(key, sub.get("default"))
    return opts


def _check_pairs(metric: str, predictions, references) -> tuple[list[str], list[list[str]]]:
    """(predictions, references as lists of alternatives): same length, non-empty; each reference a
    string or a list of alternative references. Any iterables in, lists out (read once)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise FtkError(f"metric {metric!r}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise FtkError(f"metric {metric!r}: no predictions to score")
    refs = []
    for i, r in enumerate(references):
        alts = [r] if isinstance(r, str) else list(r)
        if not alts or not all(isinstance(a, str) for a in alts):
            raise FtkError(f"metric {metric!r}: reference {i} must be a string or a non-empty list of strings")
        refs.append(alts)
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise FtkError(f"metric {metric!r}: prediction {i} is {type(p).__name__}, expected a string")
    return predictions, refs


class Perplexity:
    """exp(sum of token NLL / number of scored tokens): token-weighted over the whole eval set."""

    requires = "loss"

    def __init__(self, options=None):
        _with_defaults("perplexity", options, PERPLEXITY_SCHEMA)

    def compute(self, nll_sum: float, token_count: int) -> dict[str, float]:
        if token_count <= 0:
            raise FtkError("metric 'perplexity': the evaluation set has no trained (labelled) tokens")
        mean = float(nll_sum) / int(token_count)
        if math.isnan(mean):
            raise FtkError("metric 'perplexity': the loss is NaN")
        try:
            ppl = math.exp(mean)
        except OverflowError:
            ppl = math.inf
        return {"perplexity": ppl}


class Bleu:
    """sacreBLEU BLEU on a 0-1 scale (sacreBLEU's score / 100)."""

    requires = "text"

    def __init__(self, options=None):
        from sacrebleu.metrics import BLEU

        self.options = o = _with_defaults("bleu", options, BLEU_SCHEMA)
        self._bleu = BLEU(lowercase=o["lowercase"], tokenize=o["tokenize"], smooth_method=o["smooth_method"],
                          smooth_value=o["smooth_value"], max_ngram_order=o["max_ngram_order"],
                          effective_order=o["sentence_level"])

    def compute(self, predictions, references) -> dict[str, float]:
        predictions, refs = _check_pairs("bleu", predictions, references)
        if self.options["sentence_level"]:
            scores = [self._bleu.sentence_score(p, r).score for p, r in zip(predictions, refs)]
            return {"bleu": sum(scores) / len(scores) / 100.0}
        # sacreBLEU wants reference streams (one list per reference position); None = no such reference.
        n = max(len(r) for r in refs)
        streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n)]
        return {"bleu": self._bleu.corpus_score(predictions, streams).score / 100.0}


class Rouge:
    """rouge-score F-measure per pair, averaged over pairs (several references: the best one per pair)."""

    requires = "text"

    def __init__(self, options=None):
        from rouge_score import rouge_scorer

        self.options = o = _with_defaults("rouge", options, ROUGE_SCHEMA)
        self._scorer = rouge_scorer.RougeScorer(list(o["rouge_types"]), use_stemmer=o["use_stemmer"])

    def compute(self, predictions, references) -> dict[str, float]:
        predictions, refs = _check_pairs("rouge", predictions, references)
        types = list(self.options["rouge_types"])
        sums = {t: [0.0, 0.0, 0.0] for t in types}  # precision, recall, fmeasure
        for pred, alts in zip(predictions, refs):
            # rouge-score's argument order is (target, prediction)
            scores = self._scorer.score(alts[0], pred) if len(alts) == 1 else self._scorer.score_multi(alts, pred)
            for t in types:
                s = scores[t]
                sums[t][0] += s.precision
                sums[t][1] += s.recall
                sums[t][2] += s.fmeasure
        n = len(refs)
        out = {}
        for t in types:
            out[t] = sums[t][2] / n
            if self.options["precision_recall"]:
                out[f"{t}_precision"] = sums[t][0] / n
                out[f"{t}_recall"] = sums[t][1] / n
        return out


class Preference:
    """DPO's implicit reward on held-out preference pairs: reward = beta x (log-prob under the scored model -
    log-prob under the reference), per response. ``reward_accuracy``: share of pairs whose chosen reward exceeds
    the rejected one, a tie counting 0.5 (so a model equal to its reference, whose rewards are all 0, scores
    chance); ``reward_margin``: mean of chosen - rejected reward; ``logps_chosen``/``logps_rejected``: mean
    summed log-probability of the responses under the scored model."""

    requires = "pairs"

    def __init__(self, options=None):
        self.options = _with_defaults("preference", options, PREFERENCE_SCHEMA)
        self.beta = self.options["beta"]
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise FtkError(f"metric 'preference': beta must be a number above 0, got {self.beta!r}")

    def compute(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> dict[str, float]:
        cols = [[float(v) for v in c] for c in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)]
        n = len(cols[0])
        if any(len(c) != n for c in cols):
            raise FtkError(f"metric 'preference': {', '.join(str(len(c)) for c in cols)} log-probabilities for "
                           f"chosen, rejected, reference chosen, reference rejected; expected one each per pair")
        if n == 0:
            raise FtkError("metric 'preference': no preference pairs to score")
        if any(math.isnan(v) for c in cols for v in c):
            raise FtkError("metric 'preference': a log-probability is NaN")
        chosen, rejected, ref_chosen, ref_rejected = cols
        margins = [self.beta * (c - rc) - self.beta * (r - rr)
                   for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
        return {"reward_accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / n,
                "reward_margin": sum(margins) / n,
                "logps_chosen": sum(chosen) / n, "logps_rejected": sum(rejected) / n}


def rouge_keys(options: dict) -> list[str]:
    """The keys ``Rouge.compute`` returns for these options (declared up front, so clashes are found early)."""
    o = _with_defaults("rouge", options, ROUGE_SCHEMA)
    suffixes = ("", "_precision", "_recall") if o["precision_recall"] else ("",)
    return [t + s for t in o["rouge_types"] for s in suffixes]


@hookimpl
def ftk_register_metrics(register):
    register("perplexity", Perplexity, description="exp(token-weighted NLL) over the trained tokens",
             options_schema=PERPLEXITY_SCHEMA,
             info=MetricInfo(keys=["perplexity"], higher_is_better=False, requires="loss"))
    register("bleu", Bleu, description="BLEU via sacreBLEU (13a, corpus level by default), 0-1 scale",
             options_schema=BLEU_SCHEMA, info=MetricInfo(keys=["bleu"], higher_is_better=True, requires="text"))
    register("rouge", Rouge, description="ROUGE-1/2/L/Lsum F-measure via rouge-score (stemming on)",
             options_schema=ROUGE_SCHEMA, info=MetricInfo(keys=rouge_keys, higher_is_better=True, requires="text"))
    register("preference", Preference, description="DPO implicit-reward accuracy and margin on held-out preference "
             "pairs, with their log-probabilities", options_schema=PREFERENCE_SCHEMA,
             info=MetricInfo(keys=PREFERENCE_KEYS, higher_is_better={"reward_accuracy": True, "reward_margin": True},
                             requires="pairs"))

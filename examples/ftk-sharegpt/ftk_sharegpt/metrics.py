"""Dialogue metrics: ``distinct_n`` (diversity of the generated replies) and ``exact_match``.

ftk calls ``factory(options)`` with the recipe's options for the metric (defaults filled from
``SCHEMA``) and then ``compute(predictions=[...], references=[...])`` because ``requires = "text"``.
"""
from __future__ import annotations

import re
import string


class DistinctN:
    """Distinct-1..n: unique n-grams / all n-grams over the generated replies (Li et al. 2016)"""

    requires = "text"
    SCHEMA = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 6, "default": 2,
                  "description": "Report distinct-1 up to distinct-n."},
            "lowercase": {"type": "boolean", "default": True},
        },
    }

    def __init__(self, options: dict | None = None):
        o = options or {}
        self.n = int(o.get("n", 2))
        self.lowercase = bool(o.get("lowercase", True))

    def compute(self, predictions: list[str], references: list[str] | None = None) -> dict[str, float]:
        # Corpus-level, as in the paper: n-grams are pooled over all replies, so a model that
        # gives every prompt the same answer scores low even if each answer is varied inside.
        out = {}
        tokenized = [(p.lower() if self.lowercase else p).split() for p in predictions]
        for k in range(1, self.n + 1):
            grams = [tuple(toks[i:i + k]) for toks in tokenized for i in range(len(toks) - k + 1)]
            out[f"distinct_{k}"] = len(set(grams)) / len(grams) if grams else 0.0
        return out


class ExactMatch:
    """Share of replies equal to the reference after normalization (SQuAD-style by default)"""

    requires = "text"
    SCHEMA = {
        "type": "object",
        "properties": {
            "normalize": {"type": "boolean", "default": True,
                          "description": "Lowercase, drop punctuation and articles, collapse spaces before comparing."},
        },
    }

    def __init__(self, options: dict | None = None):
        self.normalize = bool((options or {}).get("normalize", True))

    def compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"exact_match: {len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return {"exact_match": 0.0}
        norm = _squad_normalize if self.normalize else str.strip
        hits = sum(norm(p) == norm(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}


_PUNCT = set(string.punctuation)


def _squad_normalize(s: str) -> str:
    # the normalization of the official SQuAD v1.1 evaluation script
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())

"""Built-in metric `lm_eval`: EleutherAI's lm-evaluation-harness on the run's own model.

The metric takes the model itself (``requires = "model"``): ftk hands it the fine-tuned model, then the base
(the same model with its adapter disabled), each in eval mode as ftk evaluates every model, and the metric
wraps it with the harness's ``HFLM(pretrained=model, tokenizer=..., batch_size=...)`` and calls
``lm_eval.simple_evaluate`` on the recipe's tasks, with a ``TaskManager`` that also reads local task YAML
folders (``include_path``). Nothing is loaded a second time; a 4-bit model runs as ftk loaded it.

Each reported number is ``lm_eval/<task>/<metric>`` (``<metric>``: the harness's name, ``name,filter`` for a
filter other than ``none``). lm_eval is imported only when the metric is built (never by ``ftk plugins
list`` or ``ftk validate``); without it the metric is listed as unavailable. docs/evaluation.md has the rest.
"""
from __future__ import annotations

import copy
import difflib
import functools
import logging
import os

from ftk.components import MetricInfo, needs_package
from ftk.errors import FtkError
from ftk.hookspecs import hookimpl

log = logging.getLogger("ftk.plugins.lm_eval")

LM_EVAL_VERSIONS = ">=0.4.13,<0.5"  # checked with 0.4.13: HFLM on an in-memory model, TaskManager(include_path)
INSTALL = "pip install 'ftk[lm-eval]'"

# Which way each metric of lm-eval 0.4.13's registry improves (``@register_metric(higher_is_better=...)`` in
# lm_eval/api/metrics.py; tests/test_lm_eval.py checks this table against the installed registry). A task's
# metric outside it gets no verdict unless the recipe's ``higher_is_better`` option gives one.
DIRECTIONS = {
    "acc": True, "acc_norm": True, "acc_mutual_info": True, "acc_bytes": True, "acc_all": True,
    "exact_match": True, "likelihood": True, "mcc": True, "f1": True, "bleu": True, "chrf": True, "chrf++": True,
    "perplexity": False, "word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False,
    "brier_score": False, "ter": False,
}

SCHEMA = {
    "type": "object",
    "required": ["tasks"],
    "properties": {
        "tasks": {"type": "array", "minItems": 1, "uniqueItems": True,
                  "items": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
                  "description": "lm-eval task or group names (`lm-eval ls tasks`), or tasks defined by the YAML "
                                 "files under include_path"},
        "include_path": {"type": "array", "default": [],
                         "items": {"type": "string", "format": "path", "x-must-exist": True},
                         "description": "Folders of local task YAML files (lm-eval's --include_path), relative to "
                                        "the recipe; their tasks take precedence over lm-eval's own."},
        "num_fewshot": {"type": ["integer", "null"], "minimum": 0, "default": None,
                        "description": "Few-shot examples per prompt (null: each task's own, else 0)"},
        "limit": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                  "description": "At most this many examples per task (below 1: that share of them); null: all"},
        "batch_size": {"type": ["integer", "null"], "minimum": 1, "default": None,
                       "description": "null: training.eval_batch_size, else training.batch_size"},
        "metrics": {"type": ["array", "null"], "minItems": 1, "uniqueItems": True, "default": None,
                    "items": {"type": "string", "minLength": 1},
                    "description": "Which of a task's metrics to report: lm-eval's names, `name,filter` for a "
                                   "filter other than none (e.g. exact_match,strict-match); null: every metric of "
                                   "lm-eval's registry (acc, acc_norm, exact_match, word_perplexity, ...)"},
        "higher_is_better": {"type": "object", "default": {}, "additionalProperties": {"type": "boolean"},
                             "description": "Directions for metrics outside lm-eval's registry (a task's own), "
                                            "{metric: true if higher is better}."},
    },
}


def lm_eval_unavailable() -> str | None:
    """Why lm_eval cannot serve here (None: it can); package metadata only."""
    return needs_package("lm_eval", LM_EVAL_VERSIONS, INSTALL)


def _metrics(options: dict) -> list[str]:
    return list(options.get("metrics") or DIRECTIONS)


def key(task: str, metric: str) -> str:
    """The key a task's metric is reported under (``metric``: as the options name it)."""
    return f"lm_eval/{task}/{metric}"


def keys(options: dict) -> list[str]:
    return [key(t, m) for t in options.get("tasks") or [] for m in _metrics(options)]


def _direction(metric: str, options: dict) -> bool | None:
    own = options.get("higher_is_better") or {}
    base = metric.split(",")[0]
    for name in (metric, base):
        if name in own:
            return own[name]
    return DIRECTIONS.get(base)


def directions(options: dict) -> dict[str, bool]:
    return {key(t, m): d for t in options.get("tasks") or [] for m in _metrics(options)
            if (d := _direction(m, options)) is not None}


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager; indexing its own ~15,000 task files takes seconds, so it is built once per process
    for each set of folders, and without them when the recipe's tasks are all local."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def _quiet_in_memory_warnings() -> None:
    """HFLM warns on every call that it got a model object rather than a name: that is this metric's point."""
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _InMemoryModelNotes) for f in hf_log.filters):
        hf_log.addFilter(_InMemoryModelNotes())


class _InMemoryModelNotes(logging.Filter):
    NOTES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


_CHECKED: set = set()  # (tasks, include_path, metrics) checked in this process


class LmEval:
    """lm-eval's scores of the scored model on the recipe's tasks."""

    requires = "model"

    def __init__(self, options: dict):
        why = lm_eval_unavailable()
        if why:
            raise FtkError(f"metric 'lm_eval' {why}")
        self.options = o = {**{k: v.get("default") for k, v in SCHEMA["properties"].items()}, **options}
        self.tasks = list(o["tasks"])
        self.metrics = _metrics(o)
        paths = tuple(o["include_path"] or ())
        for j, p in enumerate(paths):
            if not os.path.isdir(p):
                raise FtkError(f"include_path[{j}]: {p} is not a folder of task YAML files")
        self.task_manager = self._manager(paths)
        self._check_loads(paths)

    def _manager(self, paths: tuple[str, ...]):
        if paths:  # every task a plain task of the local folders: lm-eval's own index is not needed
            local = _task_manager(paths, False)
            if all(t in local.all_subtasks for t in self.tasks):
                return local
        tm = _task_manager(paths, True)
        errors = []
        for j, t in enumerate(self.tasks):
            if t in tm.all_tags:
                errors.append(f"tasks[{j}]: {t!r} is a tag, whose tasks lm-eval reports one by one; list them "
                              f"(or a group) instead")
            elif t not in tm.all_tasks:
                close = difflib.get_close_matches(t, tm.all_tasks, n=3)
                errors.append(f"tasks[{j}]: unknown lm-eval task {t!r} (not a task or group of lm-eval"
                              + (" or of include_path" if paths else "") + ")"
                              + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
        if errors:
            raise FtkError(errors)
        return tm

    def _check_loads(self, paths: tuple[str, ...]) -> None:
        """Each task loads (its YAML parses, its dataset is reachable) and reports at least one of the requested
        metrics, checked when the metric is built, so before training."""
        checked = (tuple(self.tasks), paths, tuple(self.metrics))
        if checked in _CHECKED:
            return
        for j, t in enumerate(self.tasks):
            try:
                loaded = self.task_manager.load([t])
            except Exception as e:  # noqa: BLE001 - the harness's own error, one line
                detail = " ".join(str(e).split())[:300]
                raise FtkError(f"tasks[{j}]: lm-eval cannot load task {t!r}: {type(e).__name__}: {detail}") from None
            if loaded["groups"]:
                continue  # a group's numbers are its aggregate metrics, known once it ran
            task = loaded["tasks"].get(t)
            have = sorted(task.aggregation()) if task is not None else []
            if have and not any(m.split(",")[0] in have for m in self.metrics):
                raise FtkError(f"tasks[{j}]: task {t!r} reports {', '.join(have)}, none of which the metrics "
                               f"option lists ({', '.join(self.metrics)})")
        _CHECKED.add(checked)

    def evaluate(self, model, tokenizer, batch_size: int) -> dict:
        """``lm_eval.simple_evaluate``'s whole result for ``model`` (the harness's seeds, no stderr bootstrap)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        _quiet_in_memory_warnings()

        # HFLM sets a pad token on the tokenizer it gets: give it a copy, the run's stays as it is
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        return simple_evaluate(model=lm, tasks=list(self.tasks), num_fewshot=self.options["num_fewshot"],
                               limit=self.options["limit"], task_manager=self.task_manager, bootstrap_iters=0,
                               log_samples=False)

    def compute(self, model, tokenizer, context) -> dict[str, float]:
        res = self.evaluate(model, tokenizer, self.options["batch_size"] or context.batch_size)
        out: dict[str, float] = {}
        for t in self.tasks:
            scores = res["results"].get(t) or {}
            found = {m: scores[n] for m in self.metrics
                     if isinstance(scores.get(n := m if "," in m else f"{m},none"), (int, float))}
            if not found:
                have = sorted(k for k, v in scores.items() if "," in k and "_stderr" not in k
                              and isinstance(v, (int, float)))
                raise FtkError(f"metric 'lm_eval': task {t!r} reported " + (", ".join(have) or "no metric")
                               + f", none of the metrics option's ({', '.join(self.metrics)})")
            declared = res.get("higher_is_better", {}).get(t, {})
            for m, v in found.items():
                mine, theirs = _direction(m, self.options), declared.get(m.split(",")[0])
                if mine is not None and theirs is not None and mine != theirs:
                    log.warning("lm_eval: task %r says %s is %s-better; the report uses %s-better (set "
                                "higher_is_better in the metric's options)", t, m, "higher" if theirs else "lower",
                                "higher" if mine else "lower")
                out[key(t, m)] = float(v)
        return out


@hookimpl
def ftk_register_metrics(register):
    register("lm_eval", LmEval, description="EleutherAI lm-evaluation-harness tasks (named or local YAML) on the "
             "base and the fine-tuned model", options_schema=SCHEMA,
             info=MetricInfo(keys=keys, higher_is_better=directions, requires="model"),
             unavailable=lm_eval_unavailable())

"""Evaluation: token-weighted perplexity, batched generation, log-probabilities of preference pairs, and
the metric plugins over them (and over the model itself, for a metric that runs it its own way).

``evaluate_run`` is what ``ftk run`` calls after training; ``ftk eval`` calls ``evaluate_model``.
Metrics come only from the registry (``manager.get("metric", name)``), so a plugin metric is
evaluated exactly like a built-in one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable

from ftk.components import METRIC_INPUTS, MetricContext
from ftk.defaults import schema_default, section, section_defaults
from ftk.errors import FtkError

log = logging.getLogger("ftk.evaluate")

IGNORE_INDEX = -100
GENERATION_DEFAULTS = section_defaults("evaluation.generation")  # the schema's evaluation.generation


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int | None, device):
    """torch seeded with ``seed`` inside the block (nothing when None); the caller's random state comes back."""
    if seed is None:
        yield
        return
    import torch

    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _random_state_kept(device):
    """The block may seed or draw from Python's, NumPy's and torch's random generators (a benchmark harness
    seeds all three); the caller's states come back afterwards."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode and no grad for the block; the caller's training mode comes back afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


# -- perplexity -------------------------------------------------------------------------------------
class PerplexityEvaluator:
    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    def compute_nll(self, dataloader: Iterable[dict]) -> tuple[float, int]:
        """(sum of token NLL in nats, number of scored tokens) over batches of input_ids/labels.

        A token is scored where its label (after the causal shift) is not -100. With packed rows
        (``position_ids``), a target whose position is 0 starts a new example and cannot be predicted
        from the previous one, so it is not scored either. Only one batch of logits lives at a time.
        """
        import torch
        import torch.nn.functional as F

        device = _device(self.model)
        nll_sum = 0.0
        count = 0
        with _eval_mode(self.model):
            for batch in dataloader:
                labels = batch["labels"].to(device)
                kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
                pos = batch.get("position_ids")
                if pos is not None:
                    kwargs["position_ids"] = pos.to(device)
                if batch.get("attention_mask") is not None:
                    kwargs["attention_mask"] = batch["attention_mask"].to(device)
                logits = self.model(**kwargs).logits
                targets = labels[:, 1:]
                if pos is not None:
                    targets = targets.masked_fill(kwargs["position_ids"][:, 1:] == 0, IGNORE_INDEX)
                # float32 sum in float64 accumulation: token-weighted, not a mean of batch means
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
                nll_sum += float(loss.double())
                count += int((targets != IGNORE_INDEX).sum())
                del logits, loss
        return nll_sum, count

    def compute_perplexity(self, dataloader: Iterable[dict]) -> float:
        nll_sum, count = self.compute_nll(dataloader)
        if count == 0:
            raise FtkError("perplexity: the evaluation data has no labelled tokens")
        try:
            return math.exp(nll_sum / count)
        except OverflowError:
            return math.inf


# -- generation -------------------------------------------------------------------------------------
class QualitativeEvaluator:
    """Generation plus the text metrics. ``max_length`` counts NEW tokens (the seed API's name)."""

    def __init__(self, model, tokenizer, manager=None):
        self.model = model
        self.tokenizer = tokenizer
        self._manager = manager
        self._metrics: dict[str, Any] = {}

    # ids in, ids out; the text methods wrap this
    def generate_ids(self, prompts: list[str], max_length: int = 256, temperature: float | None = None,
                     top_p: float | None = None, num_beams: int | None = None, do_sample: bool | None = None,
                     repetition_penalty: float = 1.0, batch_size: int = 8, seed: int | None = None,
                     **kwargs) -> list[list[int]]:
        """Beam search, greedy decoding or sampling by the one rule of ``ftk.generation.resolve_decoding``
        (docs/evaluation.md, "Generation settings"): unset, 4-beam search; ``temperature`` or ``top_p`` alone
        samples; a combination that would be ignored raises FtkError naming the keyword. ``seed``: torch's
        random state for this call (the caller's state is left as it was), so sampling is reproducible."""
        import torch

        from ftk.generation import API, SAMPLING_EXTRAS, resolve_decoding

        decoding = resolve_decoding({"do_sample": do_sample, "num_beams": num_beams, "temperature": temperature,
                                     "top_p": top_p, **{k: kwargs.pop(k) for k in SAMPLING_EXTRAS if k in kwargs}},
                                    API)
        tok = self.tokenizer
        eos = tok.eos_token_id
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        # LLaMA has no pad token: pad with EOS (the attention mask hides it) without touching the tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if pad is None:
            raise FtkError("generation: the tokenizer has neither a pad nor an EOS token")
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if limit and max_length >= limit:
            raise FtkError(f"generation: max_new_tokens {max_length} must be below the model's context "
                           f"length {limit}")
        gen_kwargs = dict(max_new_tokens=max_length, **decoding, repetition_penalty=repetition_penalty,
                          pad_token_id=pad, use_cache=True, eos_token_id=gen_eos if gen_eos is not None else eos)
        gen_kwargs.update(kwargs)
        device = _device(self.model)
        out: list[list[int]] = []
        # Left padding, done here rather than by the tokenizer so its padding_side and pad token are
        # never changed: the new tokens then follow every prompt directly.
        with _eval_mode(self.model), _seeded(seed, device):
            for start in range(0, len(prompts), batch_size):
                rows = [self._prompt_ids(p, limit, max_length) for p in prompts[start:start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                seqs = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
                for row in seqs[:, width:].tolist():
                    out.append(_cut_at_eos(row, gen_kwargs["eos_token_id"]))
        return out

    def _prompt_ids(self, prompt: str, limit: int | None, max_new: int) -> list[int]:
        if prompt[-1:].isspace() and getattr(self.tokenizer, "backend_tokenizer", None) is not None:
            # "...Assistant: " is trained as [..., ":", "▁Hello"]: the space goes with the reply's first word, so
            # the prompt's ids end before it, as training saw them, not with a lone "▁" training never produced
            from ftk.tokens import prompt_token_ids

            ids = prompt_token_ids(self.tokenizer, prompt)[0]
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if limit and len(ids) + max_new > limit:
            # keep the end (where the prompt asks for the response) and the BOS token
            keep = limit - max_new
            log.warning("generation: prompt of %d tokens cut to its last %d to leave room for %d new tokens",
                        len(ids), keep, max_new)
            bos = self.tokenizer.bos_token_id
            ids = ([bos] + ids[-(keep - 1):]) if ids and ids[0] == bos and keep > 1 else ids[-keep:]
        if not ids:
            raise FtkError(f"generation: prompt {prompt[:40]!r} tokenizes to nothing")
        return ids

    def generate(self, prompts: list[str], max_length: int = 256, temperature: float | None = None,
                 top_p: float | None = None, num_beams: int | None = None, do_sample: bool | None = None,
                 **kwargs) -> list[str]:
        """Only the new text of each prompt, cut at EOS. Decoding as in :meth:`generate_ids`."""
        ids = self.generate_ids(list(prompts), max_length=max_length, temperature=temperature, top_p=top_p,
                                num_beams=num_beams, do_sample=do_sample, **kwargs)
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids]

    def generate_response(self, prompt: str, max_length: int = 256, temperature: float | None = None,
                          top_p: float | None = None, num_beams: int | None = None, do_sample: bool | None = None,
                          **kwargs) -> str:
        """One prompt's new text; ``temperature=0.7`` alone samples (see :meth:`generate_ids`)."""
        return self.generate([prompt], max_length=max_length, temperature=temperature, top_p=top_p,
                             num_beams=num_beams, do_sample=do_sample, **kwargs)[0]

    def compute_metric(self, name: str, references: list[str], hypotheses: list[str]) -> dict[str, float]:
        """Any installed text metric (``requires = "text"``) by its registered name, default options."""
        if name not in self._metrics:
            from ftk.manager import get_manager

            mgr = self._manager or get_manager()
            comp = mgr.get("metric", name)
            with mgr.calling(comp, "building the metric"):
                obj = comp.factory({})
            if getattr(obj, "requires", None) != "text":
                raise FtkError(f"metric {name!r} scores {getattr(obj, 'requires', None)!r}, not generated text")
            self._metrics[name] = _AttributedMetric(obj, mgr.wrap(comp, "computing", obj.compute))
        return self._metrics[name].compute(predictions=list(hypotheses), references=list(references))

    # the seed API's two names, kept: each is compute_metric with that registered metric
    def compute_bleu(self, references: list[str], hypotheses: list[str]) -> float:
        """Corpus BLEU, sacreBLEU defaults, 0-1 scale."""
        return self.compute_metric("bleu", references, hypotheses)["bleu"]

    def compute_rouge(self, references: list[str], hypotheses: list[str]) -> dict[str, float]:
        """rouge1/rouge2/rougeL/rougeLsum F-measure (stemming on)."""
        return self.compute_metric("rouge", references, hypotheses)


def _cut_at_eos(row: list[int], eos) -> list[int]:
    """New tokens up to (not including) the first EOS; generate pads finished rows after it."""
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


# -- preference pairs -------------------------------------------------------------------------------
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")  # one pair of the "pairs" data form


class PreferenceEvaluator:
    """Log-probabilities of preference pairs' responses, computed as TRL's ``DPOTrainer`` computes them."""

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    def compute_logps(self, pairs, batch_size: int = 4) -> tuple[list[float], list[float]]:
        """(chosen, rejected), one float per pair: the sum over the response's tokens of
        ``log_softmax(logits)[token]``, each token predicted from the prompt and the response before it (the
        first from the prompt's last position). ``pairs``: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` dicts
        (the "pairs" data form). A batch holds its pairs' prompt+chosen rows then their prompt+rejected rows,
        right padded with an attention mask, TRL's ``DataCollatorForPreference`` layout; the scores are float32
        sums, as TRL's. Only one batch of logits lives at a time."""
        import torch

        pairs = [_checked_pair(p, i) for i, p in enumerate(pairs)]
        tok = self.tokenizer
        pad = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                    if t is not None), 0)  # right padding behind the attention mask: any id does
        device = _device(self.model)
        step = max(1, int(batch_size))
        chosen: list[float] = []
        rejected: list[float] = []
        with _eval_mode(self.model):
            for start in range(0, len(pairs), step):
                batch = pairs[start:start + step]
                seqs = ([p["prompt_ids"] + p["chosen_ids"] for p in batch]
                        + [p["prompt_ids"] + p["rejected_ids"] for p in batch])
                prompt_lens = [len(p["prompt_ids"]) for p in batch] * 2
                width = max(len(s) for s in seqs)
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
                # response[i, t]: token t of row i is a response token (so it is scored, from position t - 1)
                response = torch.tensor([[0] * n + [1] * (len(s) - n) + [0] * (width - len(s))
                                         for s, n in zip(seqs, prompt_lens)], dtype=torch.bool, device=device)
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                scored = response[:, 1:]
                # log-softmax only where a response token is predicted (not over every prompt position)
                picked = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)
                token_logps = torch.zeros(scored.shape, dtype=torch.float32, device=device)
                token_logps[scored] = picked.gather(-1, ids[:, 1:][scored].unsqueeze(-1)).squeeze(-1)
                sums = token_logps.sum(dim=1).tolist()
                chosen += sums[:len(batch)]
                rejected += sums[len(batch):]
                del logits, picked
        return chosen, rejected


def _checked_pair(pair, index: int) -> dict:
    """A pair's three id lists as lists of ints; a malformed pair is one line naming it."""
    try:
        out = {k: [int(t) for t in pair[k]] for k in PAIR_KEYS}
    except (KeyError, TypeError, ValueError) as e:
        raise FtkError(f"evaluation: validation pair {index} is not a {{{', '.join(PAIR_KEYS)}}} dict of token id "
                       f"lists ({type(e).__name__}: {e})") from None
    if not out["prompt_ids"]:
        raise FtkError(f"evaluation: validation pair {index} has an empty prompt_ids (it starts with BOS)")
    return out


def _validation_pairs(prepared) -> list:
    """The validation split's preference pairs (every one) when the prepared data is of the "pairs" form."""
    if getattr(prepared, "form", "rows") != "pairs" or prepared.validation is None:
        return []
    return list(prepared.validation)


# -- metrics from the recipe ------------------------------------------------------------------------
DEFAULT_METRICS = schema_default("evaluation.metrics")
OWN_KEYS = ("eval_samples", "eval_tokens", "eval_pairs")  # what ftk itself adds beside the metrics' keys


def _metric_specs(recipe: dict) -> list[dict]:
    """recipe.evaluation.metrics as ``{"name": ..., options...}`` objects."""
    specs = (recipe.get("evaluation") or {}).get("metrics", DEFAULT_METRICS)
    return [{"name": s} if isinstance(s, str) else dict(s) for s in specs]


def _known_metrics(recipe: dict, manager):
    """(index, spec, component) of the recipe's metric entries whose name resolves; an unknown name is
    validate_recipe's error, not the declarations'."""
    for i, spec in enumerate(_metric_specs(recipe)):
        try:
            yield i, spec, manager.get("metric", spec.get("name"))
        except (FtkError, TypeError):
            continue


def _entry_options(comp, spec: dict) -> dict:
    """A metric entry's options as the factory gets them (defaults filled, even for a recipe that did not go
    through ``load_recipe``)."""
    import copy

    from ftk.recipe import fill_defaults

    return fill_defaults(copy.deepcopy({k: v for k, v in spec.items() if k != "name"}), comp.options_schema)


def _declared_keys(manager, comp, spec: dict) -> list[str] | None:
    """The keys a metric entry declares (None: undeclared); ``keys(options)`` gets the options as the
    factory does."""
    if comp.info is None:
        return None
    options = _entry_options(comp, spec)
    with manager.calling(comp, "declaring its keys"):
        return comp.info.keys_for(options)


def _declared_directions(manager, comp, spec: dict):
    """What a metric entry declares of its keys' directions: a bool, ``{key: bool}`` or None;
    ``higher_is_better(options)`` gets the options as the factory does."""
    if comp.info is None:
        return None
    options = _entry_options(comp, spec)
    with manager.calling(comp, "declaring its directions"):
        return comp.info.directions_for(options)


def check_metrics(recipe: dict, manager) -> list[str]:
    """What the metrics of a (valid, defaults filled) recipe declare, checked before anything loads: a
    declared input ftk cannot supply, a key two entries both declare, a key that is ftk's own. One line
    each, naming the entries' JSON paths. Undeclared keys are checked when reported (``_merge``). (Whether the
    run's data can supply a metric's input, preference pairs, depends on the trainer: :func:`build_metrics`.)"""
    errors: list[str] = []
    owners: dict[str, tuple[str, str]] = {}  # key -> (JSON path, metric name) of the first entry declaring it
    for i, spec, comp in _known_metrics(recipe, manager):
        path, name = f"evaluation.metrics[{i}]", spec.get("name")
        info = comp.info
        if info is not None and info.requires is not None and info.requires not in METRIC_INPUTS:
            errors.append(f"{path}: metric {name!r} (plugin {comp.plugin}) requires {info.requires!r}, which this "
                          f"ftk cannot supply (it supplies {', '.join(METRIC_INPUTS)})")
        clashes: dict[tuple[str, str], list[str]] = {}
        for key in _declared_keys(manager, comp, spec) or []:
            if key in OWN_KEYS:
                errors.append(f"{path}: metric {name!r} declares {key!r}, a key ftk itself reports")
            elif key in owners:
                clashes.setdefault(owners[key], []).append(key)
            else:
                owners[key] = (path, name)
        for (other_path, other), keys in clashes.items():
            errors.append(f"{path}: metric {name!r} reports {', '.join(map(repr, keys))}, as does {other_path} "
                          f"(metric {other!r}); one would overwrite the other")
    return errors


def _data_form(recipe: dict, manager) -> str | None:
    """The data form the recipe's trainer trains on (its plan's ``data``, one of DATA_FORMS); None when the
    trainer cannot be planned (that error is the training plan's own, reported where it is made)."""
    from ftk import train as train_mod

    try:
        return train_mod.trainer_plan(recipe, manager, str(recipe.get("output_dir") or ".")).data
    except FtkError:
        return None


def _pairs_refusals(recipe: dict, manager, entries: list[tuple[int, str]], form: str | None = None) -> list[str]:
    """One line per metric entry ``(index, name)`` that scores preference pairs while the run's data (``form``;
    None: the form the recipe's trainer asks for, its factory called only when there are such entries) is not
    pairs."""
    if not entries:
        return []
    form = form or _data_form(recipe, manager)
    if form in (None, "pairs"):
        return []
    from ftk.train import trainer_section

    method = trainer_section(recipe).get("method")
    return [f"evaluation.metrics[{i}]: metric {name!r} scores preference pairs, but trainer {method!r} trains on "
            f"{form!r} data; use a trainer of preference pairs (trainer.method, e.g. dpo) or drop the metric"
            for i, name in entries]


def metric_directions(recipe: dict, manager=None) -> dict[str, bool]:
    """{key: True if higher is better} for every key the recipe's metrics declare a direction for (a
    ``{key: bool}`` direction counts even without declared keys). What the report's "better" column uses;
    a key missing here gets no verdict."""
    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    out: dict[str, bool] = {}
    for _, spec, comp in _known_metrics(recipe, manager):
        if comp.info is None:
            continue
        hib = _declared_directions(manager, comp, spec)
        keys = _declared_keys(manager, comp, spec)
        for k in keys if keys is not None else (hib if isinstance(hib, dict) else ()):
            d = hib.get(k) if isinstance(hib, dict) else hib
            if d is not None:
                out.setdefault(k, d)
    return out


def build_metrics(recipe: dict, manager, data_form: str | None = None) -> list[tuple[str, Any]]:
    """[(name, metric object)] for recipe.evaluation.metrics, each built by its plugin's factory. A metric of
    preference pairs is refused (FtkError, one line per entry) unless the data is pairs: ``data_form``, the
    prepared data's form, or (None) the form the recipe's trainer asks for."""
    out = []
    seen: list[dict] = []
    for i, spec in enumerate(_metric_specs(recipe)):
        name = spec["name"]
        comp = manager.get("metric", name)
        if spec in seen:  # the same metric with the same options reports the same keys: refused up front
            raise FtkError(f"evaluation.metrics[{i}]: metric {name!r} is listed twice with the same options "
                           f"(evaluation.metrics[{seen.index(spec)}]); both would report the same keys")
        seen.append(spec)
        keys = _declared_keys(manager, comp, spec)
        try:
            with manager.calling(comp, "building the metric"):
                obj = comp.factory({k: v for k, v in spec.items() if k != "name"})
        except FtkError as e:
            if type(e) is not FtkError:  # a plugin failure, bad data, a stopped run: as they are
                raise
            raise FtkError([_located(f"evaluation.metrics[{i}]", m, comp.options_schema) for m in e.messages]) from None
        requires = getattr(obj, "requires", None)
        declared = comp.info.requires if comp.info is not None else None
        if requires not in METRIC_INPUTS or declared not in (None, requires):
            raise FtkError(f"evaluation.metrics[{i}]: metric {name!r} (plugin {comp.plugin}) has "
                           f"requires={requires!r}; expected " + (f"{declared!r}, as its MetricInfo declares"
                                                                 if declared else " or ".join(map(repr, METRIC_INPUTS))))
        out.append((name, _AttributedMetric(obj, manager.wrap(comp, "computing", obj.compute), keys)))
    refused = _pairs_refusals(recipe, manager, [(i, n) for i, (n, m) in enumerate(out) if m.requires == "pairs"],
                              data_form)
    if refused:
        raise FtkError(refused)
    return out


def _located(path: str, message: str, options_schema: dict) -> str:
    """A metric factory's error line that starts with one of its options' paths (``tasks[1]: ...``) names
    where that is in the recipe (``evaluation.metrics[0].tasks[1]: ...``); any other line is left as written."""
    m = re.match(r"([A-Za-z_][\w-]*)((?:\[\d+\]|\.[A-Za-z_][\w-]*)*): ", message)
    if m and m.group(1) in (options_schema.get("properties") or {}):
        return f"{path}.{message}"
    return message


class _AttributedMetric:
    """A plugin's metric whose ``compute`` names the plugin when it raises (other attributes: the metric's);
    ``keys``: the keys it declared (None: undeclared)."""

    def __init__(self, metric, compute, keys=None):
        self.metric, self.requires, self.compute, self.keys = metric, metric.requires, compute, keys

    def __getattr__(self, name):
        return getattr(self.metric, name)


def _merge(result: dict, name: str, values: dict, owners: dict, entry: int, declared=None) -> None:
    """Add one metric entry's values; ``owners``: key -> (entry index, name) of who reported it;
    ``declared``: the keys the metric declared (a key outside them is the plugin's error)."""
    for k, v in values.items():
        if declared is not None and k not in declared:
            raise FtkError(f"evaluation.metrics[{entry}]: metric {name!r} reported {k!r}, which it did not "
                           f"declare (its MetricInfo keys: {', '.join(declared) or '(none)'})")
        if k in owners and owners[k][0] != entry:
            other = owners[k][1]
            raise FtkError(f"evaluation.metrics: metrics {other!r} and {name!r} both report {k!r}" if other != name
                           else f"evaluation.metrics: two {name!r} entries both report {k!r}")
        owners[k] = (entry, name)
        result[k] = float(v)


def _declared(metric) -> list[str] | None:
    return metric.keys if isinstance(metric, _AttributedMetric) else None


def generation_settings(recipe: dict) -> dict:
    """The recipe's ``evaluation.generation`` over the schema's defaults (the decoding keys stay unset unless
    given), plus ``seed``: the recipe's ``training.seed``, which seeds sampling so that two evaluations of the
    same model give the same text."""
    gen = dict(GENERATION_DEFAULTS)
    gen.update((recipe.get("evaluation") or {}).get("generation") or {})
    gen["seed"] = section(recipe, "training")["seed"]
    return gen


def _gen_call_kwargs(gen: dict) -> dict:
    """``QualitativeEvaluator.generate`` keywords for :func:`generation_settings`' dict: the decoding resolved by
    the one rule (a refusal names ``evaluation.generation.KEY``), ``max_new_tokens`` as ``max_length``."""
    from ftk.generation import DECODING_KEYS, RECIPE, resolve_decoding

    kw = {k: v for k, v in gen.items() if k not in DECODING_KEYS}
    kw["max_length"] = kw.pop("max_new_tokens")
    kw.update(resolve_decoding(gen, RECIPE))
    return kw


def _eval_dataloader(prepared, recipe: dict):
    import torch

    rows = prepared.validation_unpacked
    if rows is None and getattr(prepared, "form", "rows") == "rows":
        rows = prepared.validation
    if rows is None:
        return None
    return torch.utils.data.DataLoader(rows, batch_size=_eval_batch_size(recipe), shuffle=False,
                                       collate_fn=prepared.collator)


def _eval_batch_size(recipe: dict) -> int:
    tr = recipe.get("training") or {}
    return tr.get("eval_batch_size") or tr.get("batch_size") or 4


def score_model(model, tokenizer, metrics, dataloader, prompts, references, gen: dict,
                pair_logps: dict | None = None, context: MetricContext | None = None,
                seconds: dict | None = None) -> tuple[dict, list[str]]:
    """One model's metrics: loss metrics over ``dataloader``, text metrics over generated answers, pair metrics
    over ``pair_logps`` (the keyword arguments of a "pairs" metric's ``compute``: this model's log-probabilities
    of each validation pair's responses and the reference's, see :func:`evaluate_model`), model metrics over the
    model itself, with ``context`` (None: one with ``scoring=None`` and the defaults' batch size and seed), in
    eval mode without grad, the caller's random states kept. ``seconds``: a dict that gets the wall time of
    each part (``loss``: the validation NLL, ``generation``, ``model``: the model metrics, ``metrics``: the
    metrics' own computing)."""
    result: dict[str, float] = {}
    seconds = {} if seconds is None else seconds
    clock = _Clock(seconds)
    owners: dict[str, str] = {}

    def compute(requires: str, **inputs) -> None:
        for i, (name, m) in enumerate(metrics):
            if m.requires == requires:
                with clock("model" if requires == "model" else "metrics"):
                    _merge(result, name, m.compute(**inputs), owners, i, _declared(m))

    def names(requires: str) -> str:
        return ", ".join(dict.fromkeys(n for n, m in metrics if m.requires == requires))

    if any(m.requires == "loss" for _, m in metrics):
        if dataloader is None:
            raise FtkError(f"evaluation: {names('loss')} need(s) the loss over a validation split "
                           f"(data.validation_size > 0)")
        with clock("loss"):
            nll, count = PerplexityEvaluator(model, tokenizer).compute_nll(dataloader)
        compute("loss", nll_sum=nll, token_count=count)
        result["eval_tokens"] = count
    if any(m.requires == "pairs" for _, m in metrics):
        if not pair_logps or not pair_logps.get("chosen_logps"):
            raise FtkError(f"evaluation: {names('pairs')} need(s) preference pairs in the validation split "
                           f"(data.validation_size > 0), and it has none")
        compute("pairs", **pair_logps)
        result["eval_pairs"] = len(pair_logps["chosen_logps"])
    if any(m.requires == "model" for _, m in metrics):
        if context is None:
            context = metric_context({}, None)
        with _eval_mode(model), _random_state_kept(_device(model)):
            compute("model", model=model, tokenizer=tokenizer, context=context)
    preds: list[str] = []
    if any(m.requires == "text" for _, m in metrics):
        if not prompts:
            raise FtkError("evaluation: the generation metrics need (prompt, reference) pairs from the "
                           "validation split, and it has none")
        with clock("generation"):
            preds = QualitativeEvaluator(model, tokenizer).generate(prompts, **_gen_call_kwargs(gen))
        compute("text", predictions=preds, references=references)
    result["eval_samples"] = len(prompts)
    return result, preds


class _Clock:
    """``with clock(part):`` adds the block's wall time to ``seconds[part]`` (rounded to ms)."""

    def __init__(self, seconds: dict):
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, part: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = round(self.seconds.get(part, 0.0) + time.perf_counter() - t, 3)


def metric_context(recipe: dict, scoring: str | None) -> MetricContext:
    """What a "model" metric gets beside the model: which model it scores and the recipe's settings."""
    return MetricContext(scoring=scoring, recipe=recipe, batch_size=_eval_batch_size(recipe),
                         seed=section(recipe, "training")["seed"])


def _pair_inputs(policy, reference) -> dict | None:
    """A "pairs" metric's ``compute`` keywords from (chosen, rejected) log-probabilities of the scored model and
    of the reference; None when no pairs were scored."""
    if policy is None:
        return None
    return {"chosen_logps": list(policy[0]), "rejected_logps": list(policy[1]),
            "ref_chosen_logps": list(reference[0]), "ref_rejected_logps": list(reference[1])}


def evaluate_model(model, tokenizer, prepared, recipe: dict, manager, compare_base: bool | None = None,
                   seconds: dict | None = None) -> dict:
    """{"finetuned": {...}, "base": {...}, "samples": [...]} (only "base" for a model with no adapter).

    Metrics of preference pairs get, per validation pair, the summed log-probabilities of the chosen and the
    rejected response under the scored model and under the reference, the same model with its adapter disabled
    (DPO's reference for a new adapter): the fine-tuned model is scored against the base, the base against
    itself (so its implicit rewards are all 0). The base's log-probabilities are computed once for both."""
    ev = recipe.get("evaluation") or {}
    metrics = build_metrics(recipe, manager, data_form=getattr(prepared, "form", "rows"))
    gen = generation_settings(recipe)
    pairs = list(prepared.eval_pairs or [])[: ev.get("max_samples", schema_default("evaluation.max_samples"))]
    prompts = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    loader = _eval_dataloader(prepared, recipe) if any(m.requires == "loss" for _, m in metrics) else None
    has_adapter = hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))
    if compare_base is None:
        compare_base = ev.get("compare_base", schema_default("evaluation.compare_base"))
    val_pairs = _validation_pairs(prepared) if any(m.requires == "pairs" for _, m in metrics) else []

    # ``seconds`` gets the wall time of each part per scored model ("pairs": the pairs' log-probabilities)
    seconds = {} if seconds is None else seconds
    seconds.update(finetuned={}, base={})

    def logps(scored: str):  # (chosen, rejected) of every validation pair under the model as it is now
        if not val_pairs:
            return None
        with _Clock(seconds[scored])("pairs"):
            return PreferenceEvaluator(model, tokenizer).compute_logps(val_pairs, _eval_batch_size(recipe))

    out: dict[str, Any] = {}
    preds_ft: list[str] | None = None
    preds_base: list[str] | None = None
    if has_adapter:
        log.info("evaluating the fine-tuned model")
        policy = logps("finetuned")
        with model.disable_adapter():  # same weights in memory, adapter bypassed: no second load
            base = logps("base")
        out["finetuned"], preds_ft = score_model(model, tokenizer, metrics, loader, prompts, refs, gen,
                                                 _pair_inputs(policy, base), metric_context(recipe, "finetuned"),
                                                 seconds["finetuned"])
        if compare_base:
            log.info("evaluating the base model (adapter disabled)")
            with model.disable_adapter():
                out["base"], preds_base = score_model(model, tokenizer, metrics, loader, prompts, refs, gen,
                                                      _pair_inputs(base, base), metric_context(recipe, "base"),
                                                      seconds["base"])
    else:
        log.info("evaluating the base model (no adapter)")
        base = logps("base")
        out["base"], preds_base = score_model(model, tokenizer, metrics, loader, prompts, refs, gen,
                                              _pair_inputs(base, base), metric_context(recipe, "base"), seconds["base"])
    for scored in ("finetuned", "base"):
        if not seconds[scored]:  # not scored (compare_base off, or no adapter)
            del seconds[scored]
    out["samples"] = [
        {"prompt": p, "reference": r,
         "finetuned": preds_ft[i] if preds_ft else None,
         "base": preds_base[i] if preds_base else None}
        for i, (p, r) in enumerate(pairs)
    ] if (preds_ft or preds_base) else []
    return out


def evaluate_run(model, tokenizer, prepared, recipe: dict, manager, output_dir,
                 compare_base: bool | None = None, seconds: dict | None = None) -> dict:
    """What ``ftk run`` and ``ftk eval --out`` record. All generations go to OUTPUT_DIR/generations.jsonl
    (one line per prompt, so none replaces an older file too; nothing is written when ``output_dir`` is
    None); the returned ``samples`` keep the first ``evaluation.num_examples_in_report`` of them."""
    from ftk.io import atomic_write_text
    import json

    out = evaluate_model(model, tokenizer, prepared, recipe, manager, compare_base=compare_base, seconds=seconds)
    samples = out.get("samples") or []
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "generations.jsonl",
                          "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    keep = (recipe.get("evaluation") or {}).get("num_examples_in_report",
                                                schema_default("evaluation.num_examples_in_report"))
    out["samples"] = samples[:keep]
    return out


__all__ = ["PerplexityEvaluator", "QualitativeEvaluator", "PreferenceEvaluator", "evaluate_run", "evaluate_model",
           "build_metrics", "check_metrics", "metric_directions", "score_model", "generation_settings",
           "metric_context"]

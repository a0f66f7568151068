"""Which decoding a generation runs: beam search, greedy decoding or sampling. One rule, :func:`resolve_decoding`,
for all three ways of asking: the recipe (``evaluation.generation``), the command line (``ftk generate``) and the
Python API (``QualitativeEvaluator.generate*``). docs/evaluation.md ("Generation settings") is its table.

- ``do_sample``, ``num_beams``, ``temperature`` and ``top_p`` start unset (None).
- Sampling happens when ``do_sample`` is true, or when ``temperature`` (> 0) or ``top_p`` is given and ``do_sample``
  is not false. A sampling run without a temperature uses 1.0, without top_p 1.0 (transformers' meaning).
- ``temperature`` 0 means greedy decoding (OpenAI's and vLLM's convention); with ``top_p`` or ``do_sample`` true too
  it is refused.
- ``do_sample`` false with a temperature (other than 0) or a top_p is refused: one of them would be ignored.
- ``num_beams`` unset: 4 (beam search) when not sampling, except that temperature 0 means 1 (greedy); 1 when
  sampling. A ``num_beams`` above 1 while sampling is honoured: transformers' beam-search multinomial sampling.

Refusals are :class:`ftk.errors.FtkError`, one line per problem, naming the setting the way it was given (see
:class:`Naming`). The result is what ``model.generate`` gets, and resolving it again gives it back unchanged.
Pure Python: nothing heavy is imported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ftk.errors import FtkError

BEAMS_WHEN_NOT_SAMPLING = 4  # num_beams unset, no sampling: the deterministic beam search evaluation metrics use
DECODING_KEYS = ("do_sample", "num_beams", "temperature", "top_p")
# keywords that, like top_p, only mean something when sampling; the Python API passes them on to transformers
SAMPLING_EXTRAS = ("top_k", "min_p", "typical_p")


@dataclass(frozen=True)
class Naming:
    """How an error names a setting: ``key(k)`` the setting itself, ``given(k, v)`` the setting with its value."""

    key: Callable[[str], str]
    given: Callable[[str, Any], str]


RECIPE = Naming(lambda k: f"evaluation.generation.{k}",
                lambda k, v: f"evaluation.generation.{k} is {json.dumps(v)}")
CLI = Naming(lambda k: "--" + k.replace("_", "-"),
             lambda k, v: (("--do-sample" if v else "--no-sample") if k == "do_sample"
                           else f"--{k.replace('_', '-')} {v:g}") + " is given")
API = Naming(lambda k: f"{k}=", lambda k, v: f"{k}={v!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value_errors(settings: Mapping[str, Any], naming: Naming = API) -> list[str]:
    """Decoding settings of the wrong type or range (the recipe's schema and the CLI's option types say the same)."""
    out = []
    do_sample, beams = settings.get("do_sample"), settings.get("num_beams")
    temperature, top_p = settings.get("temperature"), settings.get("top_p")
    if do_sample is not None and not isinstance(do_sample, bool):
        out.append(f"{naming.key('do_sample')}: must be true or false, got {do_sample!r}")
    whole = (_number(beams) and isinstance(beams, int)) or (isinstance(beams, float) and beams.is_integer())
    if beams is not None and not (whole and beams >= 1):
        out.append(f"{naming.key('num_beams')}: must be a whole number >= 1, got {beams!r}")
    if temperature is not None and not (_number(temperature) and temperature >= 0):
        out.append(f"{naming.key('temperature')}: must be a number >= 0 (0: greedy decoding), got {temperature!r}")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        out.append(f"{naming.key('top_p')}: must be a number above 0 and at most 1, got {top_p!r}")
    return out


def combination_errors(settings: Mapping[str, Any], naming: Naming = API) -> list[str]:
    """Settings (of valid values) that contradict each other: one of them would be ignored."""
    do_sample, temperature = settings.get("do_sample"), settings.get("temperature")
    knobs = [k for k in ("top_p", *SAMPLING_EXTRAS) if settings.get(k) is not None]
    if temperature == 0:
        out = [f"{naming.key(k)}: only applies when sampling, but {naming.given('temperature', temperature)} "
               f"(greedy decoding); drop one" for k in knobs]
        if do_sample is True:
            out.append(f"{naming.key('temperature')}: 0 means greedy decoding, but "
                       f"{naming.given('do_sample', True)}; drop one")
        return out
    if do_sample is False:
        knobs = ["temperature"] * (temperature is not None) + knobs
        return [f"{naming.key(k)}: only applies when sampling, but {naming.given('do_sample', False)}; drop one"
                for k in knobs]
    return []


def resolve_decoding(settings: Mapping[str, Any], naming: Naming = API) -> dict:
    """The ``model.generate`` keywords for ``settings`` (any mapping; the keys of :data:`DECODING_KEYS` and
    :data:`SAMPLING_EXTRAS` are read, the rest ignored): ``do_sample`` and ``num_beams`` always, and when sampling
    ``temperature`` and ``top_p`` (plus the extras given). Raises FtkError naming each refused setting."""
    errors = value_errors(settings, naming) or combination_errors(settings, naming)
    if errors:
        raise FtkError(errors)
    do_sample, beams, temperature = settings.get("do_sample"), settings.get("num_beams"), settings.get("temperature")
    greedy = temperature == 0
    sampling = do_sample is True or (do_sample is None and not greedy and any(
        settings.get(k) is not None for k in ("temperature", "top_p", *SAMPLING_EXTRAS)))
    if beams is None:
        beams = 1 if sampling or greedy else BEAMS_WHEN_NOT_SAMPLING
    out: dict[str, Any] = {"do_sample": sampling, "num_beams": int(beams)}
    if sampling:
        out["temperature"] = 1.0 if temperature is None else temperature
        out["top_p"] = 1.0 if settings.get("top_p") is None else settings["top_p"]
        out.update((k, settings[k]) for k in SAMPLING_EXTRAS if settings.get(k) is not None)
    return out


def recipe_errors(generation: Any) -> list[str]:
    """What ``load_recipe`` (so ``ftk validate``) reports for a recipe's ``evaluation.generation``: the refused
    combinations. Values of the wrong type or range are the schema's to report, so they are left out here."""
    if not isinstance(generation, dict) or value_errors(generation, RECIPE):
        return []
    return combination_errors(generation, RECIPE)


__all__ = ["resolve_decoding", "recipe_errors", "value_errors", "combination_errors", "Naming", "RECIPE", "CLI",
           "API", "DECODING_KEYS", "SAMPLING_EXTRAS", "BEAMS_WHEN_NOT_SAMPLING"]

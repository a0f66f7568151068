"""The Python API of the seed: config dataclasses that map one-to-one onto recipe sections, and
``LLAMATrainer``. Everything goes through ``ftk.recipe.load_recipe(data=...)``, so a config made here is
validated exactly like a recipe file (same errors, same defaults)::

    from ftk.api import LLAMATrainer, ModelConfig, DataConfig, TrainingConfig

    t = LLAMATrainer(model_config=ModelConfig(name="../shared/models/stories260K"),
                     data_config=DataConfig(datasets=[{"loader": "alpaca", "path": "alpaca_sample.json"}]),
                     training_config=TrainingConfig(max_steps=20), output_dir="runs/api")
    t.train()
    print(t.evaluate(test_prompts=["Name three colors."]))
"""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ftk.defaults import default_field as _default
from ftk.defaults import schema_default
from ftk.errors import FtkError, PluginError

# Every field default below is the recipe schema's default for the key it maps to. Options that belong
# to a component (the adapter's r, a quantizer's nested) default to UNSET and are filled from that
# component's own options schema when the config is made: the API knows no concrete component.


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def _component_defaults(obj, kind: str, name: str, keys) -> None:
    """Fill ``obj``'s UNSET fields among ``keys`` from component ``name``'s options schema (left UNSET
    when the component is unknown here or gives no default: validation then speaks)."""
    from ftk.manager import get_manager

    try:
        props = get_manager().get(kind, name).options_schema.get("properties") or {}
    except PluginError:
        return
    for key in keys:
        if getattr(obj, key) is UNSET and "default" in (props.get(key) or {}):
            setattr(obj, key, copy.deepcopy(props[key]["default"]))


def _spellings(renames: dict[str, str], translate=None):
    """Class decorator: the specification's keyword names (``renames``: its name -> ftk's field) as a
    second spelling of the same field (one field, one validation), readable as attributes too;
    ``translate(kwargs)`` maps spellings that are not plain renames. Unknown or doubly given keywords
    are an FtkError naming them."""

    def deco(cls):
        init = cls.__init__
        names = [f.name for f in fields(cls)]

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for alias, name in renames.items():
                if alias in kwargs:
                    if name in kwargs and kwargs[name] != kwargs[alias]:
                        raise FtkError(f"{cls.__name__}: {alias}= and {name}= are the same setting; give one")
                    kwargs[name] = kwargs.pop(alias)
            if translate is not None:
                translate(kwargs)
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                raise FtkError(f"{cls.__name__}: unknown argument {unknown[0]}=; it takes "
                               f"{', '.join(names + sorted(renames))}")
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for alias, name in renames.items():
            setattr(cls, alias, property(lambda self, _n=name: getattr(self, _n)))
        cls.spellings = dict(renames)
        return cls

    return deco


_FOUR_BIT_TYPES = ("nf4", "fp4")


def _model_spec_keywords(kw: dict) -> None:
    """The specification's bitsandbytes switches -> ``quantization`` (a quantizer plugin's name)."""
    use_4bit, qtype = kw.pop("use_4bit", None), kw.pop("bnb_4bit_quant_type", None)
    if qtype is not None and qtype not in _FOUR_BIT_TYPES:
        raise FtkError(f"ModelConfig.bnb_4bit_quant_type: {qtype!r} is not one of {', '.join(_FOUR_BIT_TYPES)}")
    if use_4bit is None and qtype is None:
        return
    given = kw.get("quantization")
    if use_4bit is False:
        if qtype is not None or (given is not None and given in _FOUR_BIT_TYPES):
            raise FtkError("ModelConfig.use_4bit: False, but a 4-bit quant type is given "
                           f"({qtype or given!r}); drop one")
        kw.setdefault("quantization", "none")
        return
    want = qtype or (given if given in _FOUR_BIT_TYPES else None) or schema_default("model.quantization.method")
    if given is not None and given != want:
        raise FtkError(f"ModelConfig: quantization={given!r} contradicts use_4bit/bnb_4bit_quant_type "
                       f"({want!r}); give one")
    kw["quantization"] = want
    dtype = kw.get("compute_dtype")
    if dtype is not None and not isinstance(dtype, str):  # torch.bfloat16 as the specification may pass it
        kw["compute_dtype"] = str(dtype).replace("torch.", "")


@_spellings({"model_name": "name", "bnb_4bit_compute_dtype": "compute_dtype", "use_nested_quant": "nested"},
            _model_spec_keywords)
@dataclass
class ModelConfig:
    name: str = ""
    quantization: str = _default("model.quantization.method")  # quantizer plugin name (`ftk plugins list`)
    nested: bool = UNSET  # the quantizer's "nested" option (4-bit double quantization), when it has one
    compute_dtype: str = UNSET  # the quantizer's "compute_dtype" option, when it has one
    quantization_options: dict = field(default_factory=dict)  # any other quantizer option
    revision: str | None = _default("model.revision")
    cache_dir: str | None = _default("model.cache_dir")
    trust_remote_code: bool = _default("model.trust_remote_code")
    allow_pickle: bool = _default("model.allow_pickle")
    attn_implementation: str = _default("model.attn_implementation")
    gradient_checkpointing: bool | str = _default("model.gradient_checkpointing")  # auto: on with a CUDA GPU
    activation_offloading: bool = _default("model.activation_offloading")  # a CUDA GPU only
    tiled_mlp: bool = _default("model.tiled_mlp")  # long context: MLP intermediates a tile at a time

    def __post_init__(self):
        self._given = {k for k in ("nested", "compute_dtype") if getattr(self, k) is not UNSET}
        _component_defaults(self, "quantizer", self.quantization, ("nested", "compute_dtype"))

    @property
    def use_4bit(self) -> bool:
        return self.quantization in _FOUR_BIT_TYPES

    @property
    def bnb_4bit_quant_type(self) -> str | None:
        return self.quantization if self.use_4bit else None

    def to_recipe(self, manager=None) -> dict:
        """The recipe's ``model`` section; ``nested`` and ``compute_dtype`` go to the quantizer when its
        options schema has them; given for one that has not, they are an error, not ignored."""
        if not self.name:
            raise FtkError("ModelConfig.name (model_name): a local model folder or hub id is required")
        d = asdict(self)
        q = {"method": d.pop("quantization"), **d.pop("quantization_options")}
        given = {k: d.pop(k) for k in ("nested", "compute_dtype")}
        if manager is None:
            from ftk.manager import get_manager

            manager = get_manager()
        try:  # bare or qualified name, resolved as a recipe resolves it
            comp = manager.get("quantizer", q["method"])
        except PluginError:  # unknown here: validation names it with its JSON path
            comp = None
        options = (comp.options_schema.get("properties") or {}) if comp is not None else {}
        for key, value in given.items():
            if key in options and value is not UNSET:
                q.setdefault(key, value)
            elif key in self._given and comp is not None:
                raise FtkError(f"ModelConfig.{key}: quantizer {q['method']!r} has no {key!r} option")
        d["quantization"] = q
        return d


def _lora_spec_keywords(kw: dict) -> None:
    task = kw.pop("task_type", "CAUSAL_LM")
    if str(getattr(task, "value", task)) != "CAUSAL_LM":  # a peft TaskType or its name
        raise FtkError(f"LoRAConfig.task_type: ftk trains causal language models; {task!r} is not CAUSAL_LM")


_ADAPTER_OPTIONS = ("r", "alpha", "dropout", "dropout_rng", "target_modules", "bias", "use_rslora", "use_dora",
                    "modules_to_save")


@_spellings({"lora_alpha": "alpha", "lora_dropout": "dropout"}, _lora_spec_keywords)
@dataclass
class LoRAConfig:
    # the adapter plugin's options: UNSET ones get its schema's defaults
    r: int = UNSET
    alpha: float = UNSET
    dropout: float = UNSET
    dropout_rng: str = UNSET
    target_modules: list[str] | str = UNSET
    bias: str = UNSET
    use_rslora: bool = UNSET
    use_dora: bool = UNSET
    modules_to_save: list[str] | None = UNSET
    method: str = _default("adapter.method")
    options: dict = field(default_factory=dict)  # any other option of the adapter plugin

    task_type = "CAUSAL_LM"  # the specification's keyword; the only kind ftk trains

    def __post_init__(self):
        _component_defaults(self, "adapter", self.method, _ADAPTER_OPTIONS)

    def to_recipe(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not UNSET}
        return {**d.pop("options"), **d}


@dataclass
class DataConfig:
    # {"loader": ..., options} entries, or a class with __init__(tokenizer, max_length) and
    # load() -> datasets.DatasetDict (the specification's CustomDatasetLoader), run as a loader
    datasets: list = field(default_factory=list)
    max_length: int = _default("data.max_length")
    validation_size: float = _default("data.validation_size")
    mixing: str = _default("data.mixing")
    packing: bool = _default("data.packing")
    train_on_inputs: bool = _default("data.train_on_inputs")
    options: dict = field(default_factory=dict)  # any other key of the recipe's data section

    def to_recipe(self, manager=None) -> dict:
        d = asdict(self) | {"datasets": [_dataset_entry(e, manager) for e in self.datasets]}
        return {**d.pop("options"), **d}


@dataclass
class TrainingConfig:
    epochs: float = _default("training.epochs")
    max_steps: int = _default("training.max_steps")
    batch_size: int = _default("training.batch_size")
    gradient_accumulation_steps: int = _default("training.gradient_accumulation_steps")
    learning_rate: float = _default("training.learning_rate")
    weight_decay: float = _default("training.weight_decay")
    warmup_ratio: float = _default("training.warmup_ratio")
    max_grad_norm: float = _default("training.max_grad_norm")
    lr_scheduler: str = _default("training.lr_scheduler")
    optimizer: str = _default("training.optimizer")
    precision: str = _default("training.precision")
    compile: bool | str = _default("training.compile")  # torch.compile the decoder layers; auto: on with a CUDA GPU
    seed: int = _default("training.seed")
    save_steps: int | None = _default("training.save_steps")
    save_total_limit: int | None = _default("training.save_total_limit")
    logging_steps: int = _default("training.logging_steps")
    eval_steps: int | None = _default("training.eval_steps")
    report_to: list[str] = _default("training.report_to")
    options: dict = field(default_factory=dict)  # any other key of the recipe's training section

    def to_recipe(self) -> dict:
        d = asdict(self)
        return {**d.pop("options"), **d}


@dataclass
class EvalConfig:
    # metric names / {"name": ..., options} entries, or objects with compute_metric(predictions,
    # references) -> float (the specification's CustomEvaluator), reported under their class's name
    metrics: list = _default("evaluation.metrics")
    max_samples: int = _default("evaluation.max_samples")
    compare_base: bool = _default("evaluation.compare_base")
    num_examples_in_report: int = _default("evaluation.num_examples_in_report")
    generation: dict = field(default_factory=dict)  # see docs/evaluation.md, "Generation settings"

    def to_recipe(self, manager=None) -> dict:
        return asdict(self) | {"metrics": [_metric_entry(m, manager) for m in self.metrics]}


# -- the specification's extension objects, registered in-process -----------------------------------
def _dataset_entry(entry, manager) -> dict:
    if isinstance(entry, dict):
        return entry
    if isinstance(entry, type) and callable(getattr(entry, "load", None)):
        from ftk.loaderkit import loader_from_class
        from ftk.manager import register

        name = entry.__name__
        register("dataset", name, loader_from_class(entry), f"in-process loader {entry.__module__}.{entry.__qualname__}",
                 manager=manager)
        return {"loader": f"local/{name}"}
    raise FtkError(f"DataConfig.datasets: {entry!r} is neither a {{\"loader\": ...}} entry nor a class with "
                   f"__init__(tokenizer, max_length) and load()")


class _ComputeMetric:
    """A ``compute_metric(predictions, references) -> float`` object as an ftk text metric."""

    requires = "text"

    def __init__(self, obj, key: str):
        self.obj, self.key = obj, key

    def compute(self, predictions, references) -> dict[str, float]:
        value = self.obj.compute_metric(predictions, references)
        try:
            return {self.key: float(value)}
        except (TypeError, ValueError):
            raise FtkError(f"{self.key}.compute_metric: returned {type(value).__name__} {value!r}; "
                           f"a number is required") from None


def _metric_entry(metric, manager):
    if isinstance(metric, (str, dict)):
        return metric
    if callable(getattr(metric, "compute_metric", None)):
        from ftk.components import MetricInfo
        from ftk.manager import register

        name = type(metric).__name__
        hib = getattr(metric, "higher_is_better", None)
        register("metric", name, lambda options, _m=metric, _k=name: _ComputeMetric(_m, _k),
                 f"in-process metric {type(metric).__module__}.{type(metric).__qualname__}",
                 info=MetricInfo(keys=[name], requires="text", higher_is_better=hib), manager=manager)
        return {"name": f"local/{name}"}
    raise FtkError(f"EvalConfig.metrics: {metric!r} is neither a metric name, a {{\"name\": ...}} entry nor an "
                   f"object with compute_metric(predictions, references)")


# recipe JSON path prefix -> the API argument it comes from (longest first), for error messages
_ARGUMENTS = (("model.quantization.method", "ModelConfig.quantization"), ("model.quantization.", "ModelConfig."),
              ("model.", "ModelConfig."), ("adapter.", "LoRAConfig."), ("data.", "DataConfig."),
              ("training.", "TrainingConfig."), ("evaluation.", "EvalConfig."))


def _name_arguments(message: str) -> str:
    """``adapter.r: ...`` -> ``LoRAConfig.r (recipe adapter.r): ...``."""
    m = re.match(r"([\w.\[\]]+): ", message)
    if m:
        for prefix, arg in _ARGUMENTS:
            path = m.group(1)
            if path == prefix or path.startswith(prefix):
                return f"{arg}{path[len(prefix):] if prefix.endswith('.') else ''} (recipe {path}): {message[m.end():]}"
    return message


class LLAMATrainer:
    """Train and evaluate one adapter. ``recipe`` holds the resolved recipe (what recipe.json records)."""

    def __init__(self, model_config: ModelConfig, lora_config: LoRAConfig | None = None,
                 data_config: DataConfig | None = None, training_config: TrainingConfig | None = None,
                 eval_config: EvalConfig | None = None, output_dir: str = schema_default("output_dir"), manager=None,
                 overwrite: bool = False):
        from ftk.manager import get_manager
        from ftk.recipe import load_recipe

        if data_config is None or not data_config.datasets:
            raise FtkError("DataConfig.datasets: at least one dataset is required, e.g. "
                           "[{\"loader\": \"alpaca\", \"path\": \"data.json\"}]")
        self.manager = manager or get_manager()
        raw = {
            "model": model_config.to_recipe(self.manager),
            "adapter": (lora_config or LoRAConfig()).to_recipe(),
            "data": data_config.to_recipe(self.manager),
            "training": (training_config or TrainingConfig()).to_recipe(),
            "evaluation": (eval_config or EvalConfig()).to_recipe(self.manager),
            "output_dir": str(output_dir),
        }
        try:
            self.recipe = load_recipe(data=raw, manager=self.manager)
        except FtkError as e:  # name the argument the user wrote, with the recipe key it fills
            raise type(e)([_name_arguments(m) for m in e.messages]) from None
        self.output_dir = Path(self.recipe["output_dir"])
        self.overwrite = overwrite
        self._model = self._tokenizer = self.prepared = None
        self.model_info: dict = {}
        self.metrics: dict = {}
        self._state = None

    @property
    def model(self):
        """The model being tuned (quantized base with the adapter), loaded on first use: what
        ``PerplexityEvaluator(model, tokenizer)`` and ``QualitativeEvaluator(model, tokenizer)`` take."""
        self._prepare()
        return self._model

    @property
    def tokenizer(self):
        """The run's tokenizer (pad token set as training uses it), loaded on first use."""
        self._prepare()
        return self._tokenizer

    def eval_dataloader(self):
        """The validation split as batches of ``input_ids``/``labels``/``attention_mask`` (what
        ``PerplexityEvaluator.compute_perplexity`` takes); None without a validation split."""
        from ftk.evaluate import _eval_dataloader

        self._prepare()
        return _eval_dataloader(self.prepared, self.recipe)

    def _prepare(self):
        """Tokenizer, data and model without touching output_dir (evaluate() before train())."""
        if self._model is None:
            from ftk import data, model

            self._tokenizer = model.load_tokenizer(self.recipe)
            self.prepared = data.prepare_data(self.recipe, self._tokenizer, self.manager)
            self._model, self.model_info = model.load_model(self.recipe, self.manager, self._tokenizer)

    def train(self, resume: str | None = None) -> dict:
        """Train exactly as `ftk run` does (same checks before training, same outputs); writes
        OUTPUT_DIR/adapter, recipe.json, metrics.json, logs. Returns the training metrics."""
        from ftk.io import atomic_write_json
        from ftk.run import is_main_process, prepare_run, train_run

        self._state = prepare_run(self.recipe, self.manager, resume, self.overwrite)
        st = self._state
        self._tokenizer, self.prepared, self._model, self.model_info = st.tokenizer, st.prepared, st.model, st.model_info
        self.metrics["train"] = train_run(st, resume)
        if is_main_process():
            atomic_write_json(self.output_dir / "metrics.json", self.metrics)
        return self.metrics["train"]

    def evaluate(self, test_prompts: list[str] | None = None, test_references: list[str] | None = None) -> dict:
        """Without prompts: the run's evaluation (validation perplexity, generation metrics, base vs
        fine-tuned) as ``ftk run`` does it. With prompts: generations (and BLEU/ROUGE against
        ``test_references`` when given) with the recipe's generation settings."""
        from ftk import evaluate as ev

        if test_prompts is None:
            from ftk.run import finish_run

            if getattr(self, "_state", None) is not None:  # after train(): write what `ftk run` writes
                finish_run(self._state, self.metrics)
                return {k: v for k, v in self.metrics.items() if k != "train"}
            self._prepare()
            return ev.evaluate_run(self.model, self.tokenizer, self.prepared, self.recipe, self.manager,
                                   str(self.output_dir))
        self._prepare()
        prompts = list(test_prompts)
        if test_references is not None and len(test_references) != len(prompts):
            raise FtkError(f"evaluate: {len(prompts)} test_prompts but {len(test_references)} test_references")
        gen = ev.generation_settings(self.recipe)
        q = ev.QualitativeEvaluator(self.model, self.tokenizer, self.manager)
        preds = q.generate(prompts, **ev._gen_call_kwargs(gen))
        out: dict[str, Any] = {"predictions": preds}
        if test_references is not None:
            out["bleu"] = q.compute_bleu(list(test_references), preds)
            out.update(q.compute_rouge(list(test_references), preds))
        return out

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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftk.defaults import default_field as _default
from ftk.defaults import schema_default
from ftk.errors import FtkError, PluginError
from ftk.plugins.adapter_lora import SCHEMA as _LORA
from ftk.plugins.quant_bnb import _FOUR_BIT

# Every field default below is the recipe schema's default for the key it maps to (the base schema, or
# the built-in LoRA adapter's / 4-bit quantizers' options schema): ftk.defaults reads it from there.


@dataclass
class ModelConfig:
    name: str = ""
    quantization: str = _default("model.quantization.method")  # quantizer plugin name (`ftk plugins list`)
    nested: bool = _default("nested", _FOUR_BIT)  # to quantizers with a "nested" option (4-bit double quantization)
    compute_dtype: str = _default("compute_dtype", _FOUR_BIT)  # to quantizers whose options have "compute_dtype"
    quantization_options: dict = field(default_factory=dict)  # any other quantizer option
    revision: str | None = _default("model.revision")
    cache_dir: str | None = _default("model.cache_dir")
    trust_remote_code: bool = _default("model.trust_remote_code")
    allow_pickle: bool = _default("model.allow_pickle")
    attn_implementation: str = _default("model.attn_implementation")
    gradient_checkpointing: bool | str = _default("model.gradient_checkpointing")  # auto: on with a CUDA GPU

    def to_recipe(self, manager=None) -> dict:
        """The recipe's ``model`` section; ``nested`` and ``compute_dtype`` go to the quantizer when its
        options schema has them (``manager``: where to look the quantizer up; the process's by default)."""
        if not self.name:
            raise FtkError("ModelConfig.name: a local model folder or hub id is required")
        d = asdict(self)
        q = {"method": d.pop("quantization"), **d.pop("quantization_options")}
        given = {"nested": d.pop("nested"), "compute_dtype": d.pop("compute_dtype")}
        if manager is None:
            from ftk.manager import get_manager

            manager = get_manager()
        try:  # bare or qualified name, resolved as a recipe resolves it
            comp = manager.get("quantizer", q["method"])
        except PluginError:  # unknown here: validation names it with its JSON path
            comp = None
        options = (comp.options_schema.get("properties") or {}) if comp is not None else {}
        for key, value in given.items():
            if key in options:
                q.setdefault(key, value)
        d["quantization"] = q
        return d


@dataclass
class LoRAConfig:
    r: int = _default("r", _LORA)
    alpha: float = _default("alpha", _LORA)
    dropout: float = _default("dropout", _LORA)
    target_modules: list[str] | str = _default("target_modules", _LORA)
    bias: str = _default("bias", _LORA)
    use_rslora: bool = _default("use_rslora", _LORA)
    use_dora: bool = _default("use_dora", _LORA)
    modules_to_save: list[str] | None = _default("modules_to_save", _LORA)
    method: str = _default("adapter.method")

    def to_recipe(self) -> dict:
        return asdict(self)


@dataclass
class DataConfig:
    datasets: list[dict] = field(default_factory=list)  # e.g. [{"loader": "alpaca", "path": "..."}]
    max_length: int = _default("data.max_length")
    validation_size: float = _default("data.validation_size")
    mixing: str = _default("data.mixing")
    packing: bool = _default("data.packing")
    train_on_inputs: bool = _default("data.train_on_inputs")
    options: dict = field(default_factory=dict)  # any other key of the recipe's data section

    def to_recipe(self) -> dict:
        d = asdict(self)
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
    metrics: list = _default("evaluation.metrics")
    max_samples: int = _default("evaluation.max_samples")
    compare_base: bool = _default("evaluation.compare_base")
    num_examples_in_report: int = _default("evaluation.num_examples_in_report")
    generation: dict = field(default_factory=dict)  # max_new_tokens, num_beams, temperature, top_p, ...

    def to_recipe(self) -> dict:
        return asdict(self)


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
            "data": data_config.to_recipe(),
            "training": (training_config or TrainingConfig()).to_recipe(),
            "evaluation": (eval_config or EvalConfig()).to_recipe(),
            "output_dir": str(output_dir),
        }
        self.recipe = load_recipe(data=raw, manager=self.manager)
        self.output_dir = Path(self.recipe["output_dir"])
        self.overwrite = overwrite
        self.model = self.tokenizer = self.prepared = None
        self.model_info: dict = {}
        self.metrics: dict = {}
        self._state = None

    def _prepare(self):
        """Tokenizer, data and model without touching output_dir (evaluate() before train())."""
        if self.model is None:
            from ftk import data, model

            self.tokenizer = model.load_tokenizer(self.recipe)
            self.prepared = data.prepare_data(self.recipe, self.tokenizer, self.manager)
            self.model, self.model_info = model.load_model(self.recipe, self.manager, self.tokenizer)

    def train(self, resume: str | None = None) -> dict:
        """Train exactly as `ftk run` does (same checks before training, same outputs); writes
        OUTPUT_DIR/adapter, recipe.json, metrics.json, logs. Returns the training metrics."""
        from ftk.io import atomic_write_json
        from ftk.run import is_main_process, prepare_run, train_run

        self._state = prepare_run(self.recipe, self.manager, resume, self.overwrite)
        st = self._state
        self.tokenizer, self.prepared, self.model, self.model_info = st.tokenizer, st.prepared, st.model, st.model_info
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

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

from ftk.errors import FtkError


@dataclass
class ModelConfig:
    name: str = ""
    quantization: str = "nf4"  # quantizer plugin name (`ftk plugins list`)
    nested: bool = True  # given to quantizers whose options have "nested" (4-bit: double quantization)
    compute_dtype: str = "auto"  # given to quantizers whose options have "compute_dtype"
    quantization_options: dict = field(default_factory=dict)  # any other quantizer option
    revision: str | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool | str = "auto"  # auto: on with a CUDA GPU

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
        comp = manager.components("quantizer").get(q["method"])
        options = (comp.options_schema.get("properties") or {}) if comp is not None else {}
        for key, value in given.items():
            if key in options:
                q.setdefault(key, value)
        d["quantization"] = q
        return d


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    method: str = "lora"

    def to_recipe(self) -> dict:
        return asdict(self)


@dataclass
class DataConfig:
    datasets: list[dict] = field(default_factory=list)  # e.g. [{"loader": "alpaca", "path": "..."}]
    max_length: int = 512
    validation_size: float = 0.05
    mixing: str = "concat"
    packing: bool = True
    train_on_inputs: bool = False
    options: dict = field(default_factory=dict)  # any other key of the recipe's data section

    def to_recipe(self) -> dict:
        d = asdict(self)
        return {**d.pop("options"), **d}


@dataclass
class TrainingConfig:
    epochs: float = 3
    max_steps: int = -1
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    lr_scheduler: str = "cosine"
    optimizer: str = "paged_adamw_32bit"
    precision: str = "auto"
    compile: bool | str = "auto"  # torch.compile the decoder layers; auto: on with a CUDA GPU
    seed: int = 42
    save_steps: int | None = None
    save_total_limit: int | None = 2
    logging_steps: int = 1
    eval_steps: int | None = None
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    options: dict = field(default_factory=dict)  # any other key of the recipe's training section

    def to_recipe(self) -> dict:
        d = asdict(self)
        return {**d.pop("options"), **d}


@dataclass
class EvalConfig:
    metrics: list = field(default_factory=lambda: ["perplexity", "bleu", "rouge"])
    max_samples: int = 50
    compare_base: bool = True
    num_examples_in_report: int = 5
    generation: dict = field(default_factory=dict)  # max_new_tokens, num_beams, temperature, top_p, ...

    def to_recipe(self) -> dict:
        return asdict(self)


class LLAMATrainer:
    """Train and evaluate one adapter. ``recipe`` holds the resolved recipe (what recipe.json records)."""

    def __init__(self, model_config: ModelConfig, lora_config: LoRAConfig | None = None,
                 data_config: DataConfig | None = None, training_config: TrainingConfig | None = None,
                 eval_config: EvalConfig | None = None, output_dir: str = "runs/ftk", manager=None,
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

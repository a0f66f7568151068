"""Contracts between the core and component plugins. Pure Python: no torch import here.

A dataset loader returns :class:`LoadedData`: lists of :class:`Example` per split. An example is
already rendered to text segments, each marked trainable or not, so the core can tokenize once,
mask labels exactly, pack, and show the user what the model sees. Loaders that produce
conversations also fill ``messages`` so a recipe can choose ``"template": "chat"`` and render with the
tokenizer's own chat template instead. An example may instead come already tokenized
(``Example.token_ids``, optionally ``token_labels``): the core then uses those ids as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

# The component kinds, listed once: each is registered through the hook ``ftk_register_<kind>s``.
KINDS = ("dataset", "quantizer", "adapter", "metric", "trainer", "callback", "exporter")



def needs_package(module: str, versions: str, install: str) -> str | None:
    """For ``register(..., unavailable=...)``: why the optional package ``module`` cannot serve a component
    here, or None when it can: ``"needs MODULE: INSTALL"`` when it is not installed, ``"needs
    MODULE<versions> (found X): INSTALL"`` when its version is outside ``versions`` (a PEP 440 specifier,
    e.g. ``">=1.16,<1.17"``). Reads package metadata only, never imports the package, so ``ftk plugins
    list`` stays instant (since 0.1.0)."""
    import importlib.metadata as md
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return f"needs {module}: {install}"
    from packaging.specifiers import SpecifierSet

    try:
        have = md.version(module)
    except md.PackageNotFoundError:
        return None  # importable without metadata (a source checkout): trusted
    if not SpecifierSet(versions).contains(have, prereleases=True):
        return f"needs {module}{versions} (found {have}): {install}"
    return None

@dataclass
class Segment:
    text: str
    train: bool  # True: tokens of this text carry labels (the response); False: masked prompt


@dataclass
class Example:
    segments: list[Segment] = field(default_factory=list)
    source: str = ""  # loader name, filled by the core
    # The generation-eval view: a prompt to complete and the reference continuation.
    prompt: str | None = None
    reference: str | None = None
    # Conversation form, for chat templates: [{"role": "system"|"user"|"assistant", "content": str}]
    messages: list[dict] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. record index, dialogue acts/emotions
    # Already tokenized (since 0.1.0; both None for text examples): the ids the model sees, used as they
    # are instead of tokenizing ``segments`` (which are then ignored and may be empty): ftk adds no BOS or
    # EOS and applies no template. ``token_labels``, one per id: the id itself (trained) or -100 (not
    # trained); None trains every token. As for every example, the first token is never trained (nothing
    # predicts it); truncation, packing and the cache apply as to any example. Build one with
    # ``ftk.loaderkit.tokenized_example``, which checks the ids; the core checks them again against the
    # tokenizer's vocabulary. Such an example has no ``prompt``/``reference`` for generation metrics.
    token_ids: list[int] | None = None
    token_labels: list[int] | None = None

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass
class PreferencePair:
    """One preference record (since 0.1.0): what a loader yields for trainers of the ``"pairs"`` data form
    (DPO, ORPO, KTO). Text form: ``prompt``, ``chosen`` and ``rejected`` are strings, each response
    continuing the prompt directly. Conversational form (TRL's): ``prompt`` is a list of
    ``{"role", "content"}`` messages up to the response, ``chosen``/``rejected`` lists holding the response
    message (role ``"assistant"``). The core renders (ftk's conversation format, or the tokenizer's chat
    template with ``"template": "chat"``), tokenizes and truncates it."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    source: str = ""  # loader name, filled by the core
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. record index


@dataclass
class LoadedData:
    # Examples (or PreferencePairs, for the "pairs" data form): a list, or an iterator in streaming mode
    train: Iterable[Example]
    validation: list[Example] | None = None  # the dataset's own split when it has one
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (on_error: skip)
    fingerprint: str = ""  # identifies the source data (for caching and the run manifest)
    # local files read that the entry's options do not name (an index pointing elsewhere, a shared
    # vocabulary): the prepared-rows cache re-checks their size and mtime before reusing its rows
    source_files: list[str] = field(default_factory=list)
    # False: built from something ftk cannot check (code, a remote query), so its prepared rows are
    # rebuilt every run (tokenization is still cached by content)
    reusable: bool = True


@dataclass
class DataContext:
    """What a loader's factory gets besides its own options."""

    recipe_dir: str
    max_length: int = 512  # data.max_length; loaders rarely need it (the core truncates)
    on_error: str = "raise"  # or "skip"
    streaming: bool = False
    seed: int = 42
    tokenizer: Any = None  # present when known; loaders normally do not need it


@dataclass
class QuantizationPlan:
    """What a quantizer contributes to model loading."""

    from_pretrained_kwargs: dict[str, Any]  # e.g. {"quantization_config": BitsAndBytesConfig(...)}
    notes: list[str] = field(default_factory=list)  # e.g. layers left unquantized and why
    kbit: bool = False  # the model needs k-bit training preparation
    # Called with the loaded model before anything runs it; returns notes (or None). The place for what
    # only the quantizer knows must be fixed on the loaded layers: for example keeping them off an
    # inference-only layout that cannot backpropagate (see docs/plugins/hooks.md).
    after_load: Callable[[Any], list[str] | None] | None = None
    # What ``ftk plan`` and the run's model info need from the quantizer (see docs/plugins/hooks.md); each
    # is optional: left out, ``ftk plan`` says the figure is unknown instead of guessing.
    # Bytes one quantized linear weight takes, its quantization constants included (4-bit: about 0.5).
    bytes_per_weight: float | None = None
    # ``quantizes(module_name, in_features, out_features) -> bool``: whether a linear layer of the
    # decoder is quantized (None: every one is, when ``bytes_per_weight`` is given).
    quantizes: Callable[[str, int, int], bool] | None = None
    # ``count_quantized(model) -> int``: the quantized layers of the loaded model (``quantized_layers``).
    count_quantized: Callable[[Any], int] | None = None
    # ``weights_in(parameter) -> int``: how many weights a parameter holds when its storage packs several
    # per element (4-bit: two per byte); None: ``numel()``. For the run's parameter count.
    weights_in: Callable[[Any], int] | None = None
    # Of ``bytes_per_weight``, the bytes kept outside the model's parameters (since 0.1.0; bitsandbytes:
    # the block constants of its quant state). FSDP shards parameters only, so every process keeps these
    # whole; ``ftk plan`` counts them unsharded. None: every byte is in the parameters.
    replicated_bytes_per_weight: float | None = None


@dataclass(frozen=True)
class Sharding:
    """How the model's parameters will be sharded (``ModelContext.sharding``, since 0.1.0), for a quantizer
    whose weights live in packed tensors: FSDP splits every parameter on its first dimension across
    ``processes`` and all-gathers it for compute, casting floating-point parameters to ``param_dtype``
    (None: each keeps its own dtype); integer parameters are never cast. Packed weights must survive
    that: stored in an integer dtype, or in ``param_dtype`` when it is set (a cast of packed words
    corrupts them). ftk's own 4-bit quantizers store them in their compute dtype and refuse a
    ``param_dtype`` other than it."""

    strategy: str  # "fsdp"
    processes: int
    param_dtype: str | None  # "bfloat16", "float16" or None


@dataclass
class ModelContext:
    """What quantizer and adapter factories get: the model's config (no weights) and the recipe."""

    model_config: Any  # transformers.PretrainedConfig
    recipe: dict
    targets_for: Callable[[str], list[str] | None] | None = None  # preset -> module names (hook)
    # how the loaded model will be sharded across processes (since 0.1.0); None: it will not be (one
    # process, or DDP, where every process holds the whole model)
    sharding: Sharding | None = None
    # whether training will torch.compile the decoder layers (training.compile resolved for the machine
    # the run trains on; since 0.1.0)
    compiled: bool = False
    # this machine's CPU vendor id as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"; "" when
    # unknown), for a component whose libraries take vendor-specific paths (since 0.1.0)
    cpu_vendor: str = ""


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter declares up front (``register(..., info=AdapterInfo(...))``) for ``ftk plan``,
    which sizes a run from the model config before any weights load. Optional; undeclared, ``ftk plan``
    says the trainable-parameter count (and what depends on it) is unknown.

    - ``trainable_parameters(options, linears, ctx) -> int``: the parameters the adapter trains.
      ``options``: the ``adapter`` section without ``method``, defaults filled; ``linears``:
      ``{module name: (in_features, out_features)}`` of the decoder's linear layers as ``ftk plan``
      models them; ``ctx``: the :class:`ModelContext` (``targets_for`` resolves presets).
    - ``activation_bytes(options, linears, ctx, compute_bytes) -> int``: the bytes per token the adapter's
      own tensors keep for backward in one decoder layer (``linears``: that layer's linear layers;
      ``compute_bytes``: 2 under bf16/fp16 autocast, 4 in fp32). The base layer's own activations are
      the core's; undeclared, ``ftk plan`` counts none for the adapter and says so.
    """

    trainable_parameters: Callable[[dict, dict, ModelContext], int] | None = None
    activation_bytes: Callable[[dict, dict, ModelContext, int], int] | None = None


class Metric(Protocol):
    """A metric. ``requires`` says what the evaluator must supply (one of ``METRIC_INPUTS``):

    - ``"text"``: ``compute(predictions=list[str], references=list[str]) -> dict[str, float]``
    - ``"loss"``: ``compute(nll_sum=float, token_count=int) -> dict[str, float]`` (token-weighted)
    - ``"pairs"``: ``compute(chosen_logps=, rejected_logps=, ref_chosen_logps=, ref_rejected_logps=)``
      (lists of floats, see ``METRIC_INPUTS``) -> dict[str, float]
    - ``"model"``: ``compute(model=, tokenizer=, context=MetricContext)`` -> dict[str, float] (see ``METRIC_INPUTS``)
    """

    requires: str

    def compute(self, **kwargs) -> dict[str, float]: ...


# What the evaluator can supply to a metric (``Metric.requires``, ``MetricInfo.requires``).
# "pairs" (since 0.1.0): ``compute(chosen_logps=, rejected_logps=, ref_chosen_logps=, ref_rejected_logps=)``,
# lists of floats, one per validation pair: the summed log-probability of each response under the scored
# model and under the reference (the base: adapter disabled; scoring the base, both are the base's).
# "model" (since 0.1.0): ``compute(model=, tokenizer=, context=)``: the scored model itself (the fine-tuned model,
# or the base: the same model with its adapter disabled), in eval mode under ``torch.no_grad()``, the run's
# tokenizer (read it, do not change it: copy it first if a library sets a pad token) and a :class:`MetricContext`.
# For a metric that runs the model its own way, e.g. a benchmark harness.
METRIC_INPUTS = ("text", "loss", "pairs", "model")


@dataclass(frozen=True)
class MetricContext:
    """What a ``"model"`` metric's ``compute`` gets besides the model and the tokenizer (since 0.1.0)."""

    scoring: str | None  # "finetuned" or "base" (None: the caller did not say)
    recipe: dict  # the resolved recipe (defaults filled)
    batch_size: int  # training.eval_batch_size, else training.batch_size
    seed: int  # training.seed


@dataclass(frozen=True)
class MetricInfo:
    """What a metric declares up front (``register(..., info=MetricInfo(...))``), so that a recipe is
    checked before any model loads and the report knows which way each key improves. Every field is
    optional; ``None`` means "not declared" (then ftk learns the keys only when the metric reports them,
    and the report gives no better/worse verdict for them).

    - ``keys``: the keys ``compute`` returns, a list, or ``keys(options) -> list`` when they depend on the
      metric's options (given as the factory gets them: defaults filled, without ``name``).
    - ``higher_is_better``: one bool for every key, or ``{key: bool}`` (keys left out: no verdict), or (since
      0.1.0) ``higher_is_better(options) -> bool | {key: bool}`` when the keys depend on the options.
    - ``requires``: what the metric needs, as its ``requires`` attribute says (``METRIC_INPUTS``).
    """

    keys: list[str] | Callable[[dict], list[str]] | None = None
    higher_is_better: bool | dict[str, bool] | Callable[[dict], bool | dict[str, bool]] | None = None
    requires: str | None = None

    def keys_for(self, options: dict) -> list[str] | None:
        """The declared keys for these options (None: undeclared); a callable ``keys`` is called here."""
        keys = self.keys(dict(options)) if callable(self.keys) else self.keys
        if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys)):
            raise TypeError(f"MetricInfo.keys must give a list of non-empty strings, got {keys!r}")
        return None if keys is None else list(keys)

    def directions_for(self, options: dict) -> bool | dict[str, bool] | None:
        """The declared direction(s) for these options: a bool for every key, ``{key: bool}``, or None; a callable
        ``higher_is_better`` is called here."""
        hib = self.higher_is_better(dict(options)) if callable(self.higher_is_better) else self.higher_is_better
        if not (hib is None or isinstance(hib, bool)
                or (isinstance(hib, dict) and all(isinstance(k, str) and isinstance(v, bool) for k, v in hib.items()))):
            raise TypeError(f"MetricInfo.higher_is_better must give a bool or {{key: bool}}, got {hib!r}")
        return hib

    def direction(self, key: str, options: dict | None = None) -> bool | None:
        """True: higher is better; False: lower is better; None: not declared. ``options``: for a callable
        ``higher_is_better`` (as the factory gets them)."""
        hib = self.directions_for(options or {})
        return hib.get(key) if isinstance(hib, dict) else hib


# What a training method can ask the core to prepare (``TrainerPlan.data``), handed over as
# :class:`PreparedData`:
# - "rows": ``ftk.data`` builds them from the loaders' examples (tokenized, labels masked, optionally packed);
# - "pairs" (since 0.1.0): from the loaders' PreferencePairs, one dict per pair ``{"prompt_ids",
#   "chosen_ids", "rejected_ids"}`` (the prompt starts with BOS, each response ends with EOS; to fit
#   data.max_length the prompt loses its start and the responses their end), no packing. The trainer
#   brings its own collator for them.
DATA_FORMS = ("rows", "pairs")


@dataclass
class TrainerContext:
    """What a trainer's factory gets besides its own options."""

    recipe: dict  # the whole resolved recipe (defaults filled)
    output_dir: str


@dataclass
class TrainerPlan:
    """What a trainer's factory returns: how the core builds the transformers ``Trainer`` for this
    training method. Everything around it stays in the core and is shared by every method: the
    callbacks (JSONL log, NaN stop, the "training cannot learn" guard, TensorBoard, plugin callbacks),
    checkpoints and resume, Ctrl-C checkpointing, ``training.compile``, the adapter save and the report.
    Every field is optional; ``TrainerPlan()`` is plain supervised training on the prepared rows.
    """

    # the data the method trains on, one of DATA_FORMS; checked before any data loads
    data: str = "rows"
    # Called with ftk's Trainer class (``FtkTrainer``, a transformers.Trainer subclass that refuses a loss
    # no trainable parameter feeds); returns a subclass of it. Building on another library's Trainer
    # subclass: ``class MyTrainer(base, trl.DPOTrainer)``.
    trainer_class: Callable[[type], type] | None = None
    # ``compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None)`` -> loss, or
    # (loss, outputs) with return_outputs: replaces Trainer.compute_loss (ftk's check still applies)
    compute_loss: Callable[..., Any] | None = None
    # Called with the TrainingArguments the core built from the ``training`` section; returns them or a
    # replacement carrying the same values (e.g. TRL's DPOConfig with the method's own settings added)
    training_arguments: Callable[[Any], Any] | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for the Trainer
    notes: list[str] = field(default_factory=list)  # lines shown to the user before training
    # What one training example costs, for ``ftk plan`` (since 0.1.0): the sequences it puts through the
    # model with gradient (a preference pair: chosen and rejected, 2), and the sequences it also runs
    # without gradient while those activations are kept (a reference model's pass: DPO 2, KTO 1).
    sequences_per_example: int = 1
    reference_sequences_per_example: int = 0
    # Positions whose output logits the loss holds at once (since 0.1.0): None, every position of the
    # micro-batch (the model's own loss); a chunked loss (``ftk.losses``) gives its chunk size. For ``ftk plan``.
    logits_positions: int | None = None


@dataclass
class PreparedData:
    """What ftk.data.prepare_data hands to training and evaluation.

    ``train``/``validation`` hold feature dicts ``{"input_ids": [...], "labels": [...]}`` (packed
    rows add ``"position_ids"`` restarting at 0 per example); ``collator`` turns a list of them into
    a batch of tensors. ``eval_pairs`` are (prompt, reference) pairs from the validation split for
    the generation metrics; ``validation_unpacked`` is the validation set one example per row (for
    perplexity, so it does not depend on packing).
    """

    train: Any
    validation: Any
    collator: Callable  # for "pairs": collates validation_unpacked (prompt + chosen rows, for perplexity)
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)
    validation_unpacked: Any = None
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    source_files: list = field(default_factory=list)  # [path, size, mtime_ns] of files loaders declared
    reusable: bool = True  # every loader's data may be served from the prepared-rows cache
    form: str = "rows"  # which of DATA_FORMS train/validation hold


# What ``ftk export`` was given (``ExportContext.source_kind``, since 0.1.0): a finished run's folder (its
# ``adapter/``), a LoRA adapter folder, or a plain model (a folder with config.json, or a hub id).
EXPORT_SOURCES = ("run", "adapter", "model")


@dataclass
class ExportContext:
    """What an exporter's factory gets (``ftk export``, since 0.1.0): ``factory(options, ctx)`` writes the
    export at ``staging`` (a file or a folder, not there yet) and returns notes to show (a list of strings,
    or None). The core renames ``staging`` to ``output`` only after the factory returned, and removes it
    and ``work_dir`` whatever happens, so an export is never left half-written. Heavy work the core
    already does is offered as callables, so an exporter never repeats it:

    - ``merged_model(dtype="float32") -> str``: a local folder holding a plain transformers model: for a
      run or an adapter, the adapter merged into its de-quantized base (as ``ftk merge`` does, into
      ``work_dir``, once per dtype); for a model source, the model's own folder (a hub id downloaded).
    - ``base_model() -> str``: a local folder of the base model (the model itself for a model source).
    """

    source: str  # what the user named, as given
    source_kind: str  # one of EXPORT_SOURCES
    adapter_dir: str | None  # the adapter folder ("run", "adapter"), else None
    base: str  # the base model: a folder or a hub id (the adapter's base, or the model itself)
    output: str  # where the export ends up (absolute)
    staging: str  # where the factory writes it: in output's folder, renamed to output afterwards
    work_dir: str  # scratch space, removed afterwards
    merged_model: Callable[..., str]
    base_model: Callable[[], str]

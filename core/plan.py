"""`ftk plan`: sizes and a peak-memory estimate from the model config alone (no weights loaded).

The activation model counts the tensors autograd keeps per token in one LLaMA decoder layer when the
base weights are frozen (QLoRA): normalisation inputs (kept in fp32, as LLaMA's RMSNorm upcasts),
the projections' inputs, the adapter's own tensors (its ``AdapterInfo.activation_bytes``), rotary q/k, attention q/k/v/out
(fused attention keeps no score matrix), and the SwiGLU MLP's four intermediate-size tensors; plus
fp32 logits with their log-softmax and gradient. With gradient checkpointing only each layer's input
is kept, plus one layer recomputed during backward.

What only a component knows comes from its declarations: the quantizer's plan says which linear layers
it quantizes and the bytes per quantized weight (``QuantizationPlan.quantizes``/``bytes_per_weight``),
the adapter its trainable-parameter count and activations (``AdapterInfo``). A figure a component
does not declare is reported as unknown (None), never guessed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ftk.model import gradient_checkpointing_on

GB = 1024**3
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def from_config(cls, cfg) -> "Shape":
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        heads = get("num_attention_heads")
        return cls(vocab=get("vocab_size"), hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   layers=get("num_hidden_layers"), heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   tied=bool(get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) per projection name in one layer."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linears(self, layers: range | None = None) -> dict[str, tuple[int, int]]:
        """(in, out) per linear layer of the decoder (or of ``layers``), by module name (what components'
        declarations get)."""
        return {f"model.layers.{n}.{'mlp' if p in _MLP_NAMES else 'self_attn'}.{p}": io
                for n in (layers or range(self.layers)) for p, io in self.linear_shapes().items()}


def _get(cfg, key):
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def _compute_bytes(recipe: dict, cuda: bool) -> int:
    prec = recipe["training"]["precision"]
    if prec == "auto":
        return 2  # bf16 where fast (GPUs with bf16, CPUs with AMX); fp32 otherwise is a 2x upper bound
    return _DTYPE_BYTES.get(prec, 4)


def _filled(recipe: dict, manager) -> dict:
    """A copy of a (possibly partial) recipe with the defaults ``ftk.recipe`` fills: the base schema's and
    the chosen quantizer's and adapter's own."""
    from ftk.recipe import _component_schemas, base_schema, fill_defaults

    out = copy.deepcopy(dict(recipe))
    out.setdefault("data", {})  # required in a recipe; a partial one here still gets data.max_length's default
    out = fill_defaults(out, base_schema())
    for _, obj, merged in _component_schemas(out, manager):  # each component's defaults, as load_recipe fills them
        fill_defaults(obj, merged)
    return out


def _hf_config(config):
    """A transformers config for the components' ModelContext (a plain dict is a LLaMA-shaped one)."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    kw = dict(config)
    return AutoConfig.for_model(kw.pop("model_type", "llama"), **kw)


def declared_sizes(config, recipe: dict, manager, compute_bytes: int = 2) -> dict:
    """What the recipe's quantizer and adapter declare for this model (``recipe``: defaults filled):
    ``quantized`` / ``unquantized`` linear parameters and ``weight_bytes`` of the quantized ones,
    ``trainable`` parameters, ``adapter_activations`` (bytes per token in one decoder layer); None (0 for
    activations) where a component does not say, with the reason in ``unknown``."""
    from ftk.model import model_context, quantization_plan

    shape = Shape.from_config(config)
    linears = shape.linears()
    ctx, _ = model_context(recipe, manager, _hf_config(config))
    qname, qplan = quantization_plan(recipe, manager, ctx)
    out = {"quantized": None, "unquantized": None, "weight_bytes": None, "trainable": None,
           "adapter_activations": 0, "unknown": []}
    quantizes = qplan.quantizes
    if quantizes is None and qplan.bytes_per_weight is not None:
        quantizes = _every_layer
    q = None if quantizes is None else sum(i * o for n, (i, o) in linears.items() if quantizes(n, i, o))
    if q is not None:
        out["quantized"], out["unquantized"] = q, sum(i * o for i, o in linears.values()) - q
    if q == 0 or (q is not None and qplan.bytes_per_weight is not None):
        out["weight_bytes"] = q * qplan.bytes_per_weight if q else 0
    else:
        out["unknown"].append(f"weights: unknown for quantizer {qname!r} (it declares no bytes_per_weight)")
    aopts = dict(recipe["adapter"])
    comp = manager.get("adapter", aopts.pop("method"))
    declared = (("trainable", "trainable_parameters", linears, (), "counting trainable parameters",
                 f"trainable parameters: unknown for adapter {comp.name!r} (it declares no trainable_parameters)"),
                ("adapter_activations", "activation_bytes", shape.linears(range(1)), (compute_bytes,),
                 "estimating activations",
                 f"activations: adapter {comp.name!r} declares no activation_bytes; its own are not included"))
    for key, attr, where, extra, phase, missing in declared:
        fn = getattr(comp.info, attr, None)
        if fn is None:
            out["unknown"].append(missing)
            continue
        with manager.calling(comp, phase):
            out[key] = int(fn(aopts, where, ctx, *extra))
    return out


def _every_layer(name: str, in_features: int, out_features: int) -> bool:
    return True


def _times(n, k):
    return None if n is None else n * k


def estimate_memory(config, recipe: dict, cuda: bool = False, manager=None) -> dict:
    """Peak memory estimate in bytes, split by what holds it (None: a component does not declare it)."""
    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    recipe = _filled(recipe, manager)
    d = _compute_bytes(recipe, cuda)
    sizes = declared_sizes(config, recipe, manager, d)
    s = Shape.from_config(config)
    # what one example costs the training method (its TrainerPlan says): sequences through the model with
    # gradient (a preference pair: 2) and without it while those activations are kept (a reference pass)
    from ftk.train import trainer_plan

    method = trainer_plan(recipe, manager, str(recipe.get("output_dir") or "."))
    seqs, ref_seqs = method.sequences_per_example, method.reference_sequences_per_example
    tokens = int(recipe["training"]["batch_size"]) * int(recipe["data"]["max_length"]) * seqs
    store = 2 if d == 2 else 4  # unquantized parameters are kept in the compute dtype

    linear = sum(i * o for i, o in s.linear_shapes().values()) * s.layers
    quantized = sizes["quantized"]
    emb = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = s.hidden * (2 * s.layers + 1)
    weights = None
    if sizes["weight_bytes"] is not None:
        weights = sizes["weight_bytes"] + (sizes["unquantized"] + emb + norms) * store

    lora_params = sizes["trainable"]
    lora = _times(lora_params, 4)  # adapters train in fp32
    grads = _times(lora_params, 4)
    opt = recipe["training"]["optimizer"]
    optimizer = _times(lora_params, 2 if "8bit" in opt else (0 if opt == "sgd" else 8))

    h, i, kv = s.hidden, s.intermediate, s.hidden // s.heads * s.kv_heads
    if d != 2:
        # two RMSNorms keep ~3 fp32 vectors each (input upcast, normalised, scaled); rotary keeps q, k and
        # their rotated halves; attention its q, k, v and output; the MLP four intermediate-size tensors
        per_layer_tok = 4 * (3 * h) * 2 + d * (h + 2 * (h + kv) + (h + 2 * kv + h) + h + h + 4 * i)
    else:
        # bf16 autocast with frozen bf16 weights (ftk's default on GPUs) keeps less: each RMSNorm one fp32
        # copy of its input; attention q, k, v and output; the MLP gate, up and SiLU(gate) (a frozen
        # projection keeps no input: what an adapter keeps is its own declaration). 156 KB per token per
        # layer for LLaMA-7B with LoRA r=8 on q/v against 151 KB measured (H200, eager; saved-tensor tally
        # of bench/gpu_bench.py).
        per_layer_tok = 2 * 4 * h + d * (2 * h + 2 * kv) + 3 * d * i
    per_layer_tok += sizes["adapter_activations"]
    ckpt = gradient_checkpointing_on(recipe, cuda)
    # saved tensors, plus one layer's worth of their gradients in flight during backward (with
    # checkpointing: each layer's input, plus the one layer being recomputed and its gradients)
    if ckpt:
        activations = tokens * (s.layers * h * d + 2 * per_layer_tok)
    else:
        activations = tokens * (s.layers + 1) * per_layer_tok
    logits = tokens * s.vocab * 4 * 3  # fp32 logits, log-softmax kept for backward, their gradient
    # a no-grad pass (the reference) while the graph is kept: one layer's tensors at a time, fp32 logits
    ref_tokens = int(recipe["training"]["batch_size"]) * int(recipe["data"]["max_length"]) * ref_seqs
    reference = ref_tokens * (per_layer_tok + s.vocab * 4)
    # On the CPU the checkpoint is memory-mapped and its pages stay resident after loading; a GPU
    # run reads it through host memory that the GPU figure does not include.
    ckpt_bytes = 0 if cuda else (linear + emb + norms) * _DTYPE_BYTES.get(
        str(_get(config, "dtype") or "float32").replace("torch.", ""), 4)
    parts = {"weights": weights, "lora_weights": lora, "optimizer_state": optimizer, "gradients": grads,
             "activations": activations, "logits": logits, "reference_pass": reference, "checkpoint_pages": ckpt_bytes}
    known = [v for v in parts.values() if v is not None]
    parts["total"] = sum(known) if len(known) == len(parts) else None
    params = linear + emb + norms
    return {
        "parameters": int(params),
        "trainable_parameters": _int(lora_params),
        "trainable_share": None if lora_params is None else lora_params / max(1, params),
        "bytes": {k: _int(v) for k, v in parts.items()},
        "assumptions": {"tokens_per_micro_batch": tokens, "compute_bytes": d, "gradient_checkpointing": ckpt,
                        "quantized_linear_parameters": _int(quantized), "sequences_per_example": seqs,
                        "reference_sequences_per_example": ref_seqs},
        "unknown": sizes["unknown"],
    }


def _int(v):
    return None if v is None else int(v)


def plan(recipe: dict, manager, with_data: bool = True) -> dict:
    from transformers import AutoConfig

    m = recipe["model"]
    cfg = AutoConfig.from_pretrained(m["name"], revision=m.get("revision"), cache_dir=m.get("cache_dir"),
                                     trust_remote_code=m["trust_remote_code"])
    import torch

    from ftk.model import resolve_precision

    concrete = copy.deepcopy(dict(recipe))  # "auto" precision as this machine would run it
    concrete.setdefault("training", {})["precision"] = resolve_precision(recipe["training"]["precision"])
    out = estimate_memory(cfg, concrete, cuda=torch.cuda.is_available(), manager=manager)
    if with_data:
        from ftk import data as data_mod
        from ftk import model as model_mod

        tok = model_mod.load_tokenizer(recipe)
        prepared = data_mod.prepare_data(recipe, tok, manager)
        st = prepared.stats
        tr = recipe["training"]
        rows = len(prepared.train) if hasattr(prepared.train, "__len__") else None
        out["data"] = {"train_rows": rows, "stats": st}
        if rows is not None:
            per_step = tr["batch_size"] * tr["gradient_accumulation_steps"] * int(_world())
            steps = math.ceil(rows / per_step) * tr["epochs"]
            out["data"]["estimated_steps"] = int(min(steps, tr["max_steps"])) if tr["max_steps"] > 0 else int(steps)
    return out


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def human(n: float) -> str:
    for unit, size in (("GiB", GB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: dict) -> str:
    b = p["bytes"]
    t = p["trainable_parameters"]
    lines = [f"parameters: {p['parameters']:,}",
             "trainable (adapter) parameters: "
             + (f"{t:,} ({100 * p['trainable_share']:.3f}%)" if t is not None else "unknown"),
             "peak memory estimate:"]
    for k in ("weights", "lora_weights", "optimizer_state", "gradients", "activations", "logits", "reference_pass",
              "checkpoint_pages", "total"):
        if k == "reference_pass" and not b.get(k):
            continue  # methods without a reference model
        lines.append(f"  {k:<16} {human(b[k]) if b[k] is not None else 'unknown':>11}")
    a = p["assumptions"]
    per = a.get("sequences_per_example", 1)
    lines.append(f"  (micro-batch of {a['tokens_per_micro_batch']} tokens"
                 + (f" ({per} sequences per example)" if per > 1 else "")
                 + f", {a['compute_bytes']}-byte compute, "
                 f"gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'})")
    lines.extend(f"  {u}" for u in p.get("unknown") or [])
    if "data" in p:
        d = p["data"]
        lines.append(f"training rows: {d.get('train_rows')}, estimated optimizer steps: {d.get('estimated_steps')}")
    return "\n".join(lines)

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

from ftk.model import activation_offloading_on, gradient_checkpointing_on, tiled_mlp_on

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


def _hf_config(config):
    """A transformers config for the components' ModelContext (a plain dict is a LLaMA-shaped one)."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    kw = dict(config)
    return AutoConfig.for_model(kw.pop("model_type", "llama"), **kw)


def declared_sizes(config, recipe: dict, manager, compute_bytes: int = 2, cuda: bool | None = None,
                   processes: int = 1) -> dict:
    """What the recipe's quantizer and adapter declare for this model (``recipe``: defaults filled):
    ``quantized`` / ``unquantized`` linear parameters and ``weight_bytes`` of the quantized ones (of which
    ``replicated_weight_bytes`` outside the parameters: FSDP does not shard them), ``trainable``
    parameters, ``adapter_activations`` (bytes per token in one decoder layer), and the same for one
    decoder layer (``layer_weight_bytes``, ``layer_unquantized``, ``layer_trainable``); None (0 for
    activations) where a component does not say, with the reason in ``unknown``. ``cuda``/``processes``:
    the machine and launch planned for."""
    from ftk.model import model_context, quantization_plan

    shape = Shape.from_config(config)
    linears = shape.linears()
    ctx, _ = model_context(recipe, manager, _hf_config(config), cuda=cuda, processes=processes)
    qname, qplan = quantization_plan(recipe, manager, ctx)
    out = {"quantized": None, "unquantized": None, "weight_bytes": None, "replicated_weight_bytes": 0,
           "trainable": None, "adapter_activations": 0, "layer_weight_bytes": None, "layer_unquantized": None,
           "layer_trainable": None, "unknown": []}
    quantizes = qplan.quantizes
    if quantizes is None and qplan.bytes_per_weight is not None:
        quantizes = _every_layer
    q = None if quantizes is None else sum(i * o for n, (i, o) in linears.items() if quantizes(n, i, o))
    if q is not None:
        out["quantized"], out["unquantized"] = q, sum(i * o for i, o in linears.values()) - q
        first = shape.linears(range(1))
        q1 = sum(i * o for n, (i, o) in first.items() if quantizes(n, i, o))
        out["layer_unquantized"] = sum(i * o for i, o in first.values()) - q1
    if q == 0 or (q is not None and qplan.bytes_per_weight is not None):
        out["weight_bytes"] = q * qplan.bytes_per_weight if q else 0
        out["layer_weight_bytes"] = q1 * qplan.bytes_per_weight if q1 else 0
        out["replicated_weight_bytes"] = q * (qplan.replicated_bytes_per_weight or 0)
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
            if key == "trainable":
                out["layer_trainable"] = int(fn(aopts, shape.linears(range(1)), ctx))
    return out


def _every_layer(name: str, in_features: int, out_features: int) -> bool:
    return True


def _times(n, k):
    return None if n is None else n * k


def estimate_memory(config, recipe: dict, cuda: bool = False, manager=None, processes: int = 1) -> dict:
    """Peak memory estimate in bytes of one process of ``processes`` (one rank), split by what holds it
    (None: a component does not declare it). Under distributed.strategy "fsdp" the weights, the adapter,
    its gradients and optimizer state are divided among the processes, and the decoder layers being
    computed (two: the one running and the one prefetched) and the root unit are gathered whole; under
    "ddp" every process holds everything."""
    if manager is None:
        from ftk.manager import get_manager

        manager = get_manager()
    from ftk import distributed

    from ftk.recipe import filled_recipe

    recipe = filled_recipe(recipe, manager)
    d = _compute_bytes(recipe, cuda)
    sizes = declared_sizes(config, recipe, manager, d, cuda=cuda, processes=processes)
    dist = distributed.settings(recipe)
    n = processes if dist["strategy"] == "fsdp" else 1  # how many ways the parameters are sharded
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
    unsharded = offloaded = loading = 0
    if n > 1:
        loading = weights  # every process loads the whole quantized model, then shards it
        fs = dist["fsdp"]
        layer = None  # one decoder layer whole: what FSDP all-gathers for its forward and backward
        if sizes["layer_weight_bytes"] is not None and sizes["layer_trainable"] is not None:
            layer = sizes["layer_weight_bytes"] + (sizes["layer_unquantized"] + 2 * s.hidden) * store \
                + sizes["layer_trainable"] * 4
        root = (emb + s.hidden) * store  # embeddings, final norm, head: gathered from forward to backward
        if weights is not None:
            # constants outside the parameters (a 4-bit quantizer's quant state) stay whole on every rank
            rep = sizes["replicated_weight_bytes"]
            weights = _shard(weights - rep, n) + rep
        lora, grads, optimizer = _shard(lora, n), _shard(grads, n), _shard(optimizer, n)
        if layer is None or weights is None:
            unsharded = None
        elif fs["reshard_after_forward"]:
            unsharded = 2 * layer + root  # the running layer and the prefetched one
        else:
            unsharded = s.layers * layer + root  # every layer stays gathered from its forward to backward
        if fs["cpu_offload"] and cuda:
            # shards, gradients and optimizer state live in host memory
            offloaded = None if None in (weights, lora, grads, optimizer) else weights + lora + grads + optimizer
            weights, lora, grads, optimizer = 0, 0, 0, 0

    h, i, kv = s.hidden, s.intermediate, s.hidden // s.heads * s.kv_heads
    if d != 2:
        # two RMSNorms keep ~3 fp32 vectors each (input upcast, normalised, scaled); rotary keeps q, k and
        # their rotated halves; attention its q, k, v and output; the MLP four intermediate-size tensors
        per_layer_tok = 4 * (3 * h) * 2 + d * (h + 2 * (h + kv) + (h + 2 * kv + h) + h + h + 4 * i)
        mlp_tok = d * 4 * i
    else:
        # bf16 autocast with frozen bf16 weights (ftk's default on GPUs) keeps less: each RMSNorm one fp32
        # copy of its input; attention q, k, v and output; the MLP gate, up and SiLU(gate) (a frozen
        # projection keeps no input: what an adapter keeps is its own declaration). 156 KB per token per
        # layer for LLaMA-7B with LoRA r=8 on q/v against 151 KB measured (H200, eager; saved-tensor tally
        # of bench/gpu_bench.py).
        per_layer_tok = 2 * 4 * h + d * (2 * h + 2 * kv) + 3 * d * i
        mlp_tok = 3 * d * i
    if tiled_mlp_on(recipe):
        # the MLP keeps its tiles' inputs instead of its intermediates (one tile's exist at a time: a
        # tile of hidden_size positions per row, small next to the rest)
        per_layer_tok += d * h - mlp_tok
    per_layer_tok += sizes["adapter_activations"]
    ckpt = gradient_checkpointing_on(recipe, cuda)
    # saved tensors, plus one layer's worth of their gradients in flight during backward (with
    # checkpointing: each layer's input, plus the one layer being recomputed and its gradients)
    if ckpt:
        activations = tokens * (s.layers * h * d + 2 * per_layer_tok)
    else:
        activations = tokens * (s.layers + 1) * per_layer_tok
    offload = cuda and activation_offloading_on(recipe)
    if offload:
        # the saved tensors wait in host memory; on the GPU one layer's come back at a time in backward
        stays = tokens * 2 * per_layer_tok
        offloaded = None if offloaded is None else offloaded + activations - stays
        activations = stays
    # fp32 logits, log-softmax kept for backward, their gradient: for every position, or one chunk of them
    live = tokens if method.logits_positions is None else min(tokens, method.logits_positions)
    logits = live * s.vocab * 4 * 3
    # a no-grad pass (the reference) while the graph is kept: one layer's tensors at a time, fp32 logits
    # (of every position, or of one chunk of them as the loss takes them)
    ref_tokens = int(recipe["training"]["batch_size"]) * int(recipe["data"]["max_length"]) * ref_seqs
    ref_live = ref_tokens if method.logits_positions is None else min(ref_tokens, method.logits_positions)
    reference = ref_tokens * per_layer_tok + ref_live * s.vocab * 4
    # On the CPU the checkpoint is memory-mapped and its pages stay resident after loading; a GPU
    # run reads it through host memory that the GPU figure does not include.
    ckpt_bytes = 0 if cuda else (linear + emb + norms) * _DTYPE_BYTES.get(
        str(_get(config, "dtype") or "float32").replace("torch.", ""), 4)
    parts = {"weights": weights, "lora_weights": lora, "optimizer_state": optimizer, "gradients": grads,
             "unsharded_units": unsharded, "activations": activations, "logits": logits,
             "reference_pass": reference, "checkpoint_pages": ckpt_bytes}
    known = [v for v in parts.values() if v is not None]
    training = sum(known) if len(known) == len(parts) else None
    parts["loading"] = loading
    parts["total"] = None if training is None or loading is None else max(training, loading)
    parts["offloaded_to_host"] = offloaded
    params = linear + emb + norms
    return {
        "parameters": int(params),
        "trainable_parameters": _int(lora_params),
        "trainable_share": None if lora_params is None else lora_params / max(1, params),
        "bytes": {k: _int(v) for k, v in parts.items()},
        "assumptions": {"tokens_per_micro_batch": tokens, "compute_bytes": d, "gradient_checkpointing": ckpt,
                        "activation_offloading": offload, "tiled_mlp": tiled_mlp_on(recipe),
                        "quantized_linear_parameters": _int(quantized), "sequences_per_example": seqs,
                        "reference_sequences_per_example": ref_seqs,
                        "logits_positions": method.logits_positions, "device": "cuda" if cuda else "cpu",
                        "processes": processes, "strategy": dist["strategy"], "shards": n},
        "unknown": sizes["unknown"],
    }


def _shard(nbytes, n: int):
    """One process's part of ``nbytes`` split ``n`` ways (FSDP pads each tensor to a multiple of n rows)."""
    return None if nbytes is None else -(-nbytes // n)


def _int(v):
    return None if v is None else int(v)


def _total_with(config, recipe: dict, settings: dict, cuda: bool, manager, processes: int):
    """The estimated total of ``recipe`` with ``settings`` ({"section.key": value}) changed."""
    r = copy.deepcopy(dict(recipe))
    for key, value in settings.items():
        section, name = key.split(".")
        r.setdefault(section, {})[name] = value
    return estimate_memory(config, r, cuda=cuda, manager=manager, processes=processes)["bytes"]["total"]


LENGTH_STEP = 256  # longest_max_length answers in multiples of this many tokens


def longest_max_length(config, recipe: dict, memory: int, cuda: bool, manager=None, processes: int = 1,
                       limit: int = 1 << 21) -> int | None:
    """The longest ``data.max_length`` (a multiple of LENGTH_STEP, at most ``limit``) whose estimated peak,
    all else as in ``recipe``, fits in ``memory`` bytes per process; 0 when not even LENGTH_STEP fits, None
    when the estimate is unknown. The estimate grows with the length, so a binary search finds it."""
    def total(length: int):
        return _total_with(config, recipe, {"data.max_length": length}, cuda, manager, processes)

    lo, hi = 0, limit // LENGTH_STEP  # lo steps fit (0: nothing known to fit); hi + 1 steps do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        need = total(mid * LENGTH_STEP)
        if need is None:
            return None
        lo, hi = (mid, hi) if need <= memory else (lo, mid - 1)
    return lo * LENGTH_STEP


# the memory levers ftk plan tries on a run that does not fit, in this order
LEVERS = ("model.gradient_checkpointing", "model.tiled_mlp", "model.activation_offloading")


def memory_levers(config, recipe: dict, memory: int, cuda: bool, manager=None, processes: int = 1) -> list[dict]:
    """Each memory lever ``recipe`` leaves off (activation offloading only on GPUs), alone and then all
    together: ``{"set": {key: true, ...}, "total": bytes or None, "fits": bool or None}``."""
    skip = {"model.gradient_checkpointing": gradient_checkpointing_on(recipe, cuda),
            "model.tiled_mlp": tiled_mlp_on(recipe),
            "model.activation_offloading": activation_offloading_on(recipe) or not cuda}  # on already, or no GPU
    off = [k for k in LEVERS if not skip[k]]
    out = []
    for combo in [[k] for k in off] + ([off] if len(off) > 1 else []):
        total = _total_with(config, recipe, dict.fromkeys(combo, True), cuda, manager, processes)
        out.append({"set": dict.fromkeys(combo, True), "total": total,
                    "fits": None if total is None else total <= memory})
    return out


def plan(recipe: dict, manager, with_data: bool = True, device: str | None = None,
         processes: int | None = None, device_memory: int | None = None) -> dict:
    """``device`` ("cuda" or "cpu"; default: this machine's) and ``processes`` (default: this launch's
    WORLD_SIZE) describe the run planned for, which need not be on this machine."""
    from transformers import AutoConfig

    m = recipe["model"]
    cfg = AutoConfig.from_pretrained(m["name"], revision=m.get("revision"), cache_dir=m.get("cache_dir"),
                                     trust_remote_code=m["trust_remote_code"])
    import torch

    from ftk.model import resolve_precision

    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    from ftk.distributed import world_size

    processes = processes or world_size()
    concrete = copy.deepcopy(dict(recipe))  # "auto" precision as the planned machine would run it
    concrete.setdefault("training", {})["precision"] = resolve_precision(recipe["training"]["precision"], cuda)
    out = estimate_memory(cfg, concrete, cuda=cuda, manager=manager, processes=processes)
    if device_memory is not None:
        out["device_memory"] = device_memory
        out["fits"] = None if out["bytes"]["total"] is None else out["bytes"]["total"] <= device_memory
        out["longest_max_length"] = longest_max_length(cfg, concrete, device_memory, cuda, manager, processes)
        if out["fits"] is False:
            out["memory_levers"] = memory_levers(cfg, concrete, device_memory, cuda, manager, processes)
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
            per_step = tr["batch_size"] * tr["gradient_accumulation_steps"] * processes
            steps = math.ceil(rows / per_step) * tr["epochs"]
            out["data"]["estimated_steps"] = int(min(steps, tr["max_steps"])) if tr["max_steps"] > 0 else int(steps)
    return out


def human(n: float) -> str:
    for unit, size in (("GiB", GB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: dict) -> str:
    b = p["bytes"]
    t = p["trainable_parameters"]
    a = p["assumptions"]
    who = (f"per process, {a['processes']} {a['device']} processes ({a['strategy']}"
           + (f": weights, adapter, gradients and optimizer state sharded {a['shards']} ways)" if a["shards"] > 1
              else ": every process holds the whole model)") if a["processes"] > 1 else f"one {a['device']} process")
    lines = [f"parameters: {p['parameters']:,}",
             "trainable (adapter) parameters: "
             + (f"{t:,} ({100 * p['trainable_share']:.3f}%)" if t is not None else "unknown"),
             f"peak memory estimate, {who}:"]
    for k in ("weights", "lora_weights", "optimizer_state", "gradients", "unsharded_units", "activations", "logits",
              "reference_pass", "checkpoint_pages", "loading", "total", "offloaded_to_host"):
        if k in ("reference_pass", "unsharded_units", "loading", "offloaded_to_host") and b.get(k) == 0:
            continue  # methods without a reference model; not sharded; no offload
        note = {"loading": "  (each process loads the whole quantized model, then shards it)",
                "total": "  (the larger of training and loading)" if b.get("loading") else ""}.get(k, "")
        lines.append(f"  {k:<17} {human(b[k]) if b[k] is not None else 'unknown':>11}{note}")
    per = a.get("sequences_per_example", 1)
    lines.append(f"  (micro-batch of {a['tokens_per_micro_batch']} tokens"
                 + (f" ({per} sequences per example)" if per > 1 else "")
                 + f", {a['compute_bytes']}-byte compute, "
                 f"gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}"
                 + (", activations offloaded to host memory" if a.get("activation_offloading") else "") + ")")
    if "device_memory" in p:
        have, need = p["device_memory"], b["total"]
        lines.append("  fits: unknown (the total is unknown)" if need is None else
                     f"  fits in {human(have)} per process: " + (f"yes, {human(have - need)} left" if need <= have
                                                                  else f"no, {human(need - have)} short")
                     + (" (the CUDA context and allocator slack, about 1 GiB, are not included)" if a["device"] == "cuda"
                        else ""))
        for lever in p.get("memory_levers") or []:
            lines.append(f"    with {', '.join(f'{k}=true' for k in lever['set'])}: "
                         + ("unknown" if lever["total"] is None else
                            f"{human(lever['total'])}, " + ("fits" if lever["fits"] else "does not fit")))
        longest = p.get("longest_max_length")
        if longest is not None:
            lines.append(f"  longest data.max_length that fits, all else as planned: "
                         + (f"{longest:,} tokens" if longest else f"none (not even {LENGTH_STEP} tokens)"))
    lines.extend(f"  {u}" for u in p.get("unknown") or [])
    if "data" in p:
        d = p["data"]
        lines.append(f"training rows: {d.get('train_rows')}, estimated optimizer steps: {d.get('estimated_steps')}")
    return "\n".join(lines)

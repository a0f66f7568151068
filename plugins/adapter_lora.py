"""Built-in adapter `lora` over PEFT (rsLoRA and DoRA as options)."""
from ftk.components import AdapterInfo
from ftk.hookspecs import hookimpl

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SCHEMA = {
    "type": "object",
    "properties": {
        "r": {"type": "integer", "minimum": 1, "default": 8},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "default": 16},
        "dropout": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.05},
        "dropout_rng": {"enum": ["auto", "torch"], "default": "auto",
                        "description": "Where the dropout masks' random bits come from. auto: training on a "
                                       "CPU where torch samples masks on one thread (all but Intel's), numpy's "
                                       "SFC64 generator seeded from torch's (the same Bernoulli masks and "
                                       "scaling as torch's dropout, different random numbers, ~4x faster); "
                                       "elsewhere torch's. torch: torch's dropout everywhere."},
        "target_modules": {"anyOf": [{"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                                     {"enum": ["default", "all-linear"]}],
                           "default": ["q_proj", "v_proj"],
                           "description": "Module names, or a preset resolved per architecture through the "
                                          "ftk_adapter_targets hook (\"default\", \"all-linear\")."},
        "bias": {"enum": ["none", "all", "lora_only"], "default": "none"},
        "use_rslora": {"type": "boolean", "default": False, "description": "Scale by alpha/sqrt(r) (rsLoRA)."},
        "use_dora": {"type": "boolean", "default": False, "description": "Weight-decomposed LoRA (DoRA)."},
        "modules_to_save": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1}, "default": None,
                            "description": "Modules trained in full and saved with the adapter (e.g. lm_head)."},
    },
}


def resolve_targets(target, ctx) -> list[str] | str:
    """Preset -> module names via the hook; PEFT's own \"all-linear\" when no plugin knows the model."""
    if isinstance(target, list):
        return list(target)
    names = ctx.targets_for(target) if ctx is not None and ctx.targets_for else None
    if names:
        return list(names)
    if target == "all-linear":
        return "all-linear"
    from ftk.errors import FtkError

    mt = getattr(getattr(ctx, "model_config", None), "model_type", "?")
    raise FtkError(f"adapter.target_modules: no plugin knows the {target!r} targets for model type {mt!r}; "
                   f"list the module names instead")


def _targeted(options, linears, ctx) -> list[tuple[int, int]]:
    """(in, out) of each of ``linears`` the adapter targets (a name matches as PEFT matches it)."""
    targets = resolve_targets(options["target_modules"], ctx)
    return [shape for name, shape in linears.items()
            if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)]


def trainable_parameters(options, linears, ctx) -> int:
    """For `ftk plan`: LoRA trains A (r x in) and B (out x r) on each targeted linear layer."""
    return sum(int(options["r"]) * (i + o) for i, o in _targeted(options, linears, ctx))


def activation_bytes(options, linears, ctx, compute_bytes) -> int:
    """For `ftk plan`: what LoRA keeps per token in one layer for backward."""
    d, r, chosen = compute_bytes, int(options["r"]), _targeted(options, linears, ctx)
    ins = sum(i for i, _ in chosen)
    if d == 2:
        # autocast: each target's dropout output and its 1-byte mask (without dropout, the shared normed
        # input), and A's output
        kept = (d + 1) * ins if float(options["dropout"]) > 0 else d * ctx.model_config.hidden_size
        return kept + d * r * len(chosen)
    # fp32: each target's dropout output, A's output and the 1-byte dropout mask
    return d * (ins + r * len(chosen)) + ins


def apply(model, options, ctx):
    from peft import LoraConfig, get_peft_model

    from ftk.errors import FtkError

    targets = resolve_targets(options["target_modules"], ctx)
    if isinstance(targets, list):
        # PEFT only fails when *no* name matches; a typo among several would pass silently. A name
        # matches as PEFT matches it: the whole module path or a suffix after a dot.
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise FtkError(f"adapter.target_modules: no module named {', '.join(map(repr, missing))} in this model "
                           f"(linear layers: {', '.join(sorted(_linear_leaves(model)))})")
    cfg = LoraConfig(r=int(options["r"]), lora_alpha=options["alpha"],
                     lora_dropout=float(options["dropout"]), bias=options["bias"],
                     target_modules=targets, use_rslora=bool(options["use_rslora"]),
                     use_dora=bool(options["use_dora"]),
                     modules_to_save=options.get("modules_to_save") or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    if options["dropout_rng"] == "auto" and cfg.lora_dropout > 0:
        from . import lora_dropout  # this package's own module, as a third-party plugin would

        if lora_dropout.torch_samples_serially(getattr(ctx, "cpu_vendor", "")):
            lora_dropout.install(model)
    if cfg.use_dora:
        keep_int8_scales(model)
    return model


def keep_int8_scales(model) -> int:
    """DoRA over bitsandbytes int8 on the CPU: keep each layer's row scales (SCB) through PEFT's weight dequantization.
    On every forward, DoRA calls PEFT's ``dequantize_module_weight``, which on the CPU replaces the layer's
    weight with ``weight.to("cpu")``. bitsandbytes' ``Int8Params.to`` gives the new weight its int8 data as
    ``CB`` but copies ``SCB`` only from the weight itself, and after the layer's first forward the scales live
    in ``layer.state``, not on the weight. The next forward then moves ``CB`` with no scales into the state
    (``init_8bit_state``) and the matmul dies with ``'NoneType' object has no attribute 'unsqueeze'``
    (bitsandbytes 0.50, PEFT 0.21). Handing the weight the state's scales back before each forward keeps them.
    On CUDA PEFT does not replace the weight, so this never fires there. Returns the number of layers guarded."""
    n = 0
    for mod in model.modules():
        if type(mod).__name__ == "Linear8bitLt" and hasattr(mod, "state") and hasattr(mod, "init_8bit_state"):
            mod.register_forward_pre_hook(_restore_int8_scales)
            n += 1
    return n


def _restore_int8_scales(layer, _args) -> None:
    w = layer.weight
    if getattr(w, "CB", None) is not None and getattr(w, "SCB", None) is None and layer.state.SCB is not None:
        w.SCB = layer.state.SCB


def _linear_leaves(model) -> set[str]:
    out = set()
    for n, m in model.named_modules():
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            out.add(n.rsplit(".", 1)[-1])
    return out


@hookimpl
def ftk_register_adapters(register):
    register("lora", apply, description="Low-rank adapters (PEFT LoRA; rsLoRA and DoRA options)", options_schema=SCHEMA,
             info=AdapterInfo(trainable_parameters=trainable_parameters, activation_bytes=activation_bytes))


@hookimpl
def ftk_adapter_targets(model_type, preset):
    if model_type in ("llama", "mistral", "qwen2"):
        if preset == "all-linear":
            return list(LLAMA_ALL)
        return ["q_proj", "v_proj"]
    return None

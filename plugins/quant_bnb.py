"""Built-in quantizers over bitsandbytes: `nf4`, `fp4` (4-bit, optional nested/double quantization),
`int8`, and `none` (plain LoRA on an unquantized model).

A quantizer only plans: it returns the ``from_pretrained`` keyword arguments. torch, transformers and
bitsandbytes are imported inside the factory so listing plugins stays instant.
"""
import functools

from ftk.hookspecs import hookimpl

# bitsandbytes quantizes 4-bit weights in blocks of 64 values along each row.
BLOCK_SIZE = 64
# Each block keeps an fp32 absmax; nested (double) quantization stores it in 8 bits instead, plus an fp32
# constant per 256 absmax values. Bytes per 4-bit weight, for `ftk plan`:
FOUR_BIT_BYTES = {True: 0.5 + (1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * 256)), False: 0.5 + 4 / BLOCK_SIZE}
# bitsandbytes' CPU inference kernel (avx512-bf16 machines) repacks a Linear4bit and asserts
# out_features % 32 == 0 on its first eval/no-grad call. ftk keeps that kernel off
# (keep_trainable_layout), but a user who loads the base with plain bitsandbytes to serve the
# adapter does not: such layers stay unquantized so the adapter works there too.
CPU_PACK_N = 32

_SKIP = {
    "skip_modules": {"type": "array", "items": {"type": "string", "minLength": 1}, "default": [],
                     "description": "Extra module names (suffixes or regexes) to leave unquantized."},
    "on_incompatible": {"enum": ["skip", "error"], "default": "skip",
                        "description": "Linear layers bitsandbytes cannot quantize cleanly: leave them "
                                       "unquantized with a note (skip) or refuse (error)."},
}
_FOUR_BIT = {
    "type": "object",
    "properties": {
        "nested": {"type": "boolean", "default": True, "description": "Double quantization of the constants."},
        "compute_dtype": {"enum": ["auto", "float32", "bfloat16", "float16"], "default": "auto",
                          "description": "dtype of the de-quantized matmul; auto follows training.precision."},
        "dequantize": {"enum": ["bitsandbytes", "torch"], "default": "bitsandbytes",
                       "description": "How layers compiled by training.compile dequantize a 4-bit weight for "
                                      "its matmul: bitsandbytes' op, which the compiler cannot see into, or the "
                                      "same arithmetic in torch ops (bit-identical), which it fuses into the "
                                      "layer's graph. Eager code always runs bitsandbytes' op."},
        **_SKIP,
    },
}
_INT8 = {
    "type": "object",
    "properties": {
        "threshold": {"type": "number", "minimum": 0, "default": 6.0,
                      "description": "LLM.int8() outlier threshold."},
        **_SKIP,
    },
}


def incompatible_linears(model_config, four_bit: bool) -> tuple[list[str], list[str], list[str]]:
    """(default skips, incompatible module names, notes) from a weightless copy of the model.

    Default skips are what transformers would leave alone by itself (the output head); we must pass
    them again because an explicit skip list replaces transformers' defaults.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(model_config)
    defaults = list(get_keys_to_not_convert(meta))
    bad, notes = [], []
    for name, mod in meta.named_modules():
        if type(mod) is not torch.nn.Linear or any(name == d or name.endswith("." + d) for d in defaults):
            continue
        why = []
        if four_bit and mod.in_features % BLOCK_SIZE:
            why.append(f"in_features {mod.in_features} is not a multiple of the 4-bit block size {BLOCK_SIZE}")
        if four_bit and mod.out_features % CPU_PACK_N:
            why.append(f"out_features {mod.out_features} is not a multiple of {CPU_PACK_N} "
                       f"(bitsandbytes' CPU inference kernel)")
        if not four_bit and (mod.in_features % 4 or mod.out_features % 4):
            why.append("int8 kernels need widths that are multiples of 4")
        if why:
            bad.append(name)
            notes.append(f"{name}: {'; '.join(why)}")
    return defaults, bad, notes


def keep_trainable_layout(model) -> list[str]:
    """Keep every 4-bit layer in the layout that backpropagates; returns notes.

    bitsandbytes >= 0.49, on a CPU with AVX512-BF16, repacks a Linear4bit's weight into an inference
    layout the first time the layer runs in eval mode without grad (an evaluation before training
    does exactly that). From then on its matmul takes gemv_4bit, which has no backward: every
    gradient that must pass through a 4-bit layer is silently zero and LoRA learns nothing. AVX2-only
    CPUs never repack. ftk trains and evaluates one model, so the repacking stays off on every CPU
    (and a layer already repacked is unpacked): one numerical path on every machine.
    docs/bitsandbytes-cpu-autograd.md has a standalone reproduction."""
    from bitsandbytes.nn import Linear4bit

    repacking, undone = 0, 0
    for mod in model.modules():
        if not isinstance(mod, Linear4bit):
            continue
        repacking += bool(getattr(mod, "support_avx512bf16_for_cpu", False))
        mod.support_avx512bf16_for_cpu = False
        w = mod.weight
        if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
            undone += 1
    notes = []
    if repacking:
        notes.append(f"bitsandbytes' CPU inference layout (AVX512-BF16) kept off for {repacking} 4-bit layer(s): "
                     f"it has no backward pass")
    if undone:
        notes.append(f"{undone} 4-bit layer(s) unpacked from bitsandbytes' CPU inference layout (their block "
                     f"scales stay rounded to bf16 by that repacking)")
    return notes


def _after_load(dequantize: str, model) -> list[str]:
    notes = keep_trainable_layout(model)
    if dequantize == "torch":
        from . import bnb_dequant  # this package's own module, as a third-party plugin would

        n = bnb_dequant.install(model)
        notes.append(f"{n} 4-bit layer(s) dequantize in torch ops when compiled (model.quantization.dequantize)")
    return notes


def _collapse(names: list[str]) -> list[str]:
    """Per-layer names -> their shared suffix when every layer has the same problem (shorter notes)."""
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    return sorted(suffixes) if len(suffixes) < len(names) else names


def plan(options, ctx, *, method: str):
    import torch
    from transformers import BitsAndBytesConfig

    from ftk.components import QuantizationPlan
    from ftk.errors import FtkError

    if method == "none":
        return QuantizationPlan(from_pretrained_kwargs={}, notes=["no quantization: full-precision base"], kbit=False,
                                quantizes=_never, count_quantized=_no_layers)
    four_bit = method in ("nf4", "fp4")
    defaults, bad, why = incompatible_linears(ctx.model_config, four_bit)
    if bad and options["on_incompatible"] == "error":
        raise FtkError([f"model.quantization: cannot quantize {n}" for n in why]
                       + ["model.quantization.on_incompatible: set to \"skip\" to leave these layers unquantized"])
    skipped = _collapse(bad)
    notes = []
    if bad:
        notes.append(f"{len(bad)} linear layer(s) left unquantized ({', '.join(skipped)}): {why[0].split(': ', 1)[1]}")
    extra = list(options.get("skip_modules") or [])
    if extra:
        notes.append(f"left unquantized by model.quantization.skip_modules: {', '.join(extra)}")
    skip = sorted(set(defaults) | set(skipped) | set(extra))
    if four_bit:
        if options["dequantize"] == "torch" and not ctx.compiled:
            raise FtkError("model.quantization.dequantize: \"torch\" applies to compiled layers only, and "
                           "training.compile is off here; set training.compile to true or remove the option")
        cdt = options["compute_dtype"]
        if cdt == "auto":
            prec = ctx.recipe["training"]["precision"]
            cdt = {"bf16": "bfloat16", "fp16": "float16"}.get(prec, "float32")
        storage = _sharded_storage(ctx.sharding, cdt, options)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                                 bnb_4bit_use_double_quant=bool(options["nested"]),
                                 bnb_4bit_compute_dtype=getattr(torch, cdt), llm_int8_skip_modules=skip,
                                 **({"bnb_4bit_quant_storage": getattr(torch, storage)} if storage else {}))
        notes.insert(0, f"{method} 4-bit{' nested' if options['nested'] else ''}, compute {cdt}"
                        + (f", packed in {storage} for sharding" if storage else ""))
    else:
        if ctx.sharding is not None:
            # Int8Params carry their scales on the parameter object, which sharding replaces
            raise FtkError(f"model.quantization.method: int8 cannot be sharded by distributed.strategy "
                           f"{ctx.sharding.strategy!r}; use nf4 or fp4, or distributed.strategy \"ddp\"")
        import warnings

        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16; once is enough
        warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(options["threshold"]),
                                 llm_int8_skip_modules=skip)
        notes.insert(0, "int8 (LLM.int8())")
    return QuantizationPlan(from_pretrained_kwargs={"quantization_config": cfg}, notes=notes, kbit=True,
                            after_load=functools.partial(_after_load, options["dequantize"]) if four_bit else None,
                            bytes_per_weight=FOUR_BIT_BYTES[bool(options["nested"])] if four_bit else 1.0,
                            replicated_bytes_per_weight=(FOUR_BIT_BYTES[bool(options["nested"])] - 0.5) if four_bit
                            else None,
                            quantizes=_whole_blocks if four_bit else None, count_quantized=count_quantized,
                            weights_in=weights_in)


def _sharded_storage(sharding, compute_dtype: str, options) -> str | None:
    """The dtype 4-bit weights are packed in when the model is sharded (ftk.components.Sharding): the
    compute dtype, which FSDP's mixed precision casts floating-point parameters to, so the packed words
    reach bitsandbytes unchanged (a cast from float32 to bfloat16 halves their bytes and dequantization
    fails). None when not sharded (bitsandbytes' uint8 default)."""
    if sharding is None:
        return None
    if sharding.param_dtype not in (None, compute_dtype):
        from ftk.errors import FtkError

        key = ("model.quantization.compute_dtype" if options["compute_dtype"] != "auto"
               else "training.precision")
        raise FtkError(f"{key}: 4-bit weights computed in {compute_dtype} cannot be sharded with "
                       f"distributed.fsdp.mixed_precision casting parameters to {sharding.param_dtype}; make them "
                       f"agree, or set distributed.fsdp.mixed_precision to false")
    return compute_dtype


def weights_in(param) -> int:
    """A 4-bit parameter packs two weights per byte of its storage (as PEFT counts it)."""
    n = param.numel()
    if type(param).__name__ == "Params4bit":
        n *= 2 * param.element_size()
    return n


def _whole_blocks(name: str, in_features: int, out_features: int) -> bool:
    """`ftk plan`'s rule for a 4-bit layer: both widths whole blocks (what the plan has always assumed)."""
    return in_features % BLOCK_SIZE == 0 and out_features % BLOCK_SIZE == 0


def _never(name: str, in_features: int, out_features: int) -> bool:
    return False


def _no_layers(model) -> int:
    return 0


def count_quantized(model) -> int:
    """bitsandbytes' own quantized layers (PEFT's LoRA wrappers reuse the class names, not the module)."""
    return sum(1 for mod in model.modules() if type(mod).__module__.startswith("bitsandbytes")
               and type(mod).__name__ in ("Linear4bit", "Linear8bitLt"))


def _factory(method):
    def factory(options, ctx):
        return plan(options, ctx, method=method)

    factory.__name__ = f"plan_{method}"
    return factory


@hookimpl
def ftk_register_quantizers(register):
    register("nf4", _factory("nf4"), description="4-bit NormalFloat (QLoRA) via bitsandbytes", options_schema=_FOUR_BIT)
    register("fp4", _factory("fp4"), description="4-bit float via bitsandbytes", options_schema=_FOUR_BIT)
    register("int8", _factory("int8"), description="8-bit LLM.int8() via bitsandbytes", options_schema=_INT8)
    register("none", _factory("none"), description="No quantization (plain LoRA)", options_schema={"type": "object"})

"""Built-in quantizers over bitsandbytes: `nf4`, `fp4` (4-bit, optional nested/double quantization),
`int8`, and `none` (plain LoRA on an unquantized model)."""
from ftk.hookspecs import hookimpl

_FOUR_BIT = {
    "type": "object",
    "properties": {
        "nested": {"type": "boolean", "default": True, "description": "Double quantization of the constants."},
        "compute_dtype": {"enum": ["auto", "float32", "bfloat16", "float16"], "default": "auto"},
    },
}


def plan(options, ctx):
    raise NotImplementedError("quantizers land with the training issue")


@hookimpl
def ftk_register_quantizers(register):
    register("nf4", plan, description="4-bit NormalFloat (QLoRA) via bitsandbytes", options_schema=_FOUR_BIT)
    register("fp4", plan, description="4-bit float via bitsandbytes", options_schema=_FOUR_BIT)
    register("int8", plan, description="8-bit LLM.int8() via bitsandbytes", options_schema={"type": "object"})
    register("none", plan, description="No quantization (plain LoRA)", options_schema={"type": "object"})

"""Built-in adapter `lora` over PEFT."""
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "properties": {
        "r": {"type": "integer", "minimum": 1, "default": 8},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "default": 16},
        "dropout": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.05},
        "target_modules": {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
                                     {"enum": ["default", "all-linear"]}],
                           "default": ["q_proj", "v_proj"]},
        "bias": {"enum": ["none", "all", "lora_only"], "default": "none"},
    },
}


def apply(model, options, ctx):
    raise NotImplementedError("the LoRA adapter lands with the training issue")


@hookimpl
def ftk_register_adapters(register):
    register("lora", apply, description="Low-rank adapters (PEFT LoRA; rsLoRA and DoRA options)", options_schema=SCHEMA)


@hookimpl
def ftk_adapter_targets(model_type, preset):
    if model_type in ("llama", "mistral", "qwen2"):
        if preset == "all-linear":
            return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return ["q_proj", "v_proj"]
    return None

"""Model loading: config first (no weights) -> quantizer plan -> weights -> k-bit preparation and
gradient checkpointing -> adapter. Also precision selection and the merge of an adapter into its base."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from ftk.defaults import schema_default, section
from ftk.errors import FtkError

PRECISIONS = ("bf16", "fp16", "fp32")


# -- precision ------------------------------------------------------------------------------------
# the CPU features that change which kernels run (bf16 speed, bitsandbytes' CPU paths)
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    """{"model": the CPU's model name, "vendor": its vendor id ("GenuineIntel", "AuthenticAMD", ...; None
    when unknown), "features": which of CPU_FEATURES it has} from /proc/cpuinfo."""
    info: dict = {"model": None, "vendor": None, "features": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and info["vendor"] is None:
                    info["vendor"] = value.strip()
                elif key.strip() == "model name" and info["model"] is None:
                    info["model"] = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    info["features"] = [x for x in CPU_FEATURES if x in flags]
                    break
    except OSError:
        pass
    return info


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16); emulated bf16 is slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu_info()["features"]))


def resolve_precision(requested: str, cuda: bool | None = None) -> str:
    """``auto`` -> bf16 where it is fast (bf16 GPUs, AMX/AVX512-BF16 CPUs), fp16 on other GPUs, else fp32.
    An explicit choice the hardware cannot run is a FtkError, not a silent fallback. ``cuda``: resolve for
    CUDA GPUs (True) or this CPU (False) instead of this machine (``ftk plan --device``); GPUs that are
    not this machine's are assumed to support bf16."""
    import torch

    here = torch.cuda.is_available()
    cuda = here if cuda is None else cuda
    if requested == "auto":
        if cuda:
            return "bf16" if not here or torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not cuda:
        raise FtkError("training.precision: fp16 mixed precision needs a CUDA GPU (none found); "
                       "use \"bf16\", \"fp32\" or \"auto\"")
    if requested == "bf16" and cuda and here and not torch.cuda.is_bf16_supported():
        raise FtkError(f"training.precision: this GPU ({torch.cuda.get_device_name(0)}) has no bf16 support; "
                       f"use \"fp16\" or \"auto\"")
    if requested not in PRECISIONS:
        raise FtkError(f"training.precision: {requested!r} is not one of auto, bf16, fp16, fp32")
    return requested


def _model_option(recipe: dict, name: str):
    """model.NAME of a (possibly partial) recipe, or its schema default."""
    return (recipe.get("model") or {}).get(name, schema_default(f"model.{name}"))


def gradient_checkpointing_on(recipe: dict, cuda: bool | None = None) -> bool:
    """model.gradient_checkpointing resolved: "auto" is on when training on a CUDA GPU, where memory is
    what limits QLoRA, and off on the CPU, where RAM is plentiful and compute is not."""
    value = _model_option(recipe, "gradient_checkpointing")
    if value != "auto":
        return bool(value)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return bool(cuda)


def activation_offloading_on(recipe: dict) -> bool:
    return bool(_model_option(recipe, "activation_offloading"))


def tiled_mlp_on(recipe: dict) -> bool:
    return bool(_model_option(recipe, "tiled_mlp"))


def _check_offloading(on: bool) -> None:
    import torch

    if on and not torch.cuda.is_available():
        raise FtkError("model.activation_offloading: needs a CUDA GPU; on the CPU the activations are in host "
                       "memory already, so it would change nothing (set it to false)")


def offloading_context(on: bool):
    """What a training step's forward and backward run under: torch's save_on_cpu, which moves every tensor
    autograd saves to pinned host memory and back when the backward pass needs it. Under gradient
    checkpointing the layers' own saves go to the checkpoint's hooks (the innermost hooks win), so what
    moves is what the checkpoint keeps: each layer's input."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    import torch

    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


# -- tokenizer ------------------------------------------------------------------------------------
def _hub_kwargs(m: dict) -> dict:
    return {"revision": m.get("revision"), "cache_dir": m.get("cache_dir"),
            "trust_remote_code": bool(m.get("trust_remote_code"))}


def load_tokenizer(recipe: dict):
    from transformers import AutoTokenizer

    m = recipe["model"]
    try:
        tok = AutoTokenizer.from_pretrained(m["name"], **_hub_kwargs(m))
    except (OSError, ValueError) as e:
        raise FtkError(f"model.name: cannot load a tokenizer from {m['name']!r}: {_first_line(e)}") from None
    try:
        from ftk.data import prepare_tokenizer
    except ImportError:
        return tok
    return prepare_tokenizer(tok)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# -- model ----------------------------------------------------------------------------------------
def _load_config(m: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(m["name"], **_hub_kwargs(m))
    except (OSError, ValueError) as e:
        raise FtkError(f"model.name: cannot load a model config from {m['name']!r}: {_first_line(e)}") from None


def _torch_dtype(precision: str):
    import torch

    if not torch.cuda.is_available():
        return torch.float32  # CPU autocast handles bf16; fp32 master weights keep LoRA updates exact
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _check_attn(impl: str) -> None:
    if impl == "flash_attention_2":
        import importlib.util

        import torch

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise FtkError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn "
                           "package; use \"sdpa\"")


def compile_on(recipe: dict, cuda: bool | None = None) -> bool:
    """training.compile resolved: "auto" is on when training on a CUDA GPU with Triton for the kernels.
    ``cuda``: for CUDA GPUs (True) or this CPU (False) instead of this machine; CUDA builds of torch
    that are not this machine's are assumed to bring Triton, as they do."""
    value = section(recipe, "training")["compile"]
    if value != "auto":
        return bool(value)
    import importlib.util

    import torch

    here = torch.cuda.is_available()
    cuda = here if cuda is None else cuda
    return cuda and (not here or importlib.util.find_spec("triton") is not None)


def attention_implementation(recipe: dict, cuda: bool | None = None) -> str:
    """The attention transformers loads the model with: model.attn_implementation with ``auto`` resolved
    (ftk.attention.resolve); ftk's ``sdpa_packed`` is registered with transformers when chosen."""
    from ftk import attention

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    impl = attention.resolve(recipe["model"]["attn_implementation"], cuda, compile_on(recipe, cuda))
    if impl == attention.NAME:
        attention.register()
    return impl


def apply_after_load(model, plan) -> None:
    """The quantizer's fix-ups on the loaded layers (its notes join the plan's)."""
    if plan is not None and plan.after_load is not None:
        plan.notes.extend(plan.after_load(model) or [])


def count_quantized(model, plan) -> int | None:
    """The quantizer's own count of its quantized layers (``QuantizationPlan.count_quantized``); None
    when it does not declare one."""
    count = getattr(plan, "count_quantized", None)
    return None if count is None else int(count(model))


def count_parameters(model, plan=None) -> tuple[int, int]:
    """(trainable, total), counting packed quantized weights at their real size (PEFT's own count, or
    the quantizer's ``QuantizationPlan.weights_in``)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    weights_in = getattr(plan, "weights_in", None) or (lambda p: p.numel())
    trainable = total = 0
    for p in model.parameters():
        n = weights_in(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_base(recipe: dict, plan=None, precision: str = "fp32"):
    """The base model as the recipe describes it (with the quantizer's plan, if any)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = recipe["model"]
    _check_attn(m["attn_implementation"])
    kwargs = dict(_hub_kwargs(m), attn_implementation=attention_implementation(recipe),
                  dtype=_torch_dtype(precision))
    if not m.get("allow_pickle"):
        kwargs["use_safetensors"] = True
    if plan is not None:
        kwargs.update(plan.from_pretrained_kwargs)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        return AutoModelForCausalLM.from_pretrained(m["name"], **kwargs)
    except (OSError, ValueError) as e:
        msg = _first_line(e)
        if not m.get("allow_pickle") and "safetensors" in msg.lower():
            raise FtkError(f"model.name: {m['name']!r} has no safetensors weights; set model.allow_pickle to true "
                           f"to load pickle weights (only from sources you trust)") from None
        raise FtkError(f"model.name: cannot load {m['name']!r}: {msg}") from None


def model_context(recipe: dict, manager, config=None, cuda: bool | None = None, processes: int | None = None):
    """(ModelContext, resolved precision) for quantizer and adapter factories; they see the concrete
    precision, never "auto", and how the model will be sharded. ``cuda``/``processes``: the machine the
    model will train on (``ftk plan --device/--nproc``), by default this one and this launch."""
    from ftk.components import ModelContext
    from ftk.distributed import sharding

    config = config if config is not None else _load_config(recipe["model"])
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    precision = resolve_precision(recipe["training"]["precision"], cuda)
    ctx_recipe = copy.deepcopy(dict(recipe))
    ctx_recipe.setdefault("training", {})["precision"] = precision
    ctx = ModelContext(model_config=config, recipe=ctx_recipe,
                       targets_for=lambda preset: manager.adapter_targets(config.model_type, preset),
                       sharding=sharding(recipe, precision, cuda, processes),
                       compiled=compile_on(recipe, cuda), cpu_vendor=cpu_info()["vendor"] or "")
    return ctx, precision


def quantization_plan(recipe: dict, manager, ctx):
    """(method name, QuantizationPlan) from the recipe's quantizer plugin."""
    qopts = dict(recipe["model"].get("quantization") or {"method": "none"})
    qmethod = qopts.pop("method")
    comp = manager.get("quantizer", qmethod)
    with manager.calling(comp, "planning quantization"):
        plan = comp.factory(qopts, ctx)
    # what the plan holds is plugin code too: an exception it raises names the quantizer
    manager.wrap_fields(comp, plan, {"after_load": "preparing the loaded model", "quantizes": "estimating memory",
                                     "count_quantized": "counting quantized layers",
                                     "weights_in": "counting parameters"})
    return qmethod, plan


def load_quantized_base(recipe: dict, manager, tokenizer=None):
    """-> (base model quantized as the recipe says, ctx, precision, method, plan); no adapter."""
    ctx, precision = model_context(recipe, manager)
    qmethod, plan = quantization_plan(recipe, manager, ctx)
    model = load_base(recipe, plan, precision)
    apply_after_load(model, plan)
    model.config.use_cache = False  # packed rows: the block mask from position_ids needs use_cache=False
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
        plan.notes.append(f"token embeddings resized to {len(tokenizer)} for added tokens")
    return model, ctx, precision, qmethod, plan


def prepare_for_training(model, recipe: dict, manager, kbit: bool, ctx=None):
    """k-bit preparation and gradient checkpointing that work together, then the recipe's adapter.
    Used by load_model and by code that builds its model another way (bench/gpu_bench.py)."""
    import transformers

    if ctx is None:
        ctx, _ = model_context(recipe, manager, model.config)
    gc = gradient_checkpointing_on(recipe)
    gc_kwargs = {"use_reentrant": False}
    if tiled_mlp_on(recipe):
        from ftk import tiled_mlp

        tiled_mlp.apply(model)
    if kbit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gc:
        # frozen embeddings give checkpointed blocks inputs without grad: the "does not require grad" trap
        model.enable_input_require_grads()
    # the adapter's random init must not depend on what ran before (resume must rebuild the same model)
    transformers.set_seed(int(recipe["training"]["seed"]))
    aopts = dict(recipe.get("adapter") or {"method": "lora"})
    amethod = aopts.pop("method")
    comp = manager.get("adapter", amethod)
    with manager.calling(comp, "attaching the adapter"):
        model = comp.factory(model, aopts, ctx)
    if kbit and ctx.recipe["training"].get("precision") == "bf16":
        # k-bit preparation upcasts the frozen norms, embeddings and head to fp32 (an fp16 safeguard);
        # under bf16 autocast that costs a cast on every use and the memory of fp32 copies. bf16 has
        # fp32's range, so frozen weights stay bf16; the adapter's trainable weights stay fp32.
        # Measured on an H200 (7B, checkpointing): 1.59x -> 1.69x the baseline, 6.21 -> 4.98 GiB.
        import torch

        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    return model


def load_model(recipe: dict, manager, tokenizer):
    """-> (model with adapter attached, info). Prints the trainable-parameter line."""
    m = recipe["model"]
    _check_offloading(activation_offloading_on(recipe))  # before any weight is read
    model, ctx, precision, qmethod, plan = load_quantized_base(recipe, manager, tokenizer)
    config = ctx.model_config
    notes = list(plan.notes)
    model = prepare_for_training(model, recipe, manager, plan.kbit, ctx)
    amethod = (recipe.get("adapter") or {"method": "lora"})["method"]
    gc = gradient_checkpointing_on(recipe)
    trainable, total = count_parameters(model, plan)
    share = 100.0 * trainable / total if total else 0.0
    from ftk.run import is_main_process

    if is_main_process():
        print(f"trainable params: {trainable:,} ({share:.2f}%) of {total:,}; precision {precision}; "
              f"quantization {qmethod}", flush=True)
        for n in notes:
            print(f"note: {n}", flush=True)
    quantized = count_quantized(model, plan)
    info = {
        "name": m["name"],
        "model_type": config.model_type,
        "parameters": int(total),
        "trainable_parameters": int(trainable),
        "trainable_share_percent": round(share, 4),
        "precision": precision,
        "quantization": {"method": qmethod, "quantized_layers": quantized, "notes": notes},
        "adapter": amethod,
        "gradient_checkpointing": gc,
        "activation_offloading": activation_offloading_on(recipe),
        "tiled_mlp": tiled_mlp_on(recipe),
        "attention": str(getattr(model.config, "_attn_implementation", None) or m["attn_implementation"]),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
    return model, info


# -- adapters on disk -----------------------------------------------------------------------------
def adapter_base_name(adapter_dir: str | os.PathLike) -> str:
    import json

    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        raise FtkError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    try:
        base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except ValueError as e:
        raise FtkError(f"{cfg}: invalid JSON: {e}") from None
    if not base:
        raise FtkError(f"{cfg}: base_model_name_or_path is missing")
    return base


def load_unquantized(base: str, adapter_dir: str | os.PathLike | None = None, dtype: str = "float32",
                     who: str | None = None):
    """(model, tokenizer): ``base`` unquantized in ``dtype`` plus, when given, the trained adapter. The
    tokenizer is the adapter's when it saved one (training may add a pad token), and the embeddings are
    resized to it as training resized them, so a saved embedding layer fits. Used by ``ftk merge`` and
    ``ftk generate``; ``who`` starts the error messages (default: the adapter folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    who = who or str(adapter_dir)
    tok_src = adapter_dir if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise FtkError(f"{who}: cannot load the base model {base!r}: {_first_line(e)}") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if adapter_dir:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights of another shape
            raise FtkError(f"{adapter_dir}: cannot apply the adapter to {base!r}: {_first_line(e)}") from None
    return model, tokenizer


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                  base: str | None = None) -> Path:
    """Load the base unquantized, apply the adapter, merge, save a plain transformers model (atomically)."""
    import shutil

    from ftk.io import temp_dir

    base = base or adapter_base_name(adapter_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FtkError(f"--out: {out} exists and is not an empty folder")
    model, tokenizer = load_unquantized(base, adapter_dir, dtype)
    model = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _keep_sentencepiece(tmp, adapter_dir, base)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _keep_sentencepiece(folder: Path, adapter_dir, base: str) -> None:
    """Put the SentencePiece model (tokenizer.model) of the adapter or its base into ``folder`` when
    ``save_pretrained`` left it out (transformers 5 writes tokenizer.json only): converters such as llama.cpp's
    read the pieces' scores from it, and tokenize differently without it."""
    import shutil

    if (folder / "tokenizer.model").exists():
        return
    for d in (adapter_dir, base):
        if d and (Path(d) / "tokenizer.model").is_file():
            shutil.copyfile(Path(d) / "tokenizer.model", folder / "tokenizer.model")
            return
    if not Path(base).exists():  # a hub id: its file, when it has one
        try:
            from huggingface_hub import hf_hub_download

            shutil.copyfile(hf_hub_download(base, "tokenizer.model"), folder / "tokenizer.model")
        except Exception:  # none there (a BPE tokenizer), or offline: tokenizer.json is what there is
            pass

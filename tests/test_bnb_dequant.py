"""model.quantization.dequantize "torch": the 4-bit matmul in torch ops for compiled layers. Checked
against bitsandbytes itself: the dequantized weights bit-identical for every 4-bit type, nesting, dtype
and packing storage, the matmul's output and input gradient identical to bitsandbytes' MatMul4Bit, and a
compiled training run (inductor's C++ backend here) that never reaches bitsandbytes' op and gives the
same losses as the default."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import data as D
from ftk import model as M
from ftk import train as T
from ftk.errors import FtkError
from ftk.plugins import bnb_dequant

torch.set_num_threads(1)
# on a GPU machine the same checks run against bitsandbytes' CUDA kernels too
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def quantized(quant_type, nested, dtype, shape=(96, 320), storage=torch.uint8, device="cpu"):
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=dtype).to(device)
    return F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested, quant_storage=storage)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bitsandbytes_bit_for_bit(quant_type, nested, dtype, device):
    import bitsandbytes.functional as F

    # 96 x 320 = 480 blocks of 64: not a multiple of the nested 256-block, so its remainder is covered
    packed, qs = quantized(quant_type, nested, dtype, device=device)
    ref = F.dequantize_4bit(packed, qs)
    s2 = qs.state2 if nested else None
    ours = bnb_dequant.dequantize(packed, qs.absmax, qs.code, qs.blocksize, tuple(qs.shape), qs.dtype,
                                  s2.absmax if s2 else None, s2.code if s2 else None, qs.offset if s2 else None)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)


def test_packed_in_a_float_storage_reads_the_same():
    import bitsandbytes.functional as F

    packed, qs = quantized("nf4", True, torch.bfloat16, storage=torch.bfloat16)  # how sharded runs store them
    assert packed.dtype == torch.bfloat16
    s2 = qs.state2
    ours = bnb_dequant.dequantize(packed, qs.absmax, qs.code, 64, tuple(qs.shape), qs.dtype, s2.absmax, s2.code,
                                  qs.offset)
    assert torch.equal(ours, F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_matmul_and_its_gradient_equal_bitsandbytes(nested, device):
    import bitsandbytes as bnb
    from bitsandbytes.nn import Params4bit

    packed, qs = quantized("nf4", nested, torch.float32, device=device)
    weight = Params4bit(packed, requires_grad=False, quant_state=qs, bnb_quantized=True)
    x = torch.randn(3, 5, 320, device=device, requires_grad=True)
    ref = bnb.matmul_4bit(x, weight.t(), quant_state=qs)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    ours = bnb_dequant.matmul_4bit(x, weight)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6) and torch.allclose(g_ours, g_ref, rtol=0, atol=1e-5)


def recipe(out, dequantize, compile_=True):
    from ftk.recipe import load_recipe

    return load_recipe(data={
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4", "dequantize": dequantize}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                 "max_length": 128, "validation_size": 0, "cache": False},
        "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 2e-3, "report_to": ["none"],
                     "precision": "fp32", "compile": compile_},
        "output_dir": str(out),
    })


def test_compiled_training_never_reaches_the_bitsandbytes_op(tmp_path, fresh_manager, monkeypatch):
    from torch._inductor.compile_fx import compile_fx

    ops: list[str] = []

    def recording(gm, example_inputs):  # inductor, after writing down the ops of every graph it compiles
        for m in gm.modules():  # the layer's graph and the subgraphs of autograd functions in it
            if isinstance(m, torch.fx.GraphModule):
                ops.extend(str(n.target) for n in m.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: real_compile(fn, *a, **{**kw, "backend": recording}))

    from torch._dynamo.utils import counters

    def run(name, dequantize):
        ops.clear()
        counters.clear()
        torch._dynamo.reset()
        r = recipe(tmp_path / name, dequantize)
        tok = M.load_tokenizer(r)
        prepared = D.prepare_data(r, tok, fresh_manager)
        model, info = M.load_model(r, fresh_manager, tok)
        metrics = T.train(model, tok, prepared, r, fresh_manager, str(tmp_path / name))
        losses = [json.loads(x)["loss"] for x in (tmp_path / name / T.TRAIN_LOG).read_text().splitlines()
                  if '"loss"' in x]
        assert not counters["graph_break"], dict(counters["graph_break"])  # each layer one whole graph
        return metrics, losses, info, sum("bitsandbytes" in op for op in ops)

    base_metrics, base_losses, _, base_ops = run("bnb", "bitsandbytes")
    metrics, losses, info, n = run("torch", "torch")
    assert base_ops > 0 and n == 0, (base_ops, n)  # bitsandbytes ops in the compiled graphs
    assert metrics["compiled_layers"] == base_metrics["compiled_layers"] > 0
    assert any("dequantize in torch ops" in note for note in info["quantization"]["notes"])
    assert losses == pytest.approx(base_losses, rel=1e-5), (losses, base_losses)


def test_refused_when_nothing_is_compiled(tmp_path, fresh_manager):
    r = recipe(tmp_path / "out", "torch", compile_=False)
    with pytest.raises(FtkError, match="model.quantization.dequantize"):
        M.load_model(r, fresh_manager, M.load_tokenizer(r))


def test_allowed_where_auto_compiles(tmp_path, fresh_manager):
    """The quantizer reads ModelContext.compiled, training.compile resolved for the machine the run
    trains on: "auto" compiles on a CUDA GPU (ftk plan --device cuda), not on this CPU."""
    r = recipe(tmp_path / "out", "torch", compile_="auto")
    config = M._load_config(r["model"])
    gpu, _ = M.model_context(r, fresh_manager, config, cuda=True)
    cpu, _ = M.model_context(r, fresh_manager, config, cuda=False)
    assert (gpu.compiled, cpu.compiled) == (True, False)
    M.quantization_plan(r, fresh_manager, gpu)  # no error
    with pytest.raises(FtkError, match="model.quantization.dequantize"):
        M.quantization_plan(r, fresh_manager, cpu)

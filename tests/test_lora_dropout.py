"""The lora adapter's CPU dropout masks (``dropout_rng: "auto"``, ftk.plugins.lora_dropout): the same
distribution as torch's dropout (its reference here), drawn from numpy's SFC64 seeded by torch's
generator, so a seed (and a resumed run's restored RNG state) gives the same masks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ALPACA, MODEL_DIR
from ftk import model as M
from ftk.plugins.lora_dropout import SampledDropout, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_masks_have_torchs_distribution(p):
    n = 1 << 22
    torch.manual_seed(0)
    ours = keep_mask((n,), p)
    theirs = torch.empty(n).bernoulli_(1 - p).bool()  # what torch's dropout keeps
    sigma = math.sqrt(p * (1 - p) / n)
    for kept in (ours, ours[0::2], ours[1::2], theirs):  # both 32-bit halves of each 64-bit draw
        assert abs(1 - kept.float().mean().item() - p) < 5 * sigma / math.sqrt(len(kept) / n)
    # neighbours independent: P(both kept) = (1 - p)^2
    both = (ours[:-1] & ours[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)


def test_seeded_by_torchs_generator():
    torch.manual_seed(3)
    a = keep_mask((64, 64), 0.3)
    state = torch.get_rng_state()
    b = keep_mask((64, 64), 0.3)
    torch.set_rng_state(state)  # what a resumed run's restored RNG state does
    assert torch.equal(keep_mask((64, 64), 0.3), b) and not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 64), 0.3), a)


def test_forward_and_backward_are_dropouts():
    p = 0.2
    drop = SampledDropout(p)
    x = torch.randn(8, 256, 64, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p))  # kept elements scaled as torch scales them
    assert abs(1 - kept.float().mean().item() - p) < 0.01
    (g,) = torch.autograd.grad((y * 3).sum(), x)
    assert torch.allclose(g, kept.float() * 3 / (1 - p))
    # mean and variance of the output as torch's dropout gives them on the same input
    ref = torch.stack([F.dropout(x.detach(), p, True) for _ in range(8)])
    ours = torch.stack([drop(x.detach()) for _ in range(8)])
    assert abs(ours.mean() - ref.mean()) < 0.01 and abs(ours.var() / ref.var() - 1) < 0.01
    drop.eval()
    assert drop(x) is x
    assert SampledDropout(0.0)(x) is x  # p = 0, as TRL's disable_dropout leaves it


def test_compiled_code_takes_torchs_dropout():
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    drop = SampledDropout(0.1)
    out = torch.compile(lambda x: drop(x) * 2)(torch.ones(4, 16))
    assert not counters["graph_break"]
    assert torch.isclose(out, torch.zeros(())).logical_or(torch.isclose(out, torch.tensor(2 / 0.9))).all()


def _lora_model(manager, **adapter):
    from ftk.recipe import load_recipe

    r = load_recipe(data={"model": {"name": str(MODEL_DIR)},
                          "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], **adapter},
                          "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA)}]},
                          "output_dir": "unused"})
    model, _ = M.load_model(r, manager, M.load_tokenizer(r))
    return [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
            for d in m.lora_dropout.values()]


def test_installed_on_every_lora_layer_unless_asked_for_torchs(fresh_manager, monkeypatch):
    from ftk.plugins import lora_dropout

    monkeypatch.setattr(lora_dropout, "torch_samples_serially", lambda cpu_vendor: True)
    layers = M._load_config({"name": str(MODEL_DIR)}).num_hidden_layers
    drops = _lora_model(fresh_manager, dropout=0.1)
    assert len(drops) == 2 * layers and all(type(d) is SampledDropout and d.p == 0.1 for d in drops)
    assert all(type(d) is torch.nn.Dropout for d in _lora_model(fresh_manager, dropout=0.1, dropout_rng="torch"))
    assert all(type(d) is torch.nn.Identity for d in _lora_model(fresh_manager, dropout=0.0))


def test_left_to_torch_where_torch_samples_in_parallel(fresh_manager, monkeypatch):
    """On Intel CPUs torch's MKL build samples masks with MKL's parallel sampler: auto keeps torch's. The
    vendor comes from ftk's one reading of /proc/cpuinfo, through ModelContext.cpu_vendor."""
    from ftk.plugins import lora_dropout

    mkl = torch.backends.mkl.is_available()
    assert lora_dropout.torch_samples_serially("GenuineIntel") == (not mkl)
    assert lora_dropout.torch_samples_serially("AuthenticAMD") and lora_dropout.torch_samples_serially("")
    real = M.cpu_info()
    assert real["vendor"] is None or real["vendor"] in open("/proc/cpuinfo").read()
    monkeypatch.setattr(M, "cpu_info", lambda: {**real, "vendor": "GenuineIntel"})
    want = torch.nn.Dropout if mkl else SampledDropout
    assert all(type(d) is want for d in _lora_model(fresh_manager, dropout=0.1))

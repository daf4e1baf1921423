"""HetLoraLinear against peft's LoraLayer (peft is the reference, not our code)."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from hetlora import HetLoraLinear

from .helpers import rel_err


class Tiny(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.lin = base

    def forward(self, x):
        return self.lin(x)


def _peft_single(base, r, alpha, use_rslora=False, fan_in_fan_out=False):
    model = get_peft_model(
        Tiny(copy.deepcopy(base)),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out),
    )
    layer = model.base_model.model.lin
    with torch.no_grad():  # a trained-looking adapter: B non-zero
        layer.lora_B["default"].weight.normal_()
    return model, layer


@pytest.mark.parametrize("rule", ["alpha/r", "rslora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_single_adapter_matches_peft(rule, kind):
    d_in, d_out, r, alpha = 13, 11, 5, 7.0
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    if kind == "conv1d":
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    peft_model, peft_layer = _peft_single(base, r, alpha, rule == "rslora", fan_in_fan_out=kind == "conv1d")
    ours = HetLoraLinear(copy.deepcopy(base), [r], alpha, scaling_rule=rule)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight.t())
    assert ours.scaling.item() == pytest.approx(peft_layer.scaling["default"])
    x1 = torch.randn(3, 4, d_in, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    dy = torch.randn(3, 4, d_out)
    y_peft = peft_model(x1)
    y_ours = ours(x2)
    assert rel_err(y_ours, y_peft) < 1e-5
    (y_peft * dy).sum().backward()
    (y_ours * dy).sum().backward()
    assert rel_err(x2.grad, x1.grad) < 1e-5
    assert rel_err(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad) < 1e-5
    assert rel_err(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad.t()) < 1e-5
    assert ours.base_layer.weight.grad is None


def test_default_init_is_peft_init():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    ours = HetLoraLinear(base, [4, 2], 8.0)
    assert torch.all(ours.lora_B == 0)
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert ours.lora_A.abs().max() <= bound and ours.lora_A.std() > bound / 4
    x = torch.randn(5, 16)
    assert torch.allclose(ours(x, adapter_ids=[0, 1, 0, 1, -1]), base(x))


def test_mixed_adapters_match_per_adapter_runs():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    ours = HetLoraLinear(base, [1, 3, 7], [2.0, 4.0, 8.0])
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(8, 5, 10)
    ids = torch.tensor([2, 0, -1, 1, 2, 0, 1, 1])
    y = ours(x, adapter_ids=ids)
    for k in range(3):
        A_k, B_k = ours.get_adapter(k)
        single = HetLoraLinear(copy.deepcopy(base), [A_k.shape[0]], ours.alphas[k])
        single.set_adapters(A_k, B_k, [A_k.shape[0]], [ours.alphas[k]])
        rows = ids == k
        assert rel_err(y[rows], single(x[rows])) < 1e-5
    assert torch.allclose(y[ids == -1], base(x[ids == -1]))


def test_scaling_rules_and_resize():
    base = nn.Linear(4, 4)
    lay = HetLoraLinear(base, [4, 16], 8.0, scaling_rule=["alpha/r", "rslora"])
    assert lay.scaling.tolist() == [2.0, 2.0]
    fixed = HetLoraLinear(base, [4, 16], 0.5, scaling_rule="fixed")
    assert fixed.scaling.tolist() == [0.5, 0.5]
    with torch.no_grad():
        lay.lora_B.normal_()
    A0, B0 = lay.get_adapter(1)
    lay.resize([6, 3])
    assert lay.layout.ranks == (6, 3)
    A1, B1 = lay.get_adapter(1)
    assert torch.equal(A1, A0[:3]) and torch.equal(B1, B0[:3])
    A2, B2 = lay.get_adapter(0)
    assert torch.all(A2[4:] == 0) and torch.all(B2[4:] == 0)
    assert lay.scaling.tolist() == pytest.approx([8 / 6, 8 / math.sqrt(3)])


def test_dropout_is_exact_in_gradients():
    torch.manual_seed(0)
    base = nn.Linear(9, 5)
    lay = HetLoraLinear(base, [3], 6.0, dropout=0.5)
    with torch.no_grad():
        lay.lora_B.normal_()
    x = torch.randn(7, 9)
    torch.manual_seed(42)
    y = lay(x)
    y.sum().backward()
    torch.manual_seed(42)
    mask_x = nn.functional.dropout(x, 0.5, training=True)  # the same mask, drawn the same way
    A, B = lay.lora_A.detach(), lay.lora_B.detach()
    s = 6.0 / 3
    assert torch.allclose(y, base(x) + s * (mask_x @ A.t()) @ B, atol=1e-5)
    dy = torch.ones(7, 5)
    g = s * dy @ B.t()
    assert torch.allclose(lay.lora_A.grad, g.t() @ mask_x, atol=1e-5)  # the dropped x, not x
    lay.eval()
    assert torch.allclose(lay(x), base(x) + s * (x @ A.t()) @ B, atol=1e-5)


def test_layer_bad_input():
    base = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="ranks"):
        HetLoraLinear(base, [2, 0], 1.0)
    with pytest.raises(ValueError, match="alpha"):
        HetLoraLinear(base, [2], math.inf)
    with pytest.raises(ValueError, match="alpha"):
        HetLoraLinear(base, [2, 3], [1.0])
    with pytest.raises(ValueError, match="dropout"):
        HetLoraLinear(base, [2], 1.0, dropout=1.0)
    with pytest.raises(ValueError, match="scaling_rule"):
        HetLoraLinear(base, [2], 1.0, scaling_rule="alpha/r^2")
    with pytest.raises(TypeError, match="base_linear"):
        HetLoraLinear(nn.Conv2d(1, 1, 1), [2], 1.0)
    lay = HetLoraLinear(base, [2, 1], 1.0)
    with pytest.raises(ValueError, match="adapter_ids"):
        lay(torch.randn(2, 4))
    with pytest.raises(ValueError, match="adapter_ids"):
        lay(torch.randn(2, 4), adapter_ids=[0, 2])
    with pytest.raises(ValueError, match="adapter_ids"):
        lay(torch.randn(2, 4), adapter_ids=[0, 1, 1])
    with pytest.raises(ValueError, match="d_in"):
        lay(torch.randn(2, 5), adapter_ids=[0, 1])


def test_set_adapters_checks_everything_before_it_writes():
    torch.manual_seed(7)
    lay = HetLoraLinear(nn.Linear(5, 4), [2, 1], [1.0, 2.0])
    with torch.no_grad():
        lay.lora_B.normal_()
    x = torch.randn(3, 5)
    want = lay(x, adapter_ids=[0, 1, 0])
    snap = (lay.lora_A.detach().clone(), lay.lora_B.detach().clone(), lay.scaling.clone(), lay.layout.ranks)
    bad = [
        (dict(A=torch.zeros(3, 5), B=torch.zeros(3, 5), ranks=[2, 1]), "B must be"),
        (dict(A=torch.zeros(4, 5), B=torch.zeros(3, 4), ranks=[2, 1]), "A must be"),
        (dict(A=torch.zeros(3, 6), B=torch.zeros(3, 4), ranks=[2, 1]), "A must be"),
        (dict(A=torch.zeros(5, 5), B=torch.zeros(5, 4), ranks=[2, 3], alphas=[1.0, math.nan]), "alphas"),
        (dict(A=torch.zeros(5, 5), B=torch.zeros(5, 4), ranks=[2, 3], alphas=[1.0]), "alphas"),
        (dict(A=torch.zeros(5, 5), B=torch.zeros(5, 4), ranks=[2, 2, 1]), "alphas must be given"),
        (dict(A=torch.zeros(3, 5), B=torch.zeros(3, 4), ranks=[2, 1], scaling_rules=["alpha/r", "sqrt"]),
         "scaling_rules"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            lay.set_adapters(**kw)
        assert torch.equal(lay.lora_A, snap[0]) and torch.equal(lay.lora_B, snap[1])
        assert torch.equal(lay.scaling, snap[2]) and lay.layout.ranks == snap[3]
    assert torch.equal(lay(x, adapter_ids=[0, 1, 0]), want)

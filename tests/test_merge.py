"""MultiLoraModel.merge_and_unload / unload and HetLoraLinear.delta_weight: against peft's own
merge_and_unload, a float64 ``W + s Bᵀ A``, and the unmerged model's outputs."""

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from hetlora import HetLoraLinear, MultiLoraModel

from .helpers import rel_err
from .test_model import _randomise_lora, tiny_bert, tiny_gpt2


def _f64_merged(layer: HetLoraLinear, k: int) -> torch.Tensor:
    """``W + s_k B_kᵀ A_k`` in float64, in nn.Linear's ``[d_out, d_in]`` orientation."""
    rows = layer.layout.rows(k)
    A = layer.lora_A.detach()[rows].double()
    B = layer.lora_B.detach()[rows].double()
    W = layer.base_layer.weight.detach().double()
    W = W.t() if layer.fan_in_fan_out else W
    return W + float(layer.scaling[k]) * (B.t() @ A)


def _bert_mlm(ranks=(3, 5, 2), alphas=(6.0, 2.5, 4.0), rule="alpha/r", seed=1):
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "key", "value", "dense"], list(ranks), alpha=list(alphas),
                         scaling_rule=rule)
    _randomise_lora(mlm, seed=seed)
    return base, mlm


@pytest.mark.parametrize("rule", ["alpha/r", "rslora", "fixed"])
def test_merge_and_unload_matches_peft_and_float64(tmp_path, rule):
    base, mlm = _bert_mlm(rule=rule)
    for k in range(mlm.num_adapters):
        ref64 = {name: _f64_merged(layer, k) for name, layer in mlm.lora_layers()}
        path = mlm.export_peft(k, tmp_path / f"a{k}")
        ref = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).merge_and_unload().state_dict()
        merged = copy.deepcopy(mlm).merge_and_unload(k)
        assert type(merged) is type(base)
        ours = merged.state_dict()
        assert sorted(ours) == sorted(ref) == sorted(base.state_dict())
        for key, v in ours.items():
            torch.testing.assert_close(v, ref[key], rtol=2e-6, atol=2e-7, msg=lambda m, key=key: f"{key}: {m}")
        for name, w64 in ref64.items():
            w = ours[f"{name}.weight"]
            assert rel_err(w, w64) < 1e-7, name
            # the merge changed the weight (the adapters are not zero) and nothing else
            assert not torch.equal(w, base.state_dict()[f"{name}.weight"])
        untouched = [key for key in ours if not any(key.startswith(n + ".weight") for n in ref64)]
        for key in untouched:
            assert torch.equal(ours[key], base.state_dict()[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_merged_model_computes_what_the_adapter_did(dtype):
    _, mlm = _bert_mlm()
    mlm = mlm.to(dtype)
    ids = torch.randint(0, 101, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    for k in range(mlm.num_adapters):
        want = mlm(input_ids=ids, attention_mask=mask, adapter_ids=k).logits
        merged = copy.deepcopy(mlm).merge_and_unload(k)
        assert not any(isinstance(m, HetLoraLinear) for m in merged.modules())
        got = merged(input_ids=ids, attention_mask=mask).logits
        assert got.dtype == dtype
        assert rel_err(got, want) < tol, k


def test_merge_into_a_gpt2_conv1d_keeps_its_orientation():
    base = tiny_gpt2()
    mlm = MultiLoraModel(copy.deepcopy(base), ["c_attn", "c_proj"], [4, 1], alpha=[3.0, 0.5])
    _randomise_lora(mlm, seed=3)
    ids = torch.randint(0, 97, (3, 7))
    for k in range(2):
        ref64 = {name: _f64_merged(layer, k) for name, layer in mlm.lora_layers()}
        assert any(layer.fan_in_fan_out for _, layer in mlm.lora_layers())
        want = mlm(input_ids=ids, adapter_ids=k).logits
        merged = copy.deepcopy(mlm).merge_and_unload(k)
        for name, w64 in ref64.items():
            mod = merged.get_submodule(name)
            assert type(mod).__name__ in ("Conv1D", "Linear")
            w = mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight
            assert rel_err(w, w64) < 1e-7, name
        assert rel_err(merged(input_ids=ids).logits, want) < 1e-5


def test_unload_gives_back_the_original_model_bitwise():
    base, mlm = _bert_mlm()
    ids = torch.randint(0, 101, (4, 6))
    want = base(input_ids=ids).logits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plain = mlm.unload()
    assert not any(isinstance(m, HetLoraLinear) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(before)
    for key, v in plain.state_dict().items():
        assert torch.equal(v, before[key]), key
    assert torch.equal(plain(input_ids=ids).logits, want)


def test_a_consumed_model_refuses_further_use():
    _, mlm = _bert_mlm()
    mlm.merge_and_unload(1)
    ids = torch.randint(0, 101, (2, 5))
    for call in (lambda: mlm(input_ids=ids, adapter_ids=0), lambda: mlm.add_adapter(2), lambda: mlm.ranks,
                 lambda: mlm.unload(), lambda: mlm.merge_and_unload(0), lambda: list(mlm.lora_parameters())):
        with pytest.raises(RuntimeError, match="unloaded"):
            call()


def test_bad_adapter_index_is_refused_before_any_change():
    _, mlm = _bert_mlm()
    state = {k: v.clone() for k, v in mlm.state_dict().items()}
    with pytest.raises(ValueError, match=r"k must lie in \[0, 2\], got 3"):
        mlm.merge_and_unload(3)
    with pytest.raises(ValueError, match="got -1"):
        mlm.merge_and_unload(-1)
    with pytest.raises(TypeError, match="k must be an int"):
        mlm.merge_and_unload(True)
    with pytest.raises(ValueError, match="k must be an adapter index"):
        next(layer for _, layer in mlm.lora_layers()).delta_weight(5)
    assert all(torch.equal(v, state[k]) for k, v in mlm.state_dict().items())
    assert all(isinstance(layer, HetLoraLinear) for _, layer in mlm.lora_layers())


def test_a_tied_weight_is_refused_and_the_model_left_as_it_was():
    base = tiny_gpt2()  # lm_head.weight is transformer.wte.weight
    assert base.lm_head.weight is base.transformer.wte.weight
    mlm = MultiLoraModel(copy.deepcopy(base), ["c_attn", "lm_head"], [2, 3], alpha=2.0)
    _randomise_lora(mlm, seed=5)
    ids = torch.randint(0, 97, (2, 6))
    want = mlm(input_ids=ids, adapter_ids=torch.tensor([0, 1])).logits
    state = {k: v.clone() for k, v in mlm.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head.*tied to \['transformer\.wte\.weight'\]"):
        mlm.merge_and_unload(1)
    assert all(torch.equal(v, state[k]) for k, v in mlm.state_dict().items())
    assert torch.equal(mlm(input_ids=ids, adapter_ids=torch.tensor([0, 1])).logits, want)
    # unmerged unloading touches no weight, so it is allowed
    plain = mlm.unload()
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert torch.equal(plain(input_ids=ids).logits, base(input_ids=ids).logits)


def test_delta_weight_is_float32_for_half_factors_and_orientation_is_linear():
    lin = nn.Linear(11, 7).to(torch.bfloat16)
    layer = HetLoraLinear(lin, [3, 2], alpha=[4.0, 1.0])
    with torch.no_grad():
        layer.lora_B.normal_()
    for k in range(2):
        d = layer.delta_weight(k)
        assert d.shape == (7, 11) and d.dtype == torch.float32 and not d.requires_grad
        rows = layer.layout.rows(k)
        ref = float(layer.scaling[k]) * layer.lora_B.detach()[rows].double().t() @ layer.lora_A.detach()[rows].double()
        assert rel_err(d, ref) < 1e-6

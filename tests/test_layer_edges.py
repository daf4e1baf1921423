"""The layer API at its edges: slot indices, hooks on the wrapped layer, dtype casts, peft files
with bad or unsupported settings, modules_to_save that cannot be saved apart, torn exports.
Each case is one a user can reach, and each must give peft's answer or a clear error, never a
silently different model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from hetlora import HetLoraLinear, MultiLoraModel

from .helpers import rel_err
from .test_model import _saved_peft, tiny_bert, tiny_gpt2


def _ids(n: int = 2, seq: int = 7, vocab: int = 90, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _randomise(mlm: MultiLoraModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_negative_slot_indices_are_refused_everywhere():
    layer = HetLoraLinear(nn.Linear(6, 5), [2, 3], alpha=4.0)
    before = (layer.lora_A.detach().clone(), layer.ranks)
    for call in (lambda: layer.get_adapter(-1), lambda: layer.reset_adapter(-1),
                 lambda: layer.load_adapter(-1, torch.zeros(4, 6), torch.zeros(4, 5)),
                 lambda: layer.load_adapter(2, torch.zeros(4, 6), torch.zeros(4, 5)),
                 lambda: layer.delta_weight(-1)):
        with pytest.raises(ValueError, match=r"k must be an adapter index in \[0, 1\]"):
            call()
    assert torch.equal(layer.lora_A, before[0]) and layer.ranks == before[1]
    mlm = MultiLoraModel(tiny_bert(), ["query"], [2, 3])
    with pytest.raises(ValueError, match="k must lie in"):
        mlm.adapter_state(-1)


def test_load_adapter_checks_alpha_and_rule_before_writing():
    layer = HetLoraLinear(nn.Linear(6, 5), [2, 3], alpha=4.0)
    for kw, match in ((dict(scaling_rule="bogus"), "scaling_rule must be one of"),
                      (dict(alpha=float("nan")), "alpha must be a finite positive number"),
                      (dict(alpha=True), "alpha must be"), (dict(alpha="16"), "alpha must be")):
        with pytest.raises(ValueError, match=match):
            layer.load_adapter(1, torch.ones(4, 6), torch.ones(4, 5), **kw)
        assert layer.ranks == (2, 3) and layer.scaling_rules == ["alpha/r", "alpha/r"] and layer.alphas == [4.0, 4.0]


@pytest.mark.parametrize("alpha", [[4, 4], None, "16", float("nan"), 0, True])
def test_a_peft_file_with_a_bad_lora_alpha_is_refused_before_anything_is_written(tmp_path, alpha):
    base = tiny_bert()
    good = _saved_peft(base, tmp_path / "good", 1, r=2, target_modules=["query", "value"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((good / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": alpha}))
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [3, 3], alpha=1.0)
    before = {n: p.detach().clone() for n, p in mlm.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="lora_alpha"):
        mlm.import_peft(1, bad)
    assert mlm.ranks == (3, 3)
    assert all(layer.ranks == (3, 3) and layer.alphas == [1.0, 1.0] for _, layer in mlm.lora_layers())
    assert all(torch.equal(p, before[n]) for n, p in mlm.named_parameters() if "lora_" in n)


def test_hooks_on_the_wrapped_linear_run_as_in_peft():
    """A forward hook on the target nn.Linear is called and its change to the output kept, as in
    peft; the fused path (the wrapped module never called) is only taken without hooks."""
    base = tiny_bert()
    ids = _ids()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"]))
    mlm = MultiLoraModel(copy.deepcopy(base), ["query"], [2])
    calls = {"peft": 0, "hetlora": 0}

    def hook(tag):
        def fn(mod, args, out):
            calls[tag] += 1
            return out * 0.5
        return fn

    peft_model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.register_forward_hook(
        hook("peft"))
    handle = mlm.model.bert.encoder.layer[0].attention.self.query.base_layer.register_forward_hook(hook("hetlora"))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = mlm(input_ids=ids, adapter_ids=torch.zeros(2, dtype=torch.int64)).logits
    assert calls == {"peft": 1, "hetlora": 1}
    assert rel_err(got, want) < 1e-6
    handle.remove()
    with torch.no_grad():
        plain = mlm(input_ids=ids, adapter_ids=torch.zeros(2, dtype=torch.int64)).logits
    assert calls["hetlora"] == 1 and rel_err(plain, base(input_ids=ids).logits) < 1e-6  # B = 0: the base model


def test_a_cast_to_bf16_keeps_the_scalings_and_a_saved_state_dict_the_alphas():
    """``.to(bfloat16)`` would round the scalings buffer (16/3 -> 5.34375): a state dict saved from it
    would load other alphas into a float32 model built with the same ones."""
    def make():
        return MultiLoraModel(tiny_bert(), ["query", "value"], [3, 6], alpha=[16.0, 10.0])

    a = make().to(torch.bfloat16)
    for _, layer in a.lora_layers():
        assert layer.scaling.dtype == torch.float32
        assert torch.equal(layer.scaling, torch.tensor([16 / 3, 10 / 6], dtype=torch.float32))
    b = make()
    b.load_state_dict({k: v.float() for k, v in a.state_dict().items()})
    assert all(layer.alphas == [16.0, 10.0] for _, layer in b.lora_layers())


def test_target_modules_that_match_other_than_linear_layers_are_refused():
    for targets in (["query", "word_embeddings"], ["query", "attention"]):
        with pytest.raises(ValueError, match="adapts nn.Linear and Conv1D layers only"):
            MultiLoraModel(tiny_bert(), targets, [2])


def test_add_adapter_on_a_model_with_one_rule_per_adapter_needs_a_rule():
    mlm = MultiLoraModel(tiny_bert(), ["query"], [2, 3], scaling_rule=["alpha/r", "rslora"])
    with pytest.raises(ValueError, match="scaling_rule is required"):
        mlm.add_adapter(4, alpha=2.0)
    assert mlm.add_adapter(4, alpha=2.0, scaling_rule="rslora") == 2


def test_modules_to_save_that_are_tied_or_adapted_are_refused():
    """GPT-2's lm_head is its input embedding (training it would change the embedding, which the
    export leaves out); a saved module holding an adapted layer would train its base weight."""
    with pytest.raises(ValueError, match="tied"):
        MultiLoraModel(tiny_gpt2(), ["c_attn"], [2], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="holds the adapted layer"):
        MultiLoraModel(tiny_bert(), ["dense"], [2], modules_to_save=["pooler", "classifier"])


def test_a_classifier_export_whose_saved_modules_leave_the_head_out_loads_in_peft(tmp_path):
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2, 3], modules_to_save=["pooler"])
    _randomise(mlm)
    out = mlm.export_peft(1, tmp_path / "a")
    assert json.loads((out / "adapter_config.json").read_text()).get("task_type") is None
    ids = _ids()
    with torch.no_grad():
        want = mlm(input_ids=ids, adapter_ids=torch.ones(2, dtype=torch.int64)).logits
        got = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()(input_ids=ids).logits
    assert rel_err(got, want) < 1e-6


def test_an_export_that_fails_half_way_leaves_no_config_of_the_earlier_one(tmp_path, monkeypatch):
    """Re-exporting over an earlier export: should the config write fail, the directory must not
    pair the new weights with the old config (peft would load that without a word)."""
    from hetlora import peft_io

    mlm = MultiLoraModel(tiny_bert(), ["query"], [4, 4], alpha=[8.0, 2.0])
    _randomise(mlm)
    out = mlm.export_peft(0, tmp_path / "a")
    real = peft_io.atomic_write

    def failing(path, write):
        if path.name == peft_io.CONFIG_NAME:
            raise OSError("no space left on device")
        return real(path, write)

    monkeypatch.setattr(peft_io, "atomic_write", failing)
    with pytest.raises(OSError):
        mlm.export_peft(1, out)
    assert not (out / peft_io.CONFIG_NAME).exists()


def test_importing_saved_modules_into_a_shared_model_warns(tmp_path):
    base = tiny_bert()
    src = MultiLoraModel(copy.deepcopy(base), ["query"], [2], modules_to_save=["classifier"])
    _randomise(src)
    path = src.export_peft(0, tmp_path / "a")
    mlm = MultiLoraModel(copy.deepcopy(base), ["query"], [2, 2], modules_to_save=["classifier"])
    with pytest.warns(UserWarning, match="all 2 adapters share"):
        mlm.import_peft(1, path)


@pytest.mark.parametrize("field, value, match", [
    ("use_bdlora", True, "BD-LoRA"), ("kasa_config", {}, "KaSA"), ("monteclora_config", {}, "MonteCLoRA"),
    ("velora_config", {}, "VeLoRA"), ("lora_ga_config", {}, "LoRA-GA"), ("init_lora_weights", "lora_ga", "rewrites"),
])
def test_newer_peft_variants_are_refused_by_name(tmp_path, field, value, match):
    base = tiny_bert()
    good = _saved_peft(base, tmp_path / "good", 1, r=2, target_modules=["query"])
    cfg = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=match):
        MultiLoraModel.from_peft(copy.deepcopy(base), [good])


def test_a_state_dict_loads_only_into_the_ranks_it_was_saved_with():
    """The packed weights of ranks (2, 3) fit a model of ranks (3, 2) shape for shape: without the
    ranks in the state dict the load would succeed and compute another model."""
    a = MultiLoraModel(tiny_bert(), ["query"], [2, 3])
    _randomise(a)
    with pytest.raises(ValueError, match=r"ranks \[2, 3\], this layer ranks \[3, 2\]"):
        MultiLoraModel(tiny_bert(), ["query"], [3, 2]).load_state_dict(a.state_dict())
    same = MultiLoraModel(tiny_bert(), ["query"], [2, 3])
    same.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(same.lora_parameters(), a.lora_parameters()))
    # a state dict saved before the ranks were kept still loads (strict), unchecked
    old = {k: v for k, v in a.state_dict().items() if not k.endswith("lora_ranks")}
    MultiLoraModel(tiny_bert(), ["query"], [2, 3]).load_state_dict(old)

"""peft adapters that are not plain LoRA over the unchanged base (PiSSA/OLoRA, aLoRA, LoRA biases,
DoRA, embedding LoRA) are refused, never served wrong; adapters that cover fewer layers than the
served model are served, as peft serves them; nothing a file carries is silently dropped."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from hetlora import HetLoraLinear, MultiLoraModel

from .helpers import rel_err
from .test_model import _saved_peft, tiny_bert


def _with_config(src, dst, **changes):
    """A copy of the peft directory ``src`` whose adapter_config.json has ``changes``."""
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def _lora_state(mlm):
    return {n: p.detach().clone() for n, p in mlm.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("changes, match", [
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
    ({"init_lora_weights": "olora"}, "rewrites the base weights"),
    ({"init_lora_weights": "corda"}, "rewrites the base weights"),
    ({"init_lora_weights": "loftq"}, "rewrites the base weights"),
    ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"bias": "all"}, "base layers' biases"),
    ({"use_dora": True}, "DoRA"),
])
def test_adapters_peft_serves_over_another_base_or_on_some_tokens_are_refused(tmp_path, changes, match):
    base = tiny_bert()
    good = _saved_peft(base, tmp_path / "good", 1, r=2, target_modules=["query", "value"])
    bad = _with_config(good, tmp_path / "bad", **changes)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        MultiLoraModel.from_peft(model, [good, bad])
    assert not any(isinstance(m, HetLoraLinear) for m in model.modules())  # nothing injected
    served = MultiLoraModel.from_peft(copy.deepcopy(base), [good])
    before = _lora_state(served)
    with pytest.raises(ValueError, match=match):
        served.add_peft(bad)
    with pytest.raises(ValueError, match=match):
        served.import_peft(0, bad)
    assert served.ranks == (2,) and all(torch.equal(p, before[n]) for n, p in _lora_state(served).items())


@pytest.mark.parametrize("cfg, match", [
    (dict(lora_bias=True), "lora_bias"),  # config first; the tensor check names it too (below)
    (dict(use_dora=True), "DoRA"),
])
def test_real_peft_variants_are_refused_with_their_own_reason(tmp_path, cfg, match):
    base = tiny_bert()
    path = _saved_peft(base, tmp_path / "v", 2, r=2, target_modules=["query", "value"], **cfg)
    with pytest.raises(ValueError, match=match):
        MultiLoraModel.from_peft(copy.deepcopy(base), [path])
    # with the flag gone from the config, the extra tensors themselves are refused, not dropped
    flagless = _with_config(path, tmp_path / "flagless", lora_bias=False, use_dora=False)
    served = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2])
    with pytest.raises(ValueError, match="hetlora refuses the adapter rather than drop it"):
        served.import_peft(0, flagless)
    with pytest.raises(ValueError, match="hetlora refuses the adapter rather than drop it"):
        MultiLoraModel.from_peft(copy.deepcopy(base), [flagless])


def test_an_adapter_of_fewer_layers_is_served_and_one_of_other_layers_is_refused(tmp_path):
    base = tiny_bert()
    qv = _saved_peft(base, tmp_path / "qv", 1, r=3, lora_alpha=6, target_modules=["query", "value"])
    q = _saved_peft(base, tmp_path / "q", 2, r=2, lora_alpha=4, target_modules=["query"])
    qk = _saved_peft(base, tmp_path / "qk", 3, r=2, target_modules=["query", "key"])
    served = MultiLoraModel.from_peft(copy.deepcopy(base), [qv])
    k = served.add_peft(q)  # leaves value alone: a zero adapter there, as peft
    ids = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(4))
    ref = PeftModel.from_pretrained(copy.deepcopy(base), q).eval()(input_ids=ids).logits
    got = served(input_ids=ids, adapter_ids=torch.full((4,), k)).logits
    assert rel_err(got, ref) < 1e-5 and rel_err(ref, base(input_ids=ids).logits) > 1e-3
    with pytest.raises(ValueError, match="leaves out layers this model adapts"):
        served.add_peft(q, strict=True)
    for strict in (False, True):  # key is not adapted here: never dropped, strict or not
        with pytest.raises(ValueError, match="adapts layers this model does not adapt"):
            served.add_peft(qk, strict=strict)
    assert served.ranks == (3, 2)


def test_position_ids_before_input_ids_do_not_size_the_batch(tmp_path):
    base = tiny_bert()
    path = _saved_peft(base, tmp_path / "a", 1, r=2, target_modules=["query"])
    served = MultiLoraModel.from_peft(copy.deepcopy(base), [path])
    ids = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(5)[None]  # [1, L]: broadcast over the batch by the model
    want = served(input_ids=ids, position_ids=pos, adapter_ids=torch.tensor([0, -1, 0])).logits
    got = served(position_ids=pos, input_ids=ids, adapter_ids=torch.tensor([0, -1, 0])).logits
    assert torch.equal(got, want)


def test_the_wrapped_models_attributes_are_reachable_but_not_its_save(tmp_path):
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query"], [2, 3])
    assert mlm.config is mlm.model.config and mlm.device == torch.device("cpu") and mlm.dtype == torch.float32
    with pytest.raises(AttributeError, match="export_peft"):
        mlm.save_pretrained(tmp_path / "x")
    with pytest.raises(AttributeError):
        mlm.no_such_attribute  # noqa: B018
    mlm.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        mlm.config  # noqa: B018


@pytest.mark.parametrize("bad", ["0", 1.0, True, torch.tensor([0, 1], dtype=torch.uint8),
                                 torch.tensor([0.0, 1.0]), [[0], [1]], [0, "a"]])
def test_adapter_ids_of_the_wrong_kind_are_refused_naming_them(bad):
    mlm = MultiLoraModel(tiny_bert(), ["query"], [2, 3])
    ids = torch.randint(0, 101, (2, 5))
    with pytest.raises((TypeError, ValueError), match="adapter_ids"):
        mlm(input_ids=ids, adapter_ids=bad)

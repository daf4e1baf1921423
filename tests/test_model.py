"""MultiLoraModel: injection into transformers models, mixed batches, peft export/import."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hetlora import HetLoraLinear, MultiLoraModel

from .helpers import rel_err


def tiny_bert(num_labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def _randomise_lora(mlm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_injection_freezes_base_and_matches_peft_names():
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2, 5], alpha=4.0)
    names = mlm.lora_module_names
    assert names == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    trainable = [n for n, p in mlm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(isinstance(m, HetLoraLinear) for _, m in mlm.lora_layers())
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query", "value"]))
    peft_names = sorted(n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert peft_names == sorted(names)


def test_mixed_batch_equals_peft_per_adapter():
    base = tiny_bert()
    ranks, alphas = [1, 3, 7], [2.0, 6.0, 3.5]
    mlm = MultiLoraModel(
        copy.deepcopy(base), ["query", "key", "value", "dense"], ranks, alpha=alphas, modules_to_save=None
    )
    _randomise_lora(mlm)
    ids = torch.randint(0, 101, (7, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    adapter_ids = torch.tensor([2, 0, 1, 1, -1, 2, 0])
    out = mlm(input_ids=ids, attention_mask=mask, adapter_ids=adapter_ids).logits
    peft_model = None
    for k, r in enumerate(ranks):
        cfg = LoraConfig(r=r, lora_alpha=alphas[k], target_modules=["query", "key", "value", "dense"])
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=f"a{k}")
        else:
            peft_model.add_adapter(f"a{k}", cfg)
        state = mlm.adapter_state(k)
        with torch.no_grad():
            for name, (A_k, B_k) in state.items():
                mod = peft_model.base_model.model.get_submodule(name)
                mod.lora_A[f"a{k}"].weight.copy_(A_k)
                mod.lora_B[f"a{k}"].weight.copy_(B_k.t())
    peft_model.eval()
    for k in range(3):
        peft_model.set_adapter(f"a{k}")
        rows = adapter_ids == k
        ref = peft_model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        assert rel_err(out[rows], ref) < 1e-5
    rows = adapter_ids == -1
    assert rel_err(out[rows], base(input_ids=ids[rows], attention_mask=mask[rows]).logits) < 1e-6


def test_export_peft_loads_in_peft_with_same_logits(tmp_path):
    base = tiny_bert()
    mlm = MultiLoraModel(
        copy.deepcopy(base), ["query", "value"], [4, 2], alpha=[8.0, 3.0], modules_to_save=["classifier"]
    )
    _randomise_lora(mlm)
    with torch.no_grad():
        mlm.model.classifier.weight.normal_()
    ids = torch.randint(0, 101, (3, 8))
    for k in range(2):
        out = mlm(input_ids=ids, adapter_ids=k).logits
        path = mlm.export_peft(k, tmp_path / f"a{k}")
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["r"] == mlm.ranks[k] and cfg["lora_alpha"] == mlm.alphas[k] and cfg["peft_type"] == "LORA"
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
        assert rel_err(loaded(input_ids=ids).logits, out) < 1e-5


def test_export_of_a_classifier_without_modules_to_save_loads_in_peft(tmp_path):
    # peft's SEQ_CLS wrapper would demand the (frozen, unsaved) head's weights from the file
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [3, 2], alpha=5.0)
    _randomise_lora(mlm)
    ids = torch.randint(0, 101, (3, 8))
    for k in range(2):
        path = mlm.export_peft(k, tmp_path / f"a{k}")
        assert json.loads((path / "adapter_config.json").read_text())["task_type"] is None
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
        assert rel_err(loaded(input_ids=ids).logits, mlm(input_ids=ids, adapter_ids=k).logits) < 1e-5


@pytest.mark.parametrize("rule", ["fixed", "rslora"])
def test_export_scaling_rules_roundtrip_through_peft(tmp_path, rule):
    base = tiny_gpt2()
    mlm = MultiLoraModel(copy.deepcopy(base), ["c_attn"], [3], alpha=0.7, scaling_rule=rule)
    _randomise_lora(mlm)
    ids = torch.randint(0, 97, (2, 6))
    out = mlm(input_ids=ids).logits
    path = mlm.export_peft(0, tmp_path / "g")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert rel_err(loaded(input_ids=ids).logits, out) < 1e-5


def test_import_peft_trained_adapter(tmp_path):
    base = tiny_bert()
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=6, lora_alpha=12, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 101, (4, 8))
    for _ in range(3):  # train a little so B and the head are not at their init
        loss = peft_model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.save_pretrained(tmp_path / "p")
    peft_model.eval()
    want = peft_model(input_ids=ids).logits
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2, 3], alpha=1.0, modules_to_save=["classifier"])
    mlm.import_peft(1, tmp_path / "p")
    assert mlm.ranks == (2, 6) and mlm.alphas[1] == 12
    got = mlm(input_ids=ids, adapter_ids=1).logits
    assert rel_err(got, want) < 1e-5


def test_import_rejects_pickles_and_mismatches(tmp_path):
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query"], [2], alpha=1.0)
    d = tmp_path / "bin_only"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="unpickle"):
        mlm.import_peft(0, d)
    other = MultiLoraModel(copy.deepcopy(base), ["key"], [2], alpha=1.0)
    other.export_peft(0, tmp_path / "k")
    before = [p.clone() for p in mlm.lora_parameters()]
    with pytest.raises(ValueError, match="adapts layers this model does not adapt"):
        mlm.import_peft(0, tmp_path / "k")
    assert all(torch.equal(a, b) for a, b in zip(before, mlm.lora_parameters()))  # nothing half-loaded
    with pytest.raises(ValueError, match="k must"):
        mlm.export_peft(3, tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        mlm.import_peft(0, tmp_path / "missing")


def test_model_bad_input():
    base = tiny_bert()
    with pytest.raises(ValueError, match="target_modules"):
        MultiLoraModel(copy.deepcopy(base), ["nope"], [2])
    with pytest.raises(ValueError, match="ranks"):
        MultiLoraModel(copy.deepcopy(base), ["query"], [2, -1])
    mlm = MultiLoraModel(copy.deepcopy(base), ["query"], [2, 3])
    ids = torch.randint(0, 101, (2, 5))
    with pytest.raises(ValueError, match="adapter_ids"):
        mlm(input_ids=ids)
    with pytest.raises(ValueError, match="adapter_ids"):
        mlm(input_ids=ids, adapter_ids=[0, 5])
    with pytest.raises(ValueError, match="adapter_ids"):
        mlm(input_ids=ids, adapter_ids=[0, 1, 1])


def test_set_ranks_and_training_step_only_moves_lora():
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [3, 5], alpha=2.0)
    mlm.set_ranks([2, 6])
    assert mlm.ranks == (2, 6)
    assert all(layer.layout.ranks == (2, 6) for _, layer in mlm.lora_layers())
    opt = torch.optim.SGD(mlm.lora_parameters(), lr=0.1)
    ids = torch.randint(0, 101, (4, 6))
    loss = mlm(input_ids=ids, adapter_ids=[0, 1, 1, 0], labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    opt.step()
    after = {n.replace(".base_layer", ""): p for n, p in mlm.model.named_parameters() if "lora_" not in n}
    before = dict(base.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    # at peft's init B = 0, so only B receives gradient on the first step (dA = s (dy B^T)^T x = 0)
    for _, layer in mlm.lora_layers():
        assert layer.lora_B.grad.abs().sum() > 0 and layer.lora_B.abs().sum() > 0
        assert torch.all(layer.lora_A.grad == 0)


def test_state_dict_into_a_model_with_other_alphas_is_the_same_model(tmp_path):
    """load_state_dict brings the saved scalings along: forward and export_peft follow them
    (they read host copies, which a loaded buffer alone would not have changed)."""
    from hetlora.fl.sim import tiny_bert

    torch.manual_seed(0)
    m1 = MultiLoraModel(tiny_bert(0), ["query", "value"], [2, 4, 3], alpha=[16.0, 4.0, 7.0],
                        scaling_rule=["alpha/r", "rslora", "fixed"])
    for p in m1.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    m2 = MultiLoraModel(tiny_bert(0), ["query", "value"], [2, 4, 3], alpha=8.0,
                        scaling_rule=["alpha/r", "rslora", "fixed"])
    m2.load_state_dict(m1.state_dict())
    ids = torch.randint(4, 60, (3, 9))
    aid = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = m1(input_ids=ids, adapter_ids=aid).last_hidden_state
        b = m2(input_ids=ids, adapter_ids=aid).last_hidden_state
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    layer1, layer2 = next(m1.lora_layers())[1], next(m2.lora_layers())[1]
    assert layer2.alphas == pytest.approx(layer1.alphas, rel=1e-6)
    # a state dict of the same alphas changes nothing (the exact host scalings stay)
    host = list(layer1._scaling_host)
    m1.load_state_dict(m1.state_dict())
    assert layer1._scaling_host == host


def test_deepcopy_and_torch_save_of_a_model(tmp_path):
    """copy.deepcopy and torch.save/torch.load of a MultiLoraModel give the same model (its
    layouts are immutable; copying them used to fail)."""
    import copy

    from hetlora.fl.sim import tiny_bert

    torch.manual_seed(0)
    m = MultiLoraModel(tiny_bert(0), ["query", "value"], [2, 5], alpha=[16.0, 4.0])
    for p in m.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.save(m, tmp_path / "m.pt")
    ids, aid = torch.randint(4, 60, (2, 9)), torch.tensor([1, 0])
    with torch.no_grad():
        ref = m(input_ids=ids, adapter_ids=aid).last_hidden_state
        for other in (copy.deepcopy(m), torch.load(tmp_path / "m.pt", weights_only=False)):
            assert torch.equal(other(input_ids=ids, adapter_ids=aid).last_hidden_state, ref)


def test_the_same_adapter_ids_tensor_reuses_its_token_groups(monkeypatch):
    """A loop passing one unmodified ids tensor builds its TokenGroups once (the build reads the
    ids back to the host: a device sync per forward on a GPU); an in-place change, a new tensor,
    or a new input shape builds again, and every forward gives the uncached model's output."""
    import hetlora.layer as layer_mod

    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [1, 3, 7], alpha=2.0, modules_to_save=None)
    _randomise_lora(mlm)
    builds = []
    real = layer_mod.TokenGroups.from_adapter_ids
    def counted(ids, K):
        builds.append(ids.clone())
        return real(ids, K)

    monkeypatch.setattr(layer_mod.TokenGroups, "from_adapter_ids", staticmethod(counted))
    ids = torch.randint(0, 101, (5, 6))
    aid = torch.tensor([2, 0, 1, -1, 2])
    with torch.no_grad():
        y1 = mlm(input_ids=ids, adapter_ids=aid).logits
        y2 = mlm(input_ids=ids, adapter_ids=aid).logits
        assert len(builds) == 1 and torch.equal(y1, y2)  # one build for every layer and both calls
        aid[1] = 2  # in place: the version counter moves
        y3 = mlm(input_ids=ids, adapter_ids=aid).logits
        assert len(builds) == 2 and torch.equal(builds[-1], aid.repeat_interleave(6))
        m2 = copy.deepcopy(mlm)
        m2.routing._memo = None
        assert torch.equal(y3, m2(input_ids=ids, adapter_ids=aid.clone()).logits) and not torch.equal(y3, y1)
        assert len(builds) == 3
        mlm(input_ids=ids, adapter_ids=aid.clone())  # equal values, another tensor: built again
        assert len(builds) == 4
        shorter = ids[:, :4]
        mlm(input_ids=shorter, adapter_ids=aid)
        mlm(input_ids=shorter, adapter_ids=aid)
        assert len(builds) == 5 and torch.equal(builds[-1], aid.repeat_interleave(4))
        # writes through numpy or .data do not move the version counter: host ids are compared
        # by value too, so the new ids are routed (a refilled numpy buffer, for one)
        version = aid._version
        aid.numpy()[:] = [1, 1, 0, 2, -1]
        assert aid._version == version
        y4 = mlm(input_ids=ids, adapter_ids=aid).logits
        assert len(builds) == 6 and torch.equal(builds[-1], aid.repeat_interleave(6))
        assert torch.equal(y4, m2(input_ids=ids, adapter_ids=aid.clone()).logits)  # (m2 builds its own)
        aid.data[0] = 2
        mlm(input_ids=ids, adapter_ids=aid)
        assert len(builds) == 8 and torch.equal(builds[-1], aid.repeat_interleave(6))


def test_a_route_block_serves_calls_without_ids_and_nests():
    """`MultiLoraModel.route`: forward calls without ``adapter_ids``, the wrapped model and single
    layers inside the block take its ids; a forward with its own ids, or an inner block, gives the
    outer routing back; after the block, a call without ids is refused again."""
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [1, 3, 7], alpha=2.0)
    _randomise_lora(mlm)
    ids = torch.randint(0, 101, (3, 6))
    a, b = torch.tensor([2, 0, 1]), torch.tensor([1, 1, -1])
    with torch.no_grad():
        want_a, want_b = mlm(input_ids=ids, adapter_ids=a).logits, mlm(input_ids=ids, adapter_ids=b).logits
        with mlm.route(a):
            assert torch.equal(mlm(input_ids=ids).logits, want_a)
            assert torch.equal(mlm.model(input_ids=ids).logits, want_a)
            assert torch.equal(mlm(input_ids=ids, adapter_ids=b).logits, want_b)
            with mlm.route(b):
                assert torch.equal(mlm(input_ids=ids).logits, want_b)
            assert torch.equal(mlm(input_ids=ids).logits, want_a)
        with pytest.raises(ValueError, match="adapter_ids is required"):
            mlm(input_ids=ids)
        with pytest.raises(ValueError, match="adapter_ids is required"):
            mlm.model(input_ids=ids)
        with mlm.route(1, batch_size=3):
            assert torch.equal(mlm(input_ids=ids).logits, mlm(input_ids=ids, adapter_ids=1).logits)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_inside_a_route_block(reentrant):
    """Gradient checkpointing recomputes the layers during backward, after forward has returned:
    inside `route` the recomputation is routed and the gradients are those of a plain backward;
    outside, the error says where the call came from and what to do."""
    def grads(checkpoint: bool, routed: bool):
        torch.manual_seed(0)
        base = tiny_gpt2()
        if checkpoint:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.train()
        mlm = MultiLoraModel(base, ["c_attn"], [2, 4], alpha=4.0)
        _randomise_lora(mlm)
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))
        aid = torch.tensor([1, 0])
        if reentrant:  # the reentrant variant recomputes only for inputs that need a gradient
            mlm.model.enable_input_require_grads()
        if routed:
            with mlm.route(aid):
                mlm(input_ids=ids, labels=ids).loss.backward()
        else:
            mlm(input_ids=ids, adapter_ids=aid, labels=ids).loss.backward()
        return [p.grad.clone() for p in mlm.lora_parameters()]

    plain = grads(False, False)
    for a, b in zip(grads(True, True), plain):
        assert rel_err(a, b) < 1e-6
    with pytest.raises(ValueError, match=r"backward pass.*gradient checkpointing.*model.route\(adapter_ids\)"):
        grads(True, False)


def _saved_peft(base, path, seed, **cfg):
    """A peft adapter over a copy of ``base`` with random (non-zero) A and B, saved to ``path``."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(path)
    return path


def test_from_peft_serves_adapters_of_other_ranks_alphas_and_layers(tmp_path):
    """Three peft adapters (ranks 2/5/3, one rsLoRA, each adapting other layers) in one model:
    every row of a mixed batch matches peft with that adapter loaded; -1 rows the base model."""
    base = tiny_bert()
    paths = [
        _saved_peft(base, tmp_path / "a", 1, r=2, lora_alpha=4, target_modules=["query", "value"]),
        _saved_peft(base, tmp_path / "b", 2, r=5, lora_alpha=10, use_rslora=True,
                    target_modules=["query", "key", "value", "dense"]),
        _saved_peft(base, tmp_path / "c", 3, r=3, lora_alpha=3, target_modules=["value"]),
    ]  # fmt: skip
    mlm = MultiLoraModel.from_peft(copy.deepcopy(base), paths)
    assert mlm.ranks == (2, 5, 3) and mlm.alphas == [4, 10, 3]
    peft_b = PeftModel.from_pretrained(copy.deepcopy(base), paths[1])
    want_names = sorted(n for n, m in peft_b.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert sorted(mlm.lora_module_names) == want_names  # the union: adapter b adapts every layer the others do
    ids = torch.randint(0, 101, (8, 7), generator=torch.Generator().manual_seed(0))
    adapter_ids = torch.tensor([2, 0, -1, 1, 1, 0, 2, -1])
    got = mlm(input_ids=ids, adapter_ids=adapter_ids).logits
    for k, path in enumerate(paths):
        ref_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        rows = adapter_ids == k
        ref = ref_model(input_ids=ids[rows]).logits
        assert rel_err(got[rows], ref) < 1e-5, k
        assert rel_err(ref, base(input_ids=ids[rows]).logits) > 1e-3  # the adapter changes the output
    rows = adapter_ids == -1
    assert rel_err(got[rows], base(input_ids=ids[rows]).logits) < 1e-6


def test_from_peft_refuses_what_it_cannot_serve_before_touching_the_model(tmp_path):
    base = tiny_bert()
    good = _saved_peft(base, tmp_path / "good", 1, r=2, target_modules=["query"])
    head = _saved_peft(base, tmp_path / "head", 2, r=2, target_modules=["query"], modules_to_save=["classifier"])
    gpt = _saved_peft(tiny_gpt2(), tmp_path / "gpt", 3, r=2, target_modules=["c_attn"])
    model = copy.deepcopy(base)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match="paths must be a list"):
        MultiLoraModel.from_peft(model, str(good))
    with pytest.raises(ValueError, match="at least one"):
        MultiLoraModel.from_peft(model, [])
    with pytest.raises(ValueError, match="modules_to_save"):
        MultiLoraModel.from_peft(model, [good, head])
    with pytest.raises(ValueError, match="lacks .*another base model"):
        MultiLoraModel.from_peft(model, [good, gpt])
    with pytest.raises(FileNotFoundError, match="not a peft adapter directory"):
        MultiLoraModel.from_peft(model, [good, tmp_path / "nowhere"])
    with pytest.raises(TypeError, match="sets ranks"):
        MultiLoraModel.from_peft(model, [good], ranks=[4])
    cfg = json.loads((good / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(ValueError, match=r"expected \(3, 32\)"):
        MultiLoraModel.from_peft(model, [good, bad])
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing injected


def test_adding_and_removing_adapters_keeps_the_others_bitwise(tmp_path):
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2, 5, 3], alpha=[4.0, 2.0, 6.0])
    _randomise_lora(mlm)
    ids = torch.randint(0, 101, (6, 7), generator=torch.Generator().manual_seed(2))
    before = mlm(input_ids=ids, adapter_ids=torch.tensor([0, 1, 2, 0, 1, 2])).logits
    k = mlm.add_adapter(4, alpha=8.0, scaling_rule="rslora")
    assert k == 3 and mlm.ranks == (2, 5, 3, 4) and mlm.alphas == [4.0, 2.0, 6.0, 8.0]
    assert all(layer.scaling_rules[3] == "rslora" for _, layer in mlm.lora_layers())
    after = mlm(input_ids=ids, adapter_ids=torch.tensor([0, 1, 2, 0, 1, 2])).logits
    assert torch.equal(after, before)
    fresh = mlm(input_ids=ids, adapter_ids=3).logits  # B starts at zero: the base model
    assert rel_err(fresh, base(input_ids=ids).logits) < 1e-6
    assert all(p.requires_grad for p in mlm.lora_parameters())
    mlm.remove_adapter(1)  # slot 2 becomes slot 1
    assert mlm.ranks == (2, 3, 4) and mlm.alphas == [4.0, 6.0, 8.0]
    moved = mlm(input_ids=ids, adapter_ids=torch.tensor([0, -1, 1, 0, -1, 1])).logits
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.equal(moved[keep], before[keep])
    with pytest.raises(ValueError, match="k must lie in"):
        mlm.remove_adapter(3)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        mlm.add_adapter(0)
    with pytest.raises(ValueError, match=r"alphas\[3\] must be a finite number"):
        mlm.add_adapter(2, alpha=float("nan"))
    with pytest.raises(ValueError, match="scaling_rule must be one of"):
        mlm.add_adapter(2, scaling_rule="sqrt")
    assert mlm.ranks == (2, 3, 4)  # the refused calls changed nothing
    one = MultiLoraModel(copy.deepcopy(base), ["query"], [2])
    with pytest.raises(ValueError, match="only adapter"):
        one.remove_adapter(0)


def test_added_slots_take_the_models_rule_and_peft_init_and_removal_keeps_each_slots_rule():
    base = tiny_bert()
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2, 3], alpha=[4.0, 2.0], scaling_rule="rslora")
    k = mlm.add_adapter(4, alpha=6.0)  # no rule given: the model's
    for _, layer in mlm.lora_layers():
        assert layer.scaling_rules[k] == "rslora" and float(layer.scaling[k]) == pytest.approx(6.0 / 4 ** 0.5)
        A_k, B_k = layer.get_adapter(k)
        bound = 1.0 / layer.in_features ** 0.5  # peft's Kaiming-uniform(a=sqrt(5)) bound
        assert torch.equal(B_k, torch.zeros_like(B_k))
        assert A_k.abs().max() <= bound and A_k.abs().max() > 0.5 * bound and A_k.std() > 0.2 * bound
    j = mlm.add_adapter(2, alpha=3.0, scaling_rule="fixed")
    _randomise_lora(mlm, seed=9)
    ids = torch.randint(0, 101, (4, 6), generator=torch.Generator().manual_seed(3))
    want = mlm(input_ids=ids, adapter_ids=torch.tensor([j, k, 0, j])).logits
    mlm.remove_adapter(1)  # k and j move down by one, each with its own rule and scaling
    for _, layer in mlm.lora_layers():
        assert layer.scaling_rules == ["rslora", "rslora", "fixed"]
        assert layer.scaling.tolist() == pytest.approx([4.0 / 2 ** 0.5, 6.0 / 4 ** 0.5, 3.0])
    got = mlm(input_ids=ids, adapter_ids=torch.tensor([j - 1, k - 1, 0, j - 1])).logits
    assert torch.equal(got, want)


def test_negative_slots_are_refused_everywhere(tmp_path):
    mlm = MultiLoraModel(tiny_bert(), ["query"], [2, 3])
    mlm.export_peft(1, tmp_path / "ok")
    for call in (lambda: mlm.export_peft(-1, tmp_path / "x"), lambda: mlm.import_peft(-1, tmp_path / "ok"),
                 lambda: mlm.remove_adapter(-1), lambda: mlm.merge_and_unload(-1)):
        with pytest.raises(ValueError, match=r"k must lie in \[0, 1\], got -1"):
            call()
    assert mlm.ranks == (2, 3) and not (tmp_path / "x").exists()


def test_add_peft_appends_a_slot_that_matches_peft_or_leaves_the_model_alone(tmp_path):
    base = tiny_bert()
    path = _saved_peft(base, tmp_path / "p", 5, r=3, lora_alpha=6, target_modules=["query", "value"])
    other = _saved_peft(base, tmp_path / "q", 6, r=2, target_modules=["query", "key"])
    mlm = MultiLoraModel(copy.deepcopy(base), ["query", "value"], [2], alpha=1.0)
    _randomise_lora(mlm)
    k = mlm.add_peft(path)
    assert k == 1 and mlm.ranks == (2, 3) and mlm.alphas == [1.0, 6]
    ids = torch.randint(0, 101, (3, 5), generator=torch.Generator().manual_seed(3))
    ref = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(input_ids=ids).logits
    assert rel_err(mlm(input_ids=ids, adapter_ids=1).logits, ref) < 1e-5
    state = {n: p.detach().clone() for n, p in mlm.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="adapts layers this model does not adapt"):
        mlm.add_peft(other)  # adapts key, which this model does not
    assert mlm.ranks == (2, 3)
    assert all(torch.equal(p, state[n]) for n, p in mlm.named_parameters() if "lora_" in n)

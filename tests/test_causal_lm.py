"""Causal-LM federated fine-tuning: next-token loss per client over its own tokens, perplexity,
parity of concurrent and sequential training, peft export, against HF/peft references."""

import json
import math

import numpy as np
import pytest
import torch

from hetlora.fl import FedConfig, Simulation
from hetlora.fl.checkpoint import load_checkpoint
from hetlora.fl.local import evaluate
from hetlora.fl.sim import FedData, synthetic_data, tiny_gpt2
from hetlora_kernels import AdapterLayout

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(num_clients=4, seed=0):
    train, test, C = synthetic_data(seed, num_train=120, num_test=24, length=12)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(train))
    parts, s = [], 0
    for n in [10, 20, 40, 50][:num_clients]:  # unequal sizes: clients run different step counts
        parts.append(np.sort(perm[s:s + n]))
        s += n
    return FedData(train, test, C, [(p[:-2], p[-2:]) for p in parts])


def _cfg(tmp_path=None, **kw):
    base = dict(model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn", "c_fc"], dataset="synthetic",
                num_clients=4, clients_per_round=4, rounds=1, local_steps=4, local_epochs=1.0, batch_size=4,
                r_min=1, r_max=4, rank_rule="list", ranks=[1, 2, 3, 4], dtype="float64", progress=False, lr=5e-2,
                head_lr=5e-2, lam=0.5, gamma=0.7, max_grad_norm=0.05, client_eval_samples=2, plots=False,
                out_dir=str(tmp_path or "unused"), run_name="run", checkpoint_every=1, export_clients=0)
    base.update(kw)
    return FedConfig(**base)


def _sim(cfg, data):
    sim = Simulation(cfg, data=data, encoder=tiny_gpt2(0, dtype=torch.float64), verbose=False)
    sim.setup()
    return sim


def _random_adapter(sim, rank, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = [0.3 * torch.randn(rank, di, generator=g, dtype=torch.float64) for di, _ in sim.fm.dims]
    B = [0.3 * torch.randn(rank, do, generator=g, dtype=torch.float64) for _, do in sim.fm.dims]
    return A, B


def test_token_losses_match_hf_loss_with_the_adapter_merged():
    """Sum of next-token CE over real tokens / their count == HF GPT-2's own ``labels=`` loss
    on a model whose target weights have the adapter merged in (float64)."""
    data = _data()
    sim = _sim(_cfg(), data)
    A, B = _random_adapter(sim, 3)
    s = 0.7
    sim.fm.set_adapters(A, B, AdapterLayout([3]), [s])
    ids, mask = data.test.input_ids[:9], data.test.attention_mask[:9]
    with torch.no_grad():
        ce, ntok, correct = sim.fm.token_losses(ids, mask, torch.zeros(9, dtype=torch.int64))
    ref = tiny_gpt2(0, dtype=torch.float64)
    names = dict(ref.named_modules())
    with torch.no_grad():
        for name, a, b in zip(sim.fm.layer_names, A, B):
            conv = names[name]  # GPT-2 Conv1D: weight [d_in, d_out], y = x W + b
            conv.weight += s * (b.t() @ a).t()
        labels = ids.masked_fill(mask == 0, -100)
        out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert int(ntok.sum()) == int((mask[:, 1:] * mask[:, :-1]).sum())
    # HF computes its loss in float32; the float64 reference is the same CE from the merged model's logits
    lg = out.logits[:, :-1]
    ref64 = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1),
                                              ignore_index=-100)
    torch.testing.assert_close(ce.sum() / ntok.sum(), ref64, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((ce.sum() / ntok.sum()).float(), out.loss, rtol=1e-6, atol=1e-6)
    pred = out.logits[:, :-1].argmax(-1)
    ok = ((pred == ids[:, 1:]) & (mask[:, 1:] == 1)).sum()
    assert int(correct.sum()) == int(ok)


def test_concurrent_equals_sequential_for_a_causal_lm():
    data = _data()
    sims = {m: _sim(_cfg(mode=m), data) for m in ("concurrent", "sequential")}
    recs = {m: s.run_round(1) for m, s in sims.items()}
    a, b = sims["concurrent"].state, sims["sequential"].state
    assert recs["concurrent"]["ranks_sent"] == recs["sequential"]["ranks_sent"]
    assert a.head_W.shape == (0, sims["concurrent"].fm.hidden)  # no federated head for a causal LM
    for x, y in zip(a.A + a.B, b.A + b.B):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    assert abs(recs["concurrent"]["train_loss"] - recs["sequential"]["train_loss"]) < 1e-9
    assert recs["concurrent"]["client_acc"] == recs["sequential"]["client_acc"]
    assert max(float(t.abs().max()) for t in a.B) > 1e-4  # the round moved the adapter


def test_base_weights_are_d_out_by_d_in_for_gpt2_conv1d():
    """GPT-2's Conv1D stores ``[d_in, d_out]``; the federated code sees ``[d_out, d_in]`` as for
    nn.Linear (the strategies merge ``B^T A`` into it; validation checks that shape)."""
    sim = _sim(_cfg(), _data())
    fm = sim.fm
    W, b = fm.base_weights()
    for w, layer, (d_in, d_out) in zip(W, fm.layers, fm.dims):
        assert layer.fan_in_fan_out and w.shape == (d_out, d_in)
        assert torch.equal(w, layer.base_layer.weight.t())
    moved = [w + 0.25 * torch.randn_like(w) for w in W]
    fm.set_base(moved, b)
    for w, layer in zip(moved, fm.layers):
        assert torch.equal(layer.base_layer.weight, w.t())
    assert all(torch.equal(x, y) for x, y in zip(fm.base_weights()[0], moved))


@pytest.mark.parametrize("strategy", ["hetlora", "homlora", "zeropad", "flora", "flexlora", "fullft"])
def test_every_strategy_trains_a_causal_lm(strategy, tmp_path):
    """Every strategy on GPT-2 (Conv1D layers): no update is rejected, concurrent = sequential,
    and the strategies that change the base (FLoRA merges, full fine-tuning) change it."""
    data = _data()
    sims = {m: _sim(_cfg(tmp_path / m, mode=m, strategy=strategy), data) for m in ("concurrent", "sequential")}
    before = sims["sequential"].fm.base_weights()[0]
    recs = {m: s.run_round(1) for m, s in sims.items()}
    for rec in recs.values():
        assert rec["num_rejected"] == 0 and not rec["failed"], rec["rejected"]
    a, b = sims["concurrent"].state.tensors(), sims["sequential"].state.tensors()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11)
    base = sims["sequential"].state.base_weights
    if strategy in ("flora", "fullft"):
        assert any(not torch.equal(x, y) for x, y in zip(base, before))
        # exported in the modules' own layout: loadable into the model as it is
        paths = sims["sequential"].export_adapters(tmp_path / "export", clients=[])
        from safetensors.torch import load_file

        tw = load_file(str(paths[0] / "target_weights.safetensors"))
        model = tiny_gpt2(0, dtype=torch.float64)
        params = dict(model.named_parameters())
        assert {f"{n}.weight" for n in sims["sequential"].fm.layer_names} <= set(tw)
        for name, w in tw.items():
            assert w.shape == params[name].shape, name
        missing, unexpected = model.load_state_dict(tw, strict=False)
        assert not unexpected
    else:
        assert base is None


def test_per_client_loss_is_the_mean_over_its_own_tokens():
    """One client at a time (sequential) with one local step: the reported train loss of a
    client is HF's token-mean loss of its batch at the received adapter."""
    data = _data()
    cfg = _cfg(mode="sequential", local_steps=1, local_epochs=None, clients_per_round=1, num_clients=4)
    sim = _sim(cfg, data)
    chosen = int(sim.sample_clients(1)[0])
    rec = sim.run_round(1)
    from hetlora.fl.local import ClientSampler

    rows = ClientSampler(data.clients[chosen][0], cfg.batch_size, cfg.seed, 1, chosen).next()
    ids, mask = data.train.input_ids[rows], data.train.attention_mask[rows]
    L = int(mask.sum(1).max())
    ids, mask = ids[:, :L], mask[:, :L]
    # the global adapter at round 1 has B = 0, so the client's starting model is the base model
    ref = tiny_gpt2(0, dtype=torch.float64)
    with torch.no_grad():
        lg = ref(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert rec["client_losses"][chosen] == pytest.approx(float(loss), rel=1e-10)


def test_evaluate_reports_token_accuracy_and_cross_entropy():
    data = _data()
    sim = _sim(_cfg(), data)
    acc, loss = evaluate(sim.fm, sim.state, data.test, batch_size=5)
    ref = tiny_gpt2(0, dtype=torch.float64)
    ids, mask = data.test.input_ids, data.test.attention_mask
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="none").view(valid.shape)
    assert loss == pytest.approx(float(ce[valid].mean()), rel=1e-10)
    assert acc == pytest.approx(float((logits.argmax(-1) == ids[:, 1:])[valid].double().mean()), rel=1e-12)


def test_run_writes_perplexity_checkpoints_and_a_peft_adapter(tmp_path):
    from peft import PeftModel

    data = _data()
    cfg = _cfg(tmp_path, rounds=3, dtype="float32", local_epochs=None, local_steps=6, lr=5e-2, export_clients=1)
    sim = Simulation(cfg, data=data, encoder=tiny_gpt2(0), verbose=False)
    hist = sim.run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and len(hist.records) == 3
    for r in recs:
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
        assert 0.0 <= r["eval_acc"] <= 1.0
    sim0 = _sim(_cfg(dtype="float32"), data)
    _, loss0 = evaluate(sim0.fm, sim0.state, data.test)
    assert recs[-1]["eval_loss"] < loss0  # fine-tuning lowered the test perplexity
    ck = load_checkpoint(tmp_path / "run", restore_rng=False)
    assert ck is not None and ck[0] == 3 and ck[1].head_W.shape[0] == 0
    # the exported global adapter, loaded by peft on a fresh GPT-2, gives the same logits
    path = tmp_path / "run" / "adapters" / "global"
    assert json.loads((path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    pm = PeftModel.from_pretrained(tiny_gpt2(0), str(path))
    ids, mask = data.test.input_ids[:4], data.test.attention_mask[:4]
    sim.fm.load_global(sim.state)
    with torch.no_grad():
        ours = sim.fm.mlm(input_ids=ids, attention_mask=mask, adapter_ids=torch.zeros(4, dtype=torch.int64)).logits
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw,field", [
    ({"task": "causal-lm", "model": "minilm"}, "model"),
    ({"task": "causal-lm", "model": "tiny-random-bert"}, "model"),
    ({"task": "translation"}, "task"),
    ({"task": "classification", "model": "tiny-random-gpt2"}, "task"),
])
def test_task_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"FedConfig\.{field}"):
        FedConfig(**kw)


def test_a_local_causal_lm_directory_on_real_20_newsgroups(tmp_path, capsys):
    """`--model DIR --task causal-lm` loads any local causal LM with AutoModelForCausalLM (here a
    tiny random GPT-2 saved with the shipped MiniLM tokenizer, which has a pad token; GPT-2's own
    tokenizer has none and gets eos) and fine-tunes it on the real 20 Newsgroups files."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from hetlora.cli import main
    from hetlora.fl.data import default_model_path

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    d = tmp_path / "tiny-gpt2"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rc = main(["simulate", "--model", str(d), "--task", "causal-lm", "--target-modules", "c_attn",
               "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1", "--local-steps", "2",
               "--batch-size", "2", "--max-length", "16", "--eval-samples", "16", "--client-eval-samples", "2",
               "--no-progress", "--no-plots", "--export-clients", "0", "--out-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert rc == 0 and "perplexity" in out
    rec = json.loads((tmp_path / "runs" / "hetlora_s0" / "metrics.jsonl").read_text().splitlines()[0])
    # a random model over a 30k vocabulary: perplexity of the order of the vocabulary size
    assert 1e3 < rec["eval_ppl"] < 1e5 and rec["eval_ppl"] == pytest.approx(math.exp(rec["eval_loss"]))


def test_generate_with_an_adapter_per_prompt(tmp_path):
    """MultiLoraModel.generate: prompts of different adapters (and -1, the base model) in one
    batch give the tokens each gives alone and the tokens peft gives with that adapter exported;
    beams and several returned sequences keep each prompt's adapter."""
    from peft import PeftModel

    from hetlora import MultiLoraModel

    torch.manual_seed(0)
    m = MultiLoraModel(tiny_gpt2(0), ["c_attn", "c_fc"], [2, 5], alpha=8.0)
    for p in m.lora_parameters():
        torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.ones_like(ids)
    aid = torch.tensor([1, -1, 0])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = m.generate(input_ids=ids, attention_mask=mask, adapter_ids=aid, **kw)
    assert out.shape == (3, 10)
    for i, k in enumerate(aid.tolist()):
        alone = m.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], adapter_ids=k, **kw)
        assert torch.equal(alone[0], out[i])
        if k >= 0:
            path = m.export_peft(k, tmp_path / f"a{k}")
            ref = PeftModel.from_pretrained(tiny_gpt2(0), str(path)).eval()
            assert torch.equal(ref.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)[0], out[i])
        else:
            assert torch.equal(tiny_gpt2(0).generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)[0],
                               out[i])
    beams = m.generate(input_ids=ids, attention_mask=mask, adapter_ids=aid, num_beams=2, num_return_sequences=2,
                       max_new_tokens=3, pad_token_id=0)
    assert beams.shape[0] == 6
    for i, k in enumerate(aid.tolist()):
        alone = m.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], adapter_ids=k, num_beams=2,
                           num_return_sequences=2, max_new_tokens=3, pad_token_id=0)
        assert torch.equal(alone, beams[2 * i:2 * i + 2])


def test_generate_needs_a_model_that_generates():
    from hetlora import MultiLoraModel
    from hetlora.fl.sim import tiny_bert

    m = MultiLoraModel(tiny_bert(0), ["query"], [2, 3])
    with pytest.raises(AttributeError, match="has no generate"):
        m.generate(input_ids=torch.zeros(1, 3, dtype=torch.long), adapter_ids=0)

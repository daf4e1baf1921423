"""A training step over a `MultiLoraModel` reads nothing back from its tensors once its batch's
routing is built, on every backend.

On a GPU each such read (``.item()``, ``.tolist()``, ``bool(t)``, a data-dependent shape such
as ``nonzero`` or a boolean-mask index) stalls the host until the GPU catches up, and makes the
step impossible to capture in a CUDA graph (``bench e2e``'s ``concurrent+graph``).  A CPU has
no such stall, so the tests here watch for the reads themselves: they patch every tensor
method and torch function that turns a tensor's values into host values or shapes, run the
second step of the same batch (the first builds the routing, which must read the ids), and
expect no call at all.  ``tests/test_cuda_graphs.py`` checks the same on a GPU with
``torch.cuda.set_sync_debug_mode("error")`` and captures the step.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import hetlora_kernels as hk
from hetlora import MultiLoraModel

from .helpers import cpu_backend_params

# tensor methods / torch functions whose result depends on tensor values on the host
_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero", "unique")
_FUNCS = ("nonzero", "unique", "masked_select", "equal", "allclose", "argwhere")


# reads of host memory that the CPU stands in for: `Routing.set` compares host (CPU) adapter ids
# by value, which reads no device memory even when the batch is on a GPU (device ids it never reads)
_HOST_ONLY = ("_host_ids", "_same_host_ids")


@contextlib.contextmanager
def host_reads():
    """Records ``(what, innermost frame)`` of every value read from a tensor inside the block."""
    seen: list[tuple[str, str]] = []
    saved = []

    def note(what: str) -> None:
        frame = traceback.extract_stack(limit=3)[0]
        if frame.name not in _HOST_ONLY:
            seen.append((what, f"{frame.filename}:{frame.lineno}"))

    def wrap(owner, name: str, check=None):
        orig = getattr(owner, name)

        def patched(*args, **kwargs):
            if check is None or check(*args, **kwargs):
                note(f"{getattr(owner, '__name__', owner)}.{name}")
            return orig(*args, **kwargs)

        saved.append((owner, name, orig))
        setattr(owner, name, patched)

    def bool_index(self, idx, *a, **k):
        items = idx if isinstance(idx, tuple) else (idx,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    def repeats_without_size(self_or_input, repeats=None, *a, output_size=None, **k):
        return isinstance(repeats, torch.Tensor) and output_size is None

    for name in _METHODS:
        wrap(torch.Tensor, name)
    for name in _FUNCS:
        wrap(torch, name)
    wrap(torch.Tensor, "__getitem__", bool_index)
    wrap(torch.Tensor, "repeat_interleave", repeats_without_size)
    wrap(torch, "repeat_interleave", repeats_without_size)
    try:
        yield seen
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def test_the_watcher_sees_each_kind_of_read():
    """The check above can fail: each read it looks for is seen, plain maths is not."""
    t = torch.tensor([1.0, 0.0, 2.0])
    with host_reads() as seen:
        t.item() if t.numel() == 1 else t[0].item()
        t.tolist()
        bool(t[0])
        t.nonzero()
        t[t > 0]
        torch.repeat_interleave(t, torch.tensor([1, 2, 1]))
        torch.equal(t, t)
        _ = t * 2 + t.sum()  # no read
        t[1:]  # no read
        torch.repeat_interleave(t, torch.tensor([1, 2, 1]), output_size=4)  # no read: size given
    kinds = [w for w, _ in seen]
    assert kinds == ["Tensor.item", "Tensor.tolist", "Tensor.__bool__", "Tensor.nonzero", "Tensor.__getitem__",
                     "torch.repeat_interleave", "torch.equal"], seen


def _tiny(family: str) -> tuple[torch.nn.Module, list[str]]:
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
        return LlamaModel(cfg), ["q_proj", "v_proj"]
    cfg = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=61,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg), ["query", "value"]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("backend", cpu_backend_params())
def test_a_routed_training_step_reads_nothing_back(backend, family):
    base, targets = _tiny(family)
    model = MultiLoraModel(base, targets, [3, 1, 5], alpha=[8.0, 2.0, 16.0])
    for p in model.lora_parameters():  # B starts at zero: make the LoRA path carry gradient
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 61, (5, 7), generator=torch.Generator().manual_seed(1))
    aid = torch.tensor([2, 0, -1, 2, 1])  # unsorted, one row with no adapter
    opt = torch.optim.SGD(list(model.lora_parameters()), lr=0.1)  # SGD: no step counter to read
    # a fixed random readout (BERT's output is layer-normed: its mean square has no gradient)
    proj = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def step() -> None:
        h = model(input_ids=ids, adapter_ids=aid).last_hidden_state  # all-ones mask: not passed
        (h.float() @ proj).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with hk.use_backend(backend):
        step()  # builds the routing of this batch (reads the ids: once per batch)
        before = [p.detach().clone() for p in model.lora_parameters()]
        with host_reads() as seen:
            step()
    assert seen == [], f"{backend}: host reads in a routed step: {seen}"
    # and the step did train
    assert any(not torch.equal(a, p) for a, p in zip(before, model.lora_parameters()))


@pytest.mark.parametrize("strategy", ["hetlora", "flora"])
def test_the_simulators_local_steps_read_nothing_back(tmp_path, monkeypatch, strategy):
    """`hetlora simulate`'s concurrent local training, steps 2 onwards of every round: no read of
    a tensor's values (the losses add up on the device, the optimiser keeps its step counts
    there, the trimmed length comes from host-side lengths).  The one read left is transformers'
    own ``padding_mask.all()`` when it builds the attention mask of a padded batch."""
    from hetlora.fl import FedConfig, Simulation
    from hetlora.fl import sim as sim_mod

    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                    local_steps=4, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                    client_eval_samples=0, out_dir=str(tmp_path), run_name="run", export_clients=0, plots=False,
                    tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], strategy=strategy)
    reads: list[tuple[str, str]] = []
    real = sim_mod.train_round

    def watched(*args, on_step=None, **kwargs):
        tasks = args[3]
        steps = max(t.steps for t in tasks)  # concurrent mode: one on_step call per step
        stack = contextlib.ExitStack()
        calls = [0]

        def hook(n: int) -> None:  # runs after each step: watch steps 2..last only
            calls[0] += 1
            if calls[0] == 1:
                hook.seen = stack.enter_context(host_reads())
            if calls[0] == steps:
                stack.close()
                reads.extend(hook.seen)
            if on_step is not None:
                on_step(n)

        try:
            out = real(*args, on_step=hook, **kwargs)
        finally:
            stack.close()
        assert calls[0] == steps >= 3
        return out

    monkeypatch.setattr(sim_mod, "train_round", watched)
    Simulation(cfg, verbose=False).run()
    # allowed: transformers' mask check, and token groups built from the host copy of the
    # client ids for a new trimmed length (host memory on a GPU: see the meta-device test below)
    build = f"{Path(hk.__file__).parent / 'layout.py'}:"
    ours = [r for r in reads if "/transformers/" not in r[1] and not r[1].startswith(build)]
    assert ours == [], f"host reads in the simulator's local steps: {ours}"


def test_routing_builds_groups_for_a_device_batch_from_host_ids_without_reading_the_device():
    """Host ids routing a batch on another device: the token groups are built on the host and
    copied.  The batch lives on the meta device here, where any read of device memory raises."""
    from hetlora.layer import Routing

    routing = Routing()
    ids = torch.tensor([2, 0, -1, 2])
    x = torch.empty(4, 3, 8, device="meta")  # [batch, tokens, d]
    routing.set(ids, 3)
    g = routing.groups_for(x)
    assert g.device.type == "meta" and g.counts_list == (3, 0, 6) and g.starts_list == (3, 6, 6, 12)
    assert routing.groups_for(x) is g  # every layer of the forward shares it
    routing.set(ids.to("meta"), 3)  # ids already on the device: the build must read them
    with pytest.raises(NotImplementedError):
        routing.groups_for(x)
    # one adapter and no ids (a served single-adapter model): built on the host too
    one = Routing().single(12, torch.device("meta"))
    assert one.device.type == "meta" and one.counts_list == (12,) and one.starts_list == (0, 12)


def test_evaluation_reads_its_sums_once_at_the_end():
    """`hetlora.fl.local.evaluate`: the batches' losses and counts add up on the device and are
    read once, after the last batch (3 reads on one line); the model is routed by host ids."""
    from hetlora.fl import FedConfig, Simulation
    from hetlora.fl.local import evaluate

    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=4, clients_per_round=2, rounds=1,
                    r_min=1, r_max=4, progress=False, plots=False, tiers=[[0.5, "min"], [0.5, "max"]],
                    target_modules=["query", "value"])
    sim = Simulation(cfg, verbose=False)
    sim.setup()
    sim.data.test.lengths()  # host-side lengths, computed once per data set
    with host_reads() as seen:
        acc, loss = evaluate(sim.fm, sim.state, sim.data.test, batch_size=16)  # 100 examples: 7 batches
    build = f"{Path(hk.__file__).parent / 'layout.py'}:"
    ours = [r for r in seen if "/transformers/" not in r[1] and not r[1].startswith(build)]
    assert len(ours) == 3 and len({line for _, line in ours}) == 1, ours
    assert 0.0 <= acc <= 1.0 and loss > 0


@pytest.mark.parametrize("model", ["tiny-random-bert", "tiny-random-gpt2"])
def test_an_unpadded_batch_reaches_the_model_without_a_mask(model):
    """A batch whose host-side lengths show no padding goes to the model without its all-ones
    mask (`FedModel.features` / `token_losses` with ``unpadded``): transformers would read the mask
    back to find that out and then drop it; the results are the same to the bit and nothing is
    read.  With the mask passed, transformers' read is there (what the shortcut saves)."""
    from hetlora.fl import FedConfig, Simulation

    cfg = FedConfig(model=model, dataset="synthetic", num_clients=4, clients_per_round=2, rounds=1, r_min=1, r_max=4,
                    progress=False, plots=False, tiers=[[0.5, "min"], [0.5, "max"]],
                    task="causal-lm" if "gpt2" in model else "classification",
                    target_modules=["c_attn"] if "gpt2" in model else ["query", "value"])
    sim = Simulation(cfg, verbose=False)
    sim.setup()
    fm = sim.fm
    fm.load_global(sim.state)  # one adapter: the global one
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (6, 12))
    mask = torch.ones_like(ids)
    aid = torch.zeros(6, dtype=torch.int64)
    run = (lambda unpadded: fm.token_losses(ids, mask, aid, unpadded)) if fm.causal else \
        (lambda unpadded: (fm.features(ids, mask, aid, unpadded),))
    with torch.no_grad():
        with host_reads() as passed:
            want = run(False)
        with host_reads() as skipped:
            got = run(True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert [r for r in passed if "/transformers/" in r[1]], "transformers no longer reads the mask: drop `unpadded`"
    assert skipped == [], skipped


@pytest.mark.parametrize("strategy", ["hetlora", "homlora"])
def test_a_run_on_unpadded_data_equals_the_run_that_passes_every_mask(tmp_path, monkeypatch, strategy):
    """Every batch unpadded (masks all ones): a whole HetLoRA run with the shortcut lands bit for
    bit where the run that passes every mask lands (the penalty, the pooling and the evaluation
    unchanged; the shortcut only leaves the all-ones mask out of the model's call)."""
    from hetlora.fl import FedConfig, Simulation
    from hetlora.fl.local import FedModel, TokenData
    from hetlora.fl.sim import FedData, synthetic_data

    train, test, C = synthetic_data(0, num_train=160, num_test=48)
    full = [TokenData(d.input_ids.clone(), torch.ones_like(d.attention_mask), d.labels) for d in (train, test)]
    clients = [(np.arange(k * 32, k * 32 + 28), np.arange(k * 32 + 28, (k + 1) * 32)) for k in range(5)]

    def run(name: str, **kw) -> dict[str, torch.Tensor]:
        cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=5, clients_per_round=3,
                        rounds=2, local_steps=3, batch_size=4, r_min=1, r_max=4, max_length=16, progress=False,
                        client_eval_samples=4, out_dir=str(tmp_path), run_name=name, export_clients=0, plots=False,
                        tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], strategy=strategy,
                        **{"lam": 0.5, **kw})
        sim = Simulation(cfg, data=FedData(full[0], full[1], C, clients), verbose=False)
        hist = sim.run()
        return {**sim.state.tensors(), "acc": torch.tensor([r["eval_acc"] for r in hist.records])}

    short = run("shortcut")
    if strategy == "hetlora":  # the tail-norm penalty still acts on unpadded batches
        no_penalty = run("lam0", lam=0.0)
        assert not all(torch.equal(short[k], no_penalty[k]) for k in short if k.startswith(("A.", "B.")))
    for name in ("features", "token_losses"):  # every call passes its mask
        real = getattr(FedModel, name)
        monkeypatch.setattr(FedModel, name, lambda self, *a, _real=real, unpadded=False: _real(self, *a[:3]))
    passed = run("masks")
    assert all(torch.equal(short[k], passed[k]) for k in short)

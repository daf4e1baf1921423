"""On a GPU: a routed `MultiLoraModel` training step never synchronises with the host, and
captured in a CUDA graph it replays to the same parameters as eager steps.

``tests/test_host_reads.py`` checks the first on a CPU by watching for host reads; here
``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising call into an error, and
the capture itself fails on one.  The capture follows PyTorch's whole-network recipe (eager
warm-up on a side stream, gradients unset before capture, AdamW with ``capturable=True``),
as ``bench e2e``'s ``concurrent+graph`` method does.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util

import pytest
import torch

import hetlora_kernels as hk

pytestmark = pytest.mark.gpu

transformers = pytest.importorskip("transformers")


def _model(dtype: torch.dtype):
    from hetlora import MultiLoraModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    base = transformers.LlamaModel(cfg).to(device="cuda", dtype=dtype)
    model = MultiLoraModel(base, ["q_proj", "v_proj"], [3, 16, 1, 7], alpha=8.0)
    for p in model.lora_parameters():  # B starts at zero: make every factor carry gradient
        torch.nn.init.normal_(p, std=0.05)
    return model


def _trainer(model):
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 97, (6, 19), device="cuda", generator=g)
    aid = torch.tensor([3, 0, -1, 1, 3, 2], device="cuda")  # unsorted, one row with no adapter
    proj = torch.randn(64, device="cuda", generator=g)
    opt = torch.optim.AdamW(list(model.lora_parameters()), lr=1e-2, capturable=True)

    def loss_backward() -> None:
        h = model(input_ids=ids, adapter_ids=aid).last_hidden_state
        (h.float() @ proj).pow(2).mean().backward()

    def step() -> None:
        loss_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, loss_backward, opt


def _backends() -> list:
    out = []
    for name in ("triton", "cuda"):
        ok, why = hk.backend_status(name, "cuda")
        out.append(pytest.param(name, marks=() if ok else pytest.mark.skip(reason=why), id=name))
    return out


@pytest.mark.parametrize("backend", _backends())
def test_a_routed_step_does_not_synchronise(backend):
    model = _model(torch.bfloat16)
    step, _, _ = _trainer(model)
    with hk.use_backend(backend):
        step()  # compiles, and builds the batch's routing (which reads the ids once)
        torch.cuda.synchronize()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", _backends())
def test_a_captured_step_replays_like_eager_steps(backend):
    eager = _model(torch.float32)
    graphed = copy.deepcopy(eager)
    step_e, _, _ = _trainer(eager)
    step_g, loss_backward, opt = _trainer(graphed)
    with hk.use_backend(backend):
        for _ in range(5):
            step_e()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step_g()
            step_g()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            loss_backward()
            opt.step()
        for _ in range(3):  # 2 eager + 3 replays = the 5 eager steps
            graph.replay()
    torch.cuda.synchronize()
    start = _model(torch.float32)
    moved = 0
    for (name, pe), pg, p0 in zip(eager.named_parameters(), graphed.parameters(), start.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        moved += int(not torch.equal(pe, p0))
    assert moved > 0  # the steps trained something


def test_the_simulators_local_steps_do_not_synchronise(tmp_path, monkeypatch):
    """`hetlora simulate` on a GPU, steps 2 onwards of each round's concurrent local training,
    under ``set_sync_debug_mode("warn")``: no synchronising call but transformers' own check of
    a padded batch's attention mask (``tests/test_host_reads.py`` watches the same on a CPU).
    Triton's autotuner is let off too: it times each new kernel shape once (a new trimmed
    length can bring one), not every step; gpu_all.sh's test stage turns it off anyway."""
    import os
    import warnings

    from hetlora.fl import FedConfig, Simulation
    from hetlora.fl import sim as sim_mod

    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                    local_steps=4, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                    client_eval_samples=0, out_dir=str(tmp_path), run_name="run", export_clients=0, plots=False,
                    tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], device="cuda")
    syncs: list[str] = []
    real = sim_mod.train_round

    def watched(*args, on_step=None, **kwargs):
        steps, calls = max(t.steps for t in args[3]), [0]
        stack = contextlib.ExitStack()

        def hook(n: int) -> None:
            calls[0] += 1
            if calls[0] == 1:
                hook.caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            if calls[0] == steps:
                torch.cuda.set_sync_debug_mode("default")
                stack.close()
                # (torch's own note that the debug mode is a prototype comes once per process,
                # whichever test turns the mode on first: no synchronising call)
                syncs.extend(f"{w.filename}:{w.lineno}: {w.message}" for w in hook.caught
                             if "synchroniz" in str(w.message) and "is a prototype feature" not in str(w.message))
            if on_step is not None:
                on_step(n)

        try:
            return real(*args, on_step=hook, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            stack.close()

    monkeypatch.setattr(sim_mod, "train_round", watched)
    Simulation(cfg, verbose=False).run()
    theirs = [os.path.dirname(transformers.__file__)]
    if importlib.util.find_spec("triton") is not None:
        theirs.append(os.path.dirname(importlib.util.find_spec("triton").origin))
    ours = [s for s in syncs if not any(s.startswith(d + os.sep) for d in theirs)]
    assert ours == [], "synchronising calls in the simulator's local steps:\n" + "\n".join(ours)


def test_to_device_copies_host_tensors_without_waiting_and_keeps_their_values():
    """`hetlora_kernels.layout.to_device` stages a host tensor in pinned memory and copies it
    without blocking: no synchronising call, and changing the source afterwards does not reach
    the device copy."""
    from hetlora_kernels.layout import to_device

    src = torch.arange(1 << 20, dtype=torch.float32)
    want = src.clone()
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = to_device(src, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    src.zero_()
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and torch.equal(out.cpu(), want)
    assert to_device(out, "cuda") is out


@pytest.mark.parametrize("task,deterministic", [("classification", False), ("causal-lm", False),
                                                ("classification", True)])
def test_the_simulator_replays_its_local_steps_from_a_cuda_graph(tmp_path, monkeypatch, task, deterministic):
    """``FedConfig.cuda_graphs``: each round captures its local step once (after one eager
    warm-up) and replays it; no capture fails, and two rounds land where the same padded steps
    run eagerly land: to the rounding of index_add's atomics, or bit for bit with
    ``deterministic`` (its kernels must also let themselves be captured)."""
    import warnings

    from hetlora.fl import FedConfig, Simulation
    from hetlora.fl import local as local_mod

    model = (dict(model="tiny-random-bert", target_modules=["query", "value"]) if task == "classification" else
             dict(model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn", "c_fc"]))

    def run(name: str) -> dict[str, torch.Tensor]:
        cfg = FedConfig(dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2, local_steps=5,
                        batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                        client_eval_samples=0, out_dir=str(tmp_path), run_name=name, export_clients=0,
                        plots=False, tiers=[[0.5, "min"], [0.5, "max"]], device="cuda", cuda_graphs=True,
                        deterministic=deterministic, **model)
        sim = Simulation(cfg, verbose=False)
        sim.run()
        return {k: v.detach().cpu().clone() for k, v in sim.state.tensors().items()}

    captures = []
    real = local_mod.StepGraph._capture
    monkeypatch.setattr(local_mod.StepGraph, "_capture", lambda self, fn: captures.append(1) or real(self, fn))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = run("graphed")
    assert not [w for w in caught if "cuda_graphs" in str(w.message)], [str(w.message) for w in caught]
    assert len(captures) == 2  # one per round
    monkeypatch.setattr(local_mod.StepGraph, "takes", lambda self, key: False)  # the same padding, eager
    eager = run("eager")
    assert graphed.keys() == eager.keys()
    for k in eager:
        if deterministic:
            assert torch.equal(graphed[k], eager[k]), k
        else:
            torch.testing.assert_close(graphed[k], eager[k], rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


def test_a_failed_capture_leaves_random_numbers_usable():
    """A capture that fails after the step drew random numbers (dropout) must not leave the
    device's generator in capture mode: on the fourth lend one failed capture made every later
    random op of the process raise "Offset increment outside graph capture"."""
    from hetlora.fl.local import CaptureState, StepGraph

    x = torch.ones(256, device="cuda")

    def step() -> None:
        y = torch.nn.functional.dropout(x, 0.5)  # draws from the default generator, captured
        y.sum().item()  # a host read: the capture fails

    shared = CaptureState()
    with pytest.raises(RuntimeError):
        StepGraph(lambda *a: None, torch.device("cuda"), shared)._capture(step)
    torch.manual_seed(3)
    a = torch.nn.functional.dropout(x, 0.5)
    torch.manual_seed(3)
    b = torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(a, b) and 0 < int((a == 0).sum()) < 256
    # and the pool is still good for a capture that works
    out = torch.zeros(256, device="cuda")
    replay = StepGraph(lambda *a: None, torch.device("cuda"), shared)._capture(lambda: out.copy_(x * 2))
    out.zero_()
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2)


def test_rounds_capture_into_the_shared_pool_after_the_last_graph_died():
    """Round after round a new StepGraph captures into the model's one pool while the previous
    round's StepGraph is gone (torch frees a pool no graph uses: the fourth lend's assertion)."""
    from hetlora.fl.local import CaptureState, StepGraph

    shared = CaptureState()
    x = torch.arange(64, dtype=torch.float32, device="cuda")
    for r in range(4):
        out = torch.zeros(64, device="cuda")
        sg = StepGraph(lambda *a: None, torch.device("cuda"), shared)
        replay = sg._capture(lambda out=out, r=r: out.copy_(x + r))
        replay()
        torch.cuda.synchronize()
        assert torch.equal(out, x + r)
        del sg, replay

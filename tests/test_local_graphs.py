"""``FedConfig.cuda_graphs``: the simulator's local steps through `hetlora.fl.local.StepGraph`.

A CUDA graph needs a GPU (``tests/test_cuda_graphs.py`` captures the real thing there); here the
capture is replaced by a stand-in with the same semantics (capturing records the step without
running it, each replay runs it on whatever the captured input buffers hold), so that on a CPU
the control flow is checked bit for bit: the warm-up step is a real step, the captured step runs
exactly once, every replay sees its own batch, layouts the graph was not captured for run
eagerly, and a failed capture leaves the round eager.  The reference is the eager path with the
same padding (``StepGraph.takes`` always false); the padded eager run itself is checked against
the default trimmed one to rounding.
"""

from __future__ import annotations

import pytest
import torch

from hetlora.fl import FedConfig, Simulation
from hetlora.fl import local as local_mod

pytestmark = pytest.mark.usefixtures("one_thread")


class Calls:
    def __init__(self) -> None:
        self.warm = self.capture = self.replay = 0


def _cfg(tmp_path, name, **kw) -> FedConfig:
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                local_steps=5, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=0, out_dir=str(tmp_path), run_name=name, export_clients=0, plots=False,
                tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"])
    base.update(kw)
    return FedConfig(**base)


def _run(cfg, monkeypatch, graphs: str | None, calls: Calls | None = None) -> dict[str, torch.Tensor]:
    """Final global state of a run. ``graphs``: None (the default trimmed eager path), "padded"
    (the graph path's padding, every step eager), "fake" (through the stand-in capture) or
    "broken" (a capture that raises)."""
    with monkeypatch.context() as m:
        if graphs is not None:
            m.setattr(local_mod, "use_cuda_graphs", lambda cfg, dev, steps: steps >= 3)
        if graphs == "padded":
            m.setattr(local_mod.StepGraph, "takes", lambda self, key: False)
        if graphs in ("fake", "broken"):
            def warm(self, fn):
                calls.warm += 1
                fn()

            def capture(self, fn):
                calls.capture += 1
                if graphs == "broken":
                    raise RuntimeError("operation not permitted when stream is capturing")

                def replay():
                    calls.replay += 1
                    fn()

                return replay  # recorded, not run: as torch.cuda.graph

            m.setattr(local_mod.StepGraph, "_warm", warm)
            m.setattr(local_mod.StepGraph, "_capture", capture)
        sim = Simulation(cfg, verbose=False)
        sim.run()
        return {k: v.clone() for k, v in sim.state.tensors().items()}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


CAUSAL = dict(model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn", "c_fc"])


@pytest.mark.parametrize("kw", [dict(strategy="hetlora"), dict(strategy="flexlora"),
                                dict(strategy="hetlora", **CAUSAL)], ids=["hetlora", "flexlora", "hetlora-causal-lm"])
def test_replayed_steps_equal_the_eager_steps(tmp_path, monkeypatch, kw):
    padded = _run(_cfg(tmp_path, "padded", **kw), monkeypatch, "padded")
    calls = Calls()
    before = dict(local_mod.StepGraph.stats)
    graphed = _run(_cfg(tmp_path, "graphed", **kw), monkeypatch, "fake", calls)
    _same(graphed, padded)
    # per round: 1 eager warm-up, 1 capture, then a replay for each of the 4 remaining steps
    assert (calls.warm, calls.capture, calls.replay) == (2, 2, 8)
    assert local_mod.StepGraph.stats["captured"] - before["captured"] == 2
    assert local_mod.StepGraph.stats["failed"] == before["failed"]
    trimmed = _run(_cfg(tmp_path, "trimmed", **kw), monkeypatch, None)
    for k in trimmed:  # padding instead of trimming: the masked tail changes only rounding
        torch.testing.assert_close(padded[k], trimmed[k], rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


def test_other_layouts_run_eagerly(tmp_path, monkeypatch):
    """Clients with fewer local steps finish early (local_epochs): the later steps' layout is not
    the captured one and runs eagerly, and the run still equals the all-eager one."""
    kw = dict(local_epochs=1.0, local_steps=6, batch_size=2, num_clients=4)
    padded = _run(_cfg(tmp_path, "padded", **kw), monkeypatch, "padded")
    calls = Calls()
    graphed = _run(_cfg(tmp_path, "graphed", **kw), monkeypatch, "fake", calls)
    _same(graphed, padded)
    assert calls.capture == 2 and calls.replay >= 2


def test_a_failed_capture_leaves_the_round_and_the_later_ones_eager(tmp_path, monkeypatch):
    """A capture that fails for a reason that recurs (a host read) is not tried again: round 2
    neither warms up nor captures (and, graph-free, trims its batches as the default path does).
    The run equals the eager one to the rounding that padding changes."""
    padded = _run(_cfg(tmp_path, "padded"), monkeypatch, "padded")
    calls = Calls()
    before = dict(local_mod.StepGraph.stats)
    with pytest.warns(RuntimeWarning, match="remaining steps run eagerly, and so do later rounds'"):
        broken = _run(_cfg(tmp_path, "broken"), monkeypatch, "broken", calls)
    assert broken.keys() == padded.keys()
    for k in padded:
        torch.testing.assert_close(broken[k], padded[k], rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")
    assert (calls.warm, calls.capture, calls.replay) == (1, 1, 0)
    stats = local_mod.StepGraph.stats  # what bench e2e reports beside a simulator+graph row
    assert stats["failed"] - before["failed"] == 1 and "stream is capturing" in stats["last_failure"]


def test_a_capture_out_of_memory_is_tried_again_next_round(tmp_path, monkeypatch):
    """Memory may be free next round: an out-of-memory capture fails only its own round."""
    calls = Calls()

    def capture(self, fn):
        calls.capture += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def warm(self, fn):
        calls.warm += 1
        fn()

    monkeypatch.setattr(local_mod.StepGraph, "_warm", warm)
    monkeypatch.setattr(local_mod.StepGraph, "_capture", capture)
    monkeypatch.setattr(local_mod, "use_cuda_graphs", lambda cfg, dev, steps: steps >= 3)
    with pytest.warns(RuntimeWarning, match=r"out of memory.*remaining steps run eagerly$"):
        Simulation(_cfg(tmp_path, "oom"), verbose=False).run()
    assert (calls.warm, calls.capture) == (2, 2)


def test_few_steps_skip_the_graph(monkeypatch):
    cfg = _cfg("/tmp", "x", local_steps=2)
    assert not local_mod.use_cuda_graphs(cfg, torch.device("cuda"), 2)
    assert not local_mod.use_cuda_graphs(cfg, torch.device("cpu"), 8)


def test_cuda_graphs_needs_a_cuda_device():
    with pytest.raises(ValueError, match=r"FedConfig.cuda_graphs: needs a CUDA device \(device='cpu'\)"):
        FedConfig(cuda_graphs=True, device="cpu").validate()
    with pytest.raises(ValueError, match="FedConfig.cuda_graphs: must be a bool"):
        FedConfig(cuda_graphs="yes").validate()


class _FakeCapture:
    """torch.cuda's capture API as `StepGraph._capture` meets it, with torch's bookkeeping of
    what the fourth lend tripped over: a memory pool counts the graphs using it and, at zero, is
    freed but keeps its handle, and a capture into a freed pool's handle fails torch's internal
    assertion; ``capture_begin`` puts the default generator in capture mode and opens the
    allocator's record of the capture (its filter points at the graph), and only a completed
    ``capture_end`` undoes both (torch's ``_cuda_endAllocateToPool`` closes the record too)."""

    def __init__(self, monkeypatch) -> None:
        fake = self
        self.use: dict[int, int] = {}
        self.recording: dict[int, object] = {}
        self.handles = 0
        self.capturing = False
        self.fail_end = False

        class Graph:
            def __init__(self) -> None:
                self.pool, self.ended = None, False

            def capture_begin(self, pool=None) -> None:
                fake.capturing = True  # the generator's prologue comes first, as in torch
                if pool in fake.use and fake.use[pool] <= 0:
                    raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")
                if pool in fake.recording:
                    raise RuntimeError("beginAllocateToPool: already recording to mempool_id")
                fake.use[pool] = fake.use.get(pool, 0) + 1
                fake.recording[pool] = self
                self.pool = pool

            def capture_end(self) -> None:
                if fake.fail_end:  # cudaStreamEndCapture failed: nothing after it runs
                    raise RuntimeError("operation failed due to a previous error during capture")
                del fake.recording[self.pool]
                self.ended, fake.capturing = True, False

            def replay(self) -> None:
                pass

            def __del__(self) -> None:
                assert self not in fake.recording.values(), "a graph died with the allocator's filter on it"
                if self.ended:
                    fake.use[self.pool] -= 1

        class Generator:
            def clone_state(self):
                return "fresh"

            def graphsafe_set_state(self, state) -> None:
                assert state == "fresh"
                fake.capturing = False

        def handle() -> int:
            self.handles += 1
            return self.handles

        def end_allocate(device: int, pool: int) -> None:
            if pool not in fake.recording:
                raise RuntimeError("endAllocateToPool: not currently recording to mempool_id")
            del fake.recording[pool]

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", handle)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: __import__("contextlib").nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "default_generators", (Generator(),))
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end_allocate, raising=False)


def test_rounds_capture_into_one_pool_that_outlives_each_rounds_graph(monkeypatch):
    """Each round's StepGraph dies with its round; the next round's capture into the shared
    pool must still find the pool alive (the last graph is held by the `CaptureState`)."""
    fake = _FakeCapture(monkeypatch)
    shared = local_mod.CaptureState()
    dev = torch.device("cuda", 0)
    for _ in range(3):
        graph = local_mod.StepGraph(lambda *a: None, dev, shared)
        graph._capture(lambda: None)()
        del graph
    assert fake.handles == 1 and list(fake.use.values()) == [1]  # one pool, held by the last graph
    assert not fake.capturing and not fake.recording


@pytest.mark.parametrize("where", ["begin", "step", "invalidated", "end"])
def test_a_failed_capture_leaves_the_generator_and_the_allocator_as_before(monkeypatch, where):
    """Wherever a capture fails, the device's generator leaves capture mode (else every later
    random op on the device raises) and the allocator's record of the capture is closed (else
    the pool cannot be captured into again, and the record's filter points at the graph), the
    step's own error is what is raised, and a later capture sharing the `CaptureState` works.
    "step": the step raised but the capture itself ended (a Python error; out of memory);
    "invalidated": the step's host read made ``capture_end`` fail too (the usual failure)."""
    fake = _FakeCapture(monkeypatch)
    shared = local_mod.CaptureState()
    dev = torch.device("cuda", 0)
    if where == "begin":  # a pool torch has freed: what the fourth lend's second round met
        shared.pool = torch.cuda.graph_pool_handle()
        fake.use[shared.pool] = 0

    def step():
        if where in ("step", "invalidated"):
            fake.fail_end = where == "invalidated"
            raise RuntimeError("operation not permitted when stream is capturing")
        fake.fail_end = where == "end"

    with pytest.raises(RuntimeError, match={"begin": "INTERNAL ASSERT", "step": "stream is capturing",
                                            "invalidated": "stream is capturing", "end": "previous error"}[where]):
        local_mod.StepGraph(lambda *a: None, dev, shared)._capture(step)
    assert not fake.capturing and not fake.recording
    assert len(shared.abandoned) == (0 if where == "step" else 1)  # a graph torch may still point at
    fake.fail_end = False
    local_mod.StepGraph(lambda *a: None, dev, shared)._capture(lambda: None)()
    assert not fake.capturing and not fake.recording

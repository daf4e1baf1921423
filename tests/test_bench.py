"""The benchmark programs run and write valid output (bench/): never a timing assertion.

``python -m bench kernels --smoke`` and ``python -m bench e2e --smoke`` run once each (in
parallel, as subprocesses, tiny shapes and tiny random models); the tests then check the
JSON, markdown and PNG files they wrote, and that ``bench report`` splices a README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {
        kind: subprocess.Popen(
            [sys.executable, "-m", "bench", kind, "--smoke", "--device", "cpu", "--out", str(out / kind)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for kind in ("kernels", "e2e")
    }
    logs = {}
    for kind, p in procs.items():
        try:
            logs[kind] = p.communicate(timeout=170)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            logs[kind] = p.communicate()[0]
        assert p.returncode == 0, f"bench {kind} --smoke failed:\n{logs[kind][-3000:]}"
    return out


def _load(path: Path) -> dict:
    # strict: NaN/Infinity are not JSON
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {path}"))


def test_kernels_smoke_outputs(smoke_out: Path) -> None:
    d = smoke_out / "kernels"
    res = _load(d / "kernels.json")
    m = res["machine"]
    for key in ("hostname", "cpu", "torch", "peft", "date", "git_commit", "device_name", "loadavg_start"):
        assert key in m
    assert "torch" in res["backends"]
    rows = res["rows"]
    methods = {r["method"] for r in rows}
    assert {"torch", "loop", "bmm_padded", "peft", "grouped_mm"} <= methods
    ops = {r["op"] for r in rows}
    assert ops == {"lora_delta", "lora_linear", "component_norms", "delta_fro_norms", "weighted_aggregate",
                   "truncate"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["status"] in ("ok", "n/a", "error", "oom")
        assert r["status"] == "ok" or r.get("reason"), r
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0
    ok_torch = [r for r in rows if r["method"] == "torch" and r["op"].startswith("lora")]
    assert ok_torch and all(r["status"] == "ok" for r in ok_torch)
    # the torch backend agrees with the loop reference (a sanity check of the benchmark's inputs)
    errs = [r["rel_err"] for r in ok_torch if r["mode"] == "fwd"]
    assert errs and max(errs) < 1e-4
    # both token arrangements ran, and every method agrees with the loop reference in each: a
    # wrong permutation in a baseline (or in the reference) would show here as a large error
    assert {r["arrangement"] for r in rows if r["op"].startswith("lora")} == {"grouped", "interleaved"}
    for arr in ("grouped", "interleaved"):
        fwd = [r for r in rows if r.get("arrangement") == arr and r["mode"] == "fwd" and r["status"] == "ok"]
        assert {"torch", "loop", "bmm_padded", "peft"} <= {r["method"] for r in fwd}
        assert max(r["rel_err"] for r in fwd) < 1e-4, arr
    # the other backends against the torch backend
    assert any(r.get("vs_torch", 0) > 0 for r in rows if r["method"] == "cuda")
    # peak memory on CPU (profiler memory events): at least the output a forward call returns,
    # and the ratio to the padded bmm baseline beside it
    for r in rows:
        if r["status"] == "ok" and r["op"] == "lora_delta" and r["mode"] == "fwd":
            assert r["peak_bytes"] >= r["T"] * r["d_out"] * 4, r
            if r["method"] != "bmm_padded":
                assert r["mem_vs_bmm"] > 0, r
    # speed-ups against every baseline that ran for lora_linear
    lin = [r for r in ok_torch if r["op"] == "lora_linear"]
    assert all({"loop", "bmm_padded", "peft"} <= set(r["speedup"]) for r in lin)
    md = (d / "kernels.md").read_text()
    assert "| op | mode |" in md and "lora_linear" in md and m["device_name"] in md
    pngs = sorted(d.glob("*.png"))
    assert any(p.name.startswith("speedup_") for p in pngs) and (d / "roofline.png") in pngs
    for p in pngs:
        assert p.read_bytes()[:8] == PNG


def test_e2e_smoke_outputs(smoke_out: Path) -> None:
    d = smoke_out / "e2e"
    res = _load(d / "e2e.json")
    rows = res["rows"]
    assert {r["method"] for r in rows} == {"concurrent", "simulator", "sequential"}
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    for r in rows:
        assert r["client_steps_per_s"] > 0 and r["step_s"] > 0
    assert all("speedup_vs_sequential" in r for r in rows if r["method"] != "sequential")
    sim_rows = [r for r in rows if r["method"] == "simulator"]
    assert sim_rows and all(r["steps_per_call"] == 4 and len(r["step_times_s"]) >= 1 for r in sim_rows)
    # the host's work per step: counted for the methods it is about, not for peft's loop
    for r in rows:
        assert (r.get("aten_ops_per_step") or 0) > 0 if r["method"] != "sequential" else "aten_ops_per_step" not in r
    md = (d / "e2e.md").read_text()
    assert "client-steps/s" in md and "| model |" in md and "ops/step" in md
    assert (d / "e2e.png").read_bytes()[:8] == PNG


def test_aten_ops_counts_forward_and_backward_and_leaves_out_views() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from bench.common import aten_ops
    finally:
        sys.path.remove(str(REPO))
    import torch

    x = torch.randn(4, 3, requires_grad=True)

    def step():
        y = (x.t().reshape(-1) * 2).sum()  # t and reshape of a contiguous view: views
        y.backward()

    fwd_only = aten_ops(lambda: (x.detach().t() * 2).sum())
    assert fwd_only == 2  # mul, sum
    assert aten_ops(step) > 2  # the backward's ops too


def test_report_splices_readme(smoke_out: Path, tmp_path: Path) -> None:
    from bench import report

    slug_dir = tmp_path / "bench" / "results" / "cpu-test"
    slug_dir.mkdir(parents=True)
    for kind in ("kernels", "e2e"):
        (slug_dir / f"{kind}.json").write_text((smoke_out / kind / f"{kind}.json").read_text())
    # the kernels from another machine of the folder's kind: named beside their date
    k = _load(slug_dir / "kernels.json")
    k["machine"]["device_name"] = "Another CPU (2 cores)"
    (slug_dir / "kernels.json").write_text(json.dumps(k))
    (slug_dir / "lend1-abc").mkdir()  # an earlier run moved aside: linked, not tabled
    (slug_dir / "lend1-abc" / "e2e.md").write_text("# old\n")
    (slug_dir / "notes").mkdir()  # a folder without a result table: not linked
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.START}\nold text\n{report.END}\n\n## After\n")
    args = type("A", (), {"root": str(tmp_path), "uncommitted": True, "print": False, "check": False})()
    assert report.run(args) == 0
    text = readme.read_text()
    assert "old text" not in text and text.endswith("## After\n")
    body = text[text.index(report.START): text.index(report.END)]
    info = _load(slug_dir / "e2e.json")["machine"]
    assert info["device_name"] in body and info["date"][:10] in body
    assert "client-steps/s" in body and "lora_linear" in body
    assert "over the torch backend" in body and "interleaved" in body
    assert "[`lend1-abc/`](bench/results/cpu-test/lend1-abc/)" in body and "notes/" not in body
    assert "**Kernels** — measured on Another CPU (2 cores) " in body
    assert "**End-to-end local training** — measured 20" in body  # the header's own machine: not repeated
    args.check = True
    assert report.run(args) == 0  # now up to date
    # without markers: printed, README untouched
    readme.write_text("# no markers\n")
    args.check = False
    assert report.run(args) == 0
    assert readme.read_text() == "# no markers\n"


def test_profile_python_overhead_stubs_and_restores_the_launches() -> None:
    """``bench profile --python-overhead`` times our host code with no-op launches, and leaves
    the triton modules' kernels as they were (later tests launch them)."""
    sys.path.insert(0, str(REPO))
    try:
        from bench import profile
        from hetlora_kernels.triton import expand, fused, shrink, wgrad
    finally:
        sys.path.remove(str(REPO))
    before = {(m.__name__, n): getattr(m, n) for m in (shrink, expand, fused, wgrad) for n in dir(m)
              if n.endswith("_kernel")}
    r = profile.python_overhead(4, calls=3)
    assert set(r) == {"fwd_us", "fwd+bwd_us"} and all(v > 0 for v in r.values())
    after = {(m.__name__, n): getattr(m, n) for m in (shrink, expand, fused, wgrad) for n in dir(m)
             if n.endswith("_kernel")}
    assert before and after == before


def test_profile_names_the_python_functions_a_call_spends_its_host_time_in() -> None:
    """The Python-level table of ``bench profile``'s triton rows: the functions a call runs,
    heaviest first, with the number of calls profiled; the gradients are cleared before each
    forward+backward call as for the other measurements."""
    sys.path.insert(0, str(REPO))
    try:
        from bench import profile
    finally:
        sys.path.remove(str(REPO))
    import torch

    seen = []

    def _a_host_heavy_helper():
        t = 0
        for i in range(20000):  # its own time: the heaviest function here
            t += i * i
        return t

    class Case:
        x = torch.ones(3, requires_grad=True)

        def leaves(self):
            return [self.x]

    case = Case()

    def call():
        seen.append(case.x.grad)
        _a_host_heavy_helper()
        (case.x * 2).sum().backward()

    table = profile._python_profile(call, case, "fwd+bwd", torch.device("cpu"), 4, 10)
    assert table.startswith("4 calls") and "_a_host_heavy_helper" in table
    assert seen == [None] * 4  # cleared before every call: no accumulation across them


def test_e2e_sequential_trains_a_rotating_16_of_many_clients(monkeypatch) -> None:
    """Sequential peft with K > 16 clients: each step trains 16 of them, every adapter loaded,
    the next step the next 16 (wrapping), and the row counts 16 client-steps per step."""
    sys.path.insert(0, str(REPO))
    try:
        import peft

        from bench import e2e
    finally:
        sys.path.remove(str(REPO))
    import torch

    dev = torch.device("cpu")
    run = e2e.Run("tiny-bert", 20, 1, 8)
    base, family, vocab = e2e.load_base(run.model, dev, torch.float32)
    seen: list[str] = []
    real = peft.PeftModel.set_adapter
    monkeypatch.setattr(peft.PeftModel, "set_adapter", lambda self, name: seen.append(name) or real(self, name))
    step, meta = e2e.sequential_step_fn(base, family, run, e2e.make_data(run, vocab, dev), dev)
    assert meta["clients_per_step"] == e2e.SEQ_TIMED_CLIENTS == 16
    step()
    step()
    assert seen == [f"c{k % 20}" for k in range(32)]


@pytest.mark.parametrize("method", ["concurrent", "simulator", "sequential"])
def test_e2e_steps_run_the_frozen_model_without_its_dropout(method: str) -> None:
    """Every method times the same work: the frozen model's dropout off in each step (a model built
    from a config starts in training mode; peft's train() would switch it on)."""
    import torch
    from torch import nn

    from bench import e2e

    dev = torch.device("cpu")
    run = e2e.Run("tiny-bert", 3, 2, 8)
    base, family, vocab = e2e.load_base(run.model, dev, torch.float32)
    assert base.config.hidden_dropout_prob > 0 and base.config.attention_probs_dropout_prob > 0  # else vacuous
    training: list[str] = []
    for name, m in base.named_modules():
        if (isinstance(m, nn.Dropout) and m.p > 0) or type(m).__name__.endswith("SelfAttention"):
            m.register_forward_pre_hook(lambda mod, args, name=name: training.append(name) if mod.training else None)
    step, _ = e2e.build_step(method, base, family, run, e2e.make_data(run, vocab, dev), dev)
    step()
    assert training == []


def _bench_modules():
    sys.path.insert(0, str(REPO))
    try:
        from bench import common, kernels
    finally:
        sys.path.remove(str(REPO))
    return common, kernels


def test_gpu_sweep_covers_every_axis_before_filling_in() -> None:
    """The GPU sweep holds every job of its grids once, and its first pass (what a budget-cut
    run surely measures) already reaches every d, dtype, rank mix, token arrangement and
    server dtype: the first lend's sweep was cut after d = 4096 bf16 mixed alone."""
    _, kernels = _bench_modules()
    pre = kernels.PRESETS["gpu"]
    jobs = kernels.sweep(pre)
    assert len(jobs) == len(set(jobs))
    # the grids spelled out independently of sweep()'s ordering
    want = {("server", K, d, L, dt) for dt in pre.server_dtypes for K, d, L in pre.server}
    d0, m0, dt0 = max(pre.ds), pre.mixes[0], pre.dtypes[0]
    grid = [(T, d, K, m0, dt0, arr) for arr in pre.arrangements for d in pre.ds for T in pre.Ts for K in pre.Ks
            if arr == "grouped" or d == d0]
    grid += [(T, d, K, mix, dt, "grouped") for dt in pre.dtypes for mix in pre.mixes for T in pre.extra_Ts
             for d in pre.extra_ds for K in pre.extra_Ks]
    want |= {("lora", *g) for g in grid
             if g[0] >= g[2] and not (g[2] == 1 and (g[3] != m0 or g[5] != "grouped"))}
    assert set(jobs) == want
    # the first pass: everything up to the last cover point
    n_first = max(i for i, j in enumerate(jobs) if (j[0] == "lora" and j[1] in pre.cover_Ts and j[3] in pre.cover_Ks)
                  or (j[0] == "server" and j[2] == max(d for _, d, _ in pre.server))) + 1
    first = jobs[:n_first]
    lora = [j for j in first if j[0] == "lora"]
    assert {j[2] for j in lora} == set(pre.ds)
    assert {j[5] for j in lora} == set(pre.dtypes) and {j[4] for j in lora} == set(pre.mixes)
    assert {j[6] for j in lora} == set(pre.arrangements)
    assert {j[4] for j in first if j[0] == "server"} == set(pre.server_dtypes)
    # the main block (largest d, first mix and dtype, grouped) runs whole, and first
    main = [j for j in jobs if j[0] == "lora" and j[2] == d0 and j[4] == m0 and j[5] == dt0 and j[6] == "grouped"]
    assert main == lora[:len(main)] and len(main) == len(pre.Ts) * len(pre.Ks)
    assert n_first < len(jobs)  # and the first pass is a fraction of the whole
    # after the main block, one point of every other block before a second point of any
    def block(j):
        return ("server", j[4]) if j[0] == "server" else (j[2], j[4], j[5], j[6])
    rest = [block(j) for j in first[first.index(main[-1]) + 1:]]
    n_blocks = len(set(rest))
    assert len(set(rest[:n_blocks])) == n_blocks >= 9
    # configs sharing adapters run back to back (K outer, T inner)
    ks = [j[3] for j in main]
    assert ks == sorted(ks)


def test_time_fn_counts_a_slow_calls_probe_as_a_sample() -> None:
    """A call slower than ``slow_s`` at its second warm-up is called 3 times in all (2 warm-ups,
    the second of them timed, and one more rep), not warm-up + reps; a fast call gets its reps."""
    import time

    import torch

    common, _ = _bench_modules()
    cpu = torch.device("cpu")
    n = [0]

    def slow() -> None:
        n[0] += 1
        time.sleep(0.03)

    r = common.time_fn([slow], cpu, warmup=3, reps=10, min_reps=5, slow_s=0.01, peak=True)
    assert n[0] == 3 and r["reps"] == common.SLOW_REPS == 2
    assert 0.03 <= r["min_s"] <= r["median_s"] < 1.0
    assert r["peak_bytes"] is None  # a CPU has no allocator peak: the caller measures it itself
    n[0] = 0
    r = common.time_fn([lambda: n.__setitem__(0, n[0] + 1)], cpu, warmup=3, reps=10, slow_s=0.01)
    assert n[0] == 13 and r["reps"] == 10


def test_peft_for_reuses_the_model_with_new_weights() -> None:
    """The sweep's peft model cache: the same shapes and ranks give back the same model with
    the new weights in it (its mixed batch matches the new adapters' loop), other ranks a new one."""
    import torch

    import hetlora_kernels as hk

    _, kernels = _bench_modules()
    layout = hk.AdapterLayout([3, 1, 5])
    g = torch.Generator().manual_seed(3)

    def weights():
        return (torch.randn(7, 6, generator=g), torch.randn(7, generator=g), torch.randn(9, 6, generator=g),
                torch.randn(9, 7, generator=g))

    m1 = kernels.peft_for(*weights(), layout)
    W, b, A, B = weights()
    m2 = kernels.peft_for(W, b, A, B, layout)
    assert m2 is m1
    x = torch.randn(3, 2, 6, generator=g, dtype=torch.float32)
    with torch.no_grad():
        y = m2(x, adapter_names=["a0", "a1", "a2"])
    ref = torch.stack([x[k] @ W.t() + b + (kernels.ALPHA / r) * (x[k] @ A[layout.rows(k)].t()) @ B[layout.rows(k)]
                       for k, r in enumerate(layout.ranks)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert kernels.peft_for(W, b, A, B, hk.AdapterLayout([3, 1, 4, 1])) is not m1


def test_e2e_simulator_method_runs_the_simulators_rounds() -> None:
    """`simulator` times hetlora.fl's own rounds: each call trains all K clients for
    SIM_LOCAL_STEPS local steps and aggregates (the global adapter moves)."""
    import torch

    from bench import e2e

    dev = torch.device("cpu")
    run = e2e.Run("tiny-bert", 5, 2, 8)
    base, family, vocab = e2e.load_base(run.model, dev, torch.float32)
    step, meta = e2e.simulator_step_fn(base, family, run, e2e.make_data(run, vocab, dev), dev)
    assert meta["clients_per_step"] == 5 and meta["steps_per_call"] == e2e.SIM_LOCAL_STEPS
    sim = step.sim
    before = [a.clone() for a in sim.state.A]
    step()
    assert any(not torch.equal(a, b) for a, b in zip(sim.state.A, before))
    assert sim.strategy.name == "hetlora" and list(sim.client_ranks) == e2e.client_ranks(5)


def test_e2e_compile_row_times_a_compiled_step() -> None:
    """``--compile``: a ``concurrent+compile`` row whose first call (the compilation) is timed
    apart, and no ATen op count (under the counting dispatch mode the step would run eagerly)."""
    import torch

    from bench import e2e

    torch._dynamo.reset()
    rows = e2e.bench_run(e2e.Run("tiny-bert", 3, 2, 8), torch.device("cpu"), torch.float32, 1, 1, compiled=True)
    row = next(r for r in rows if r["method"] == "concurrent+compile")
    assert row["status"] == "ok", row.get("reason")
    assert row["first_call_s"] > 0 and row["step_s"] > 0 and "aten_ops_per_step" not in row
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch._dynamo.reset()


def test_serve_generates_the_same_tokens_as_peft(tmp_path) -> None:
    """``bench serve``: every method generates, hetlora's and peft's mixed batch give peft's own
    per-adapter tokens, the adapters do change the text (so the comparison is not vacuous), and
    the JSON and markdown are written."""
    import argparse

    import torch

    from bench import serve

    rows = serve.bench_config(serve.Config("tiny-llama", 3, 6, 8, 4), torch.device("cpu"), torch.float32, reps=1)
    by = {r["method"]: r for r in rows}
    assert set(by) == set(serve.METHODS) and all(r["status"] == "ok" for r in rows), rows
    assert by["hetlora"]["same_tokens"] == 1.0 and by["peft-mixed"]["same_tokens"] == 1.0
    assert by["base"]["changed_by_adapters"] > 0.2
    assert by["peft-loop"]["speedup_vs_peft_loop"] == 1.0 and by["hetlora"]["tokens_per_s"] > 0
    out = serve.run(argparse.Namespace(smoke=True, preset=None, device="cpu", threads=None, out=str(tmp_path),
                                       models=None, budget_s=None))
    res = _load(out / "serve.json")
    assert res["kind"] == "serve" and len(res["rows"]) == len(serve.METHODS)
    assert "| hetlora |" in (out / "serve.md").read_text().replace("| tiny-llama | 3 | 6 | 8+4 ", "")



def test_serve_compares_low_precision_runs_with_a_float32_reference() -> None:
    """In bf16 each generating row also says how many tokens match peft one adapter at a time
    in float32 on the same (bf16-made) weights; a float32 run has no such column."""
    import torch

    from bench import serve

    cfg = serve.Config("tiny-llama", 3, 6, 8, 4)
    rows = serve.bench_config(cfg, torch.device("cpu"), torch.bfloat16, reps=1)
    by = {r["method"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    for m in ("hetlora", "peft-mixed", "peft-loop"):
        assert 0.0 <= by[m]["same_tokens_fp32"] <= 1.0, by[m]
    assert "same_tokens_fp32" not in by["base"]
    # the reference is float32 on the bf16 weights: the tiny model's greedy text survives bf16
    assert by["peft-loop"]["same_tokens_fp32"] > 0.5
    hdr, body = serve.table_rows({"rows": rows})
    assert hdr[-1] == "same as fp32" and all(len(b) == len(hdr) for b in body)
    rows32 = serve.bench_config(cfg, torch.device("cpu"), torch.float32, reps=1)
    assert not any("same_tokens_fp32" in r for r in rows32)
    assert "same as fp32" not in serve.table_rows({"rows": rows32})[0]


def test_profile_switches_hold_through_the_backward() -> None:
    """A profiled method's path switches (`bench.profile._with`) must hold while the backward
    runs: the backward reads ``PAIR_WGRAD`` and ``FUSED_BACKWARD`` when it runs, and rows that
    set them around the forward alone timed the default backward three lends running."""
    import types

    import torch

    from bench import profile

    mod = types.SimpleNamespace(FLAG=False)
    seen: list[tuple[str, bool]] = []

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", mod.FLAG))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", mod.FLAG))
            return g * 2

    case = types.SimpleNamespace(x=torch.ones(3, requires_grad=True), dy=torch.ones(3))
    fn = profile._with(lambda c: Twice.apply(c.x), (mod, "FLAG", True))
    profile._call(fn, case, "fwd+bwd")()
    profile._call(fn, case, "fwd")()
    assert seen == [("fwd", True), ("bwd", True), ("fwd", True)] and mod.FLAG is False
    assert torch.equal(case.x.grad, torch.full((3,), 2.0))


def test_e2e_profiles_their_column_and_tables(tmp_path: Path) -> None:
    """The GPU rows' step profiles (`bench.e2e.device_profile`, `python_profile`): on a CPU the
    device profile returns no device time and the top ops by CPU time (the GPU branch sums kernel
    time the same way `bench profile` does); a ``device ms`` column appears only where a row has
    one, and the profiled rows' tables go to ``e2e_profiles.md``."""
    import torch

    from bench import e2e

    x = torch.randn(64, 64)
    ms, table = e2e.device_profile(lambda: x @ x, torch.device("cpu"), calls=2, top=5)
    assert ms is None and "aten::mm" in table

    def busy() -> None:
        sum(i * i for i in range(20000))

    py = e2e.python_profile(busy, top=5)
    assert "busy" in py and "<genexpr>" in py
    row = {"model": "m", "clients": 2, "batch": 1, "seq": 4, "method": "concurrent", "status": "ok", "step_s": 0.01,
           "client_steps_per_s": 200.0}
    res = {"rows": [dict(row)], "machine": {"device_name": "X"}}
    hdr, body = e2e.table_rows(res)
    assert "device ms" not in hdr and e2e.profiles_md(res, tmp_path) is None
    res["rows"].append(dict(row, method="concurrent+graph", device_ms=4.25, kernels_top="ampere_sgemm  3 calls"))
    res["rows"].append(dict(row, method="simulator", device_ms=9.5, kernels_top="k", python_top="local.py:630(step)"))
    hdr, body = e2e.table_rows(res)
    i = hdr.index("device ms")
    assert [b[i] for b in body] == ["–", "4.25", "9.5"] and all(len(hdr) == len(b) for b in body)
    text = e2e.profiles_md(res, tmp_path).read_text()
    assert "m K=2 1×4 concurrent+graph" in text and "ampere_sgemm" in text and "device 4.25 ms a step" in text
    assert "local.py:630(step)" in text and text.count("Python functions") == 1


def test_device_time_counts_each_kernel_once() -> None:
    """torch.profiler books an eager kernel's time on the kernel's entry and again on the CPU op
    that launched it, and an optimizer's annotation gets a device span: a profile's device time
    (`bench profile`'s and `bench e2e`'s ``device ms``) must count the kernel once, as it counts a
    CUDA graph's replayed kernel, which no op launched."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    from bench import common as C

    kw = dict(use_device="cuda", stack=[])
    op = FunctionEvent(1, "aten::mm", 0, 0, 150, **kw)
    op.append_kernel("sgemm", 0, 100.0)
    kernel = FunctionEvent(2, "sgemm", 0, 10, 110, device_type=DeviceType.CUDA, **kw)
    replayed = FunctionEvent(4, "graph_kernel", 0, 200, 240, device_type=DeviceType.CUDA, **kw)
    note = FunctionEvent(3, "Optimizer.step#AdamW.step", 0, 0, 60, device_type=DeviceType.CUDA,
                         is_user_annotation=True, **kw)
    events = EventList([op, kernel, replayed, note], use_device="cuda")
    events._build_tree()
    avg = events.key_averages()
    assert sum(e.self_device_time_total for e in avg) == 300  # what the naive sum gave
    assert C.device_time_us(avg) == 140
    table = C.device_events(avg).table(sort_by="self_device_time_total", row_limit=5)
    assert "sgemm" in table and "graph_kernel" in table and "aten::mm" not in table and "Optimizer" not in table


def test_e2e_profile_pass_builds_each_profiled_step_again_and_notes_failures(monkeypatch) -> None:
    """`bench.e2e.profile_rows` (run on a GPU after every configuration is timed) builds each
    timed concurrent/simulator step again and profiles it into its row; the simulator's gets its
    Python profile; a row that failed to time is left alone, and a profile that fails is noted
    in the row, not raised.  Here on the CPU (no device time)."""
    import torch

    from bench import e2e

    run = e2e.Run("tiny-bert", 4, 2, 8, "smoke")
    rows = [{"model": run.model, "clients": 4, "batch": 2, "seq": 8, "method": m, "status": st, "backend": b}
            for m, st, b in (("concurrent", "ok", "triton"), ("simulator", "ok", "triton"),
                             ("concurrent", "ok", "torch"), ("concurrent+graph", "error", None),
                             ("sequential", "ok", "peft"))]
    e2e.profile_rows(run, rows, torch.device("cpu"), torch.float32, warmup=1)
    conc, sim, torch_row, graph_row, seq = rows
    assert "aten::" in conc["kernels_top"] and conc["device_ms"] is None and "python_top" not in conc
    assert "aten::" in sim["kernels_top"] and "hetlora/fl/" in sim["python_top"]
    for r in (torch_row, graph_row, seq):
        assert not {"kernels_top", "python_top", "device_ms", "profile_error"} & set(r)

    def broken(*a, **k):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(e2e, "device_profile", broken)
    row = {"model": run.model, "clients": 4, "batch": 2, "seq": 8, "method": "concurrent", "status": "ok",
           "backend": "triton", "step_s": 0.1, "client_steps_per_s": 40.0}
    e2e.profile_rows(run, [row], torch.device("cpu"), torch.float32, warmup=1)
    assert row["profile_error"] == "RuntimeError: no profiler here"
    machine = {"device_name": "X", "date": "d", "git_commit": "c", "torch": "t", "triton": "t", "peft": "p",
               "hostname": "h", "cpu_count": 2, "torch_threads": 1}
    md = e2e.markdown({"rows": [row], "machine": machine, "preset": "smoke", "truncated": False,
                       "method_note": "", "wall_s": 1.0})
    assert "Profiles that failed" in md and "no profiler here" in md

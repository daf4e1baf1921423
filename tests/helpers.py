"""Independent float64 references for the tests (never the project's own ops)."""

from __future__ import annotations

import torch


def dense_delta(x, A, B, ranks, ids, scaling):
    """float64 ``y[t] = s_k x[t] (B_k^T A_k)^T`` by building each adapter's dense ΔW."""
    K = len(ranks)
    s = (
        scaling
        if isinstance(scaling, (list, tuple))
        else (scaling.tolist() if isinstance(scaling, torch.Tensor) else [scaling] * K)
    )
    x64, A64, B64 = x.double(), A.double(), B.double()
    y = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    off = 0
    for k, r in enumerate(ranks):
        dW = s[k] * B64[off : off + r].t() @ A64[off : off + r]  # [d_out, d_in]
        for t in range(x.shape[0]):
            if int(ids[t]) == k:
                y[t] = dW @ x64[t]
        off += r
    return y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def random_case(ranks, T, d_in, d_out, dtype=torch.float32, with_unrouted=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    K = len(ranks)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    A = (torch.randn(R, d_in, generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(R, d_out, generator=g) / max(R, 1) ** 0.5).to(dtype)
    lo = -1 if with_unrouted else 0
    ids = torch.randint(lo, K, (T,), generator=g)
    return x, A, B, ids


def cpu_backend_params() -> list:
    """``pytest.param`` per backend (torch, triton, cuda) for CPU tensors; one that cannot run
    here (no interpreter, no built extension) is skipped with the reason."""
    import pytest

    import hetlora_kernels as hk

    params = []
    for name in ("torch", "triton", "cuda"):
        ok, why = hk.backend_status(name, "cpu")
        marks = () if ok else (pytest.mark.skip(reason=f"{name} backend cannot run on CPU tensors here: {why}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def tiny_run_config(tmp_path, **kw):
    """A `FedConfig` for a seconds-long run on the tiny random BERT and synthetic data, written
    to ``tmp_path/run``; ``kw`` overrides fields."""
    from hetlora.fl import FedConfig

    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=4, lr=2e-2, head_lr=1e-2, out_dir=str(tmp_path), run_name="run",
                checkpoint_every=1, export_clients=0, plots=False, tiers=[[0.5, "min"], [0.5, "max"]],
                target_modules=["query", "value"])
    base.update(kw)
    return FedConfig(**base)

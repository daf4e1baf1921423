"""Malformed layouts, token groups and op arguments raise a clear exception, on every backend.

Three parts:

1. Constructors: ``AdapterLayout`` and ``TokenGroups.from_*`` refuse bools, floats, negative
   or out-of-range values.
2. Op arguments, checked in-process on every backend that runs on CPU tensors: factors whose
   rows do not match the ranks, mismatched widths / dtypes / devices, per-layer lists of
   different lengths, bad scalings, weights, out_rank, ...  The exception must be a
   ``ValueError`` or ``TypeError`` whose message names the argument.
3. Tampered objects: a ``TokenGroups`` built directly with inconsistent fields (offsets past
   T, negative offsets, an ``order`` that is not a permutation, host lists that disagree with
   the tensors, ...) and an ``AdapterLayout`` whose attributes were overwritten.  A kernel
   handed such an object may read or write out of bounds, so each case runs in a child
   process: a crash (signal) is reported as such instead of taking pytest down with it.
   The case passes only if the op raises ``ValueError``/``TypeError`` naming the groups
   (or the layout refuses the assignment).
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import hetlora_kernels as hk
from hetlora_kernels import AdapterLayout, TokenGroups

from .helpers import cpu_backend_params

ROOT = Path(__file__).resolve().parent.parent
BAD = (ValueError, TypeError)


BACKENDS = cpu_backend_params()
backends = pytest.mark.parametrize("backend", BACKENDS)


# ---------------------------------------------------------------------------------------------
# 1. constructors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ranks, exc",
    [
        ([True, 2], TypeError),
        ([2, False], TypeError),
        ([2.0, 3], TypeError),
        ([1.5], TypeError),
        ([float("nan")], TypeError),
        ([2, None], TypeError),
        (["2"], TypeError),
        ([-1, 2], ValueError),
        ([0], ValueError),
        ([3, -7], ValueError),
        ([], ValueError),
        ("123", TypeError),
        (3, TypeError),
        (None, TypeError),
        (torch.tensor([1.0, 2.0]), TypeError),
        (torch.tensor([[1, 2]]), TypeError),
        (torch.tensor([2, -1]), ValueError),
        (torch.tensor([True, True]), TypeError),
        ([torch.tensor(True), 2], TypeError),
    ],
    ids=repr,
)
def test_layout_rejects(ranks, exc):
    with pytest.raises(exc, match="rank"):
        AdapterLayout(ranks)




@pytest.mark.parametrize(
    "ids, K, exc, match",
    [
        ([0, 3], 3, ValueError, "adapter_ids"),  # id >= K
        ([0, 2, 7], 3, ValueError, "adapter_ids"),
        ([0, -2], 3, ValueError, "adapter_ids"),  # id < -1
        ([-5], 1, ValueError, "adapter_ids"),
        (torch.tensor([0.0, 1.0]), 2, TypeError, "adapter_ids"),
        (torch.tensor([True, False]), 2, TypeError, "adapter_ids"),
        (torch.tensor([[0, 1]]), 2, ValueError, "adapter_ids"),
        ([0.5], 2, TypeError, "adapter_ids"),
        ([1, 2.7], 3, TypeError, "adapter_ids"),
        ([0, 1], 0, ValueError, "num_adapters"),
        ([0, 1], -2, ValueError, "num_adapters"),
        ([0, 1], True, TypeError, "num_adapters"),
        ([0], torch.tensor(True), TypeError, "num_adapters"),
        ([0, 1], 2.0, TypeError, "num_adapters"),
        (torch.tensor([0, 2**40]), 3, ValueError, "adapter_ids"),
    ],
    ids=repr,
)
def test_token_groups_from_ids_rejects(ids, K, exc, match):
    with pytest.raises(exc, match=match):
        TokenGroups.from_adapter_ids(ids, K)


@pytest.mark.parametrize(
    "lengths, exc",
    [
        ([2, -1], ValueError),
        ([], ValueError),
        ([1.0, 2], TypeError),
        ([True, 2], TypeError),
        (torch.tensor([1.0]), TypeError),
        (torch.tensor([[1, 2]]), TypeError),
        (torch.tensor([3, -1]), ValueError),
        (torch.tensor([True, False]), TypeError),
        ([torch.tensor(True), 2], TypeError),
        ("12", TypeError),
    ],
    ids=repr,
)
def test_token_groups_from_lengths_rejects(lengths, exc):
    with pytest.raises(exc, match="lengths"):
        TokenGroups.from_lengths(lengths)


# ---------------------------------------------------------------------------------------------
# 2. op arguments (in-process, every backend)
# ---------------------------------------------------------------------------------------------
RANKS = [2, 3, 1]
K, RT = len(RANKS), sum(RANKS)
IDS = [1, -1, 0, 2, 1, 0, -1, 2]
T, D_IN, D_OUT = len(IDS), 5, 4


def _good(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(T, D_IN, generator=g, dtype=dtype),
        A=torch.randn(RT, D_IN, generator=g, dtype=dtype),
        B=torch.randn(RT, D_OUT, generator=g, dtype=dtype),
        layout=AdapterLayout(RANKS),
        groups=TokenGroups.from_adapter_ids(torch.tensor(IDS), K),
        scaling=0.5,
    )


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# (name, changes to the good arguments, exception, regex the message must match)
LORA_BAD = [
    ("A has too many rows", lambda a: a.update(A=torch.randn(RT + 1, D_IN)), ValueError, r"\bA\b.*rows"),
    ("A has too few rows", lambda a: a.update(A=torch.randn(RT - 1, D_IN)), ValueError, r"\bA\b.*rows"),
    ("B has too many rows", lambda a: a.update(B=torch.randn(RT + 2, D_OUT)), ValueError, r"\bB\b.*rows"),
    ("ranks larger than A", lambda a: a.update(layout=AdapterLayout([2, 3, 4])), ValueError, "rows"),
    ("ranks smaller than A", lambda a: a.update(layout=AdapterLayout([2, 3])), ValueError, "rows|adapters"),
    ("x width != A width", lambda a: a.update(x=torch.randn(T, D_IN + 1)), ValueError, r"d_in|\bx\b"),
    ("x is 1-D", lambda a: a.update(x=torch.randn(T)), ValueError, r"\bx\b"),
    ("x is 3-D", lambda a: a.update(x=torch.randn(1, T, D_IN)), ValueError, r"\bx\b"),
    ("A is 1-D", lambda a: a.update(A=torch.randn(RT)), ValueError, r"\bA\b"),
    ("x int", lambda a: a.update(x=torch.ones(T, D_IN, dtype=torch.int64)), TypeError, r"\bx\b"),
    ("x fp64, A fp32", lambda a: a.update(x=a["x"].double()), TypeError, "dtype"),
    ("B fp16, A fp32", lambda a: a.update(B=a["B"].half()), TypeError, "dtype"),
    ("x not a tensor", lambda a: a.update(x=a["x"].tolist()), TypeError, r"\bx\b"),
    ("A on another device", lambda a: a.update(A=_meta(a["A"])), ValueError, "device|meta"),
    ("B on another device", lambda a: a.update(B=_meta(a["B"])), ValueError, "device|meta"),
    ("groups for fewer tokens", lambda a: a.update(x=torch.randn(T + 1, D_IN)), ValueError, "groups|tokens"),
    (
        "groups for another K",
        lambda a: a.update(groups=TokenGroups.from_adapter_ids(torch.tensor([0] * T), 2)),
        ValueError,
        "groups|adapters",
    ),
    ("groups is an id tensor", lambda a: a.update(groups=torch.tensor(IDS)), TypeError, "groups"),
    ("layout is a list", lambda a: a.update(layout=list(RANKS)), TypeError, "layout"),
    ("scaling [K+1]", lambda a: a.update(scaling=torch.ones(K + 1)), ValueError, "scaling"),
    ("scaling [K, 1]", lambda a: a.update(scaling=torch.ones(K, 1)), ValueError, "scaling"),
    ("scaling list K-1", lambda a: a.update(scaling=[1.0] * (K - 1)), ValueError, "scaling"),
    ("scaling nan", lambda a: a.update(scaling=float("nan")), ValueError, "scaling"),
    ("scaling inf", lambda a: a.update(scaling=math.inf), ValueError, "scaling"),
    ("scaling tensor nan", lambda a: a.update(scaling=torch.tensor([1.0, math.nan, 1.0])), ValueError, "scaling"),
    ("scaling list inf", lambda a: a.update(scaling=[1.0, 1.0, -math.inf]), ValueError, "scaling"),
    ("scaling bool", lambda a: a.update(scaling=True), TypeError, "scaling"),
    ("scaling str", lambda a: a.update(scaling="1.0"), TypeError, "scaling"),
    ("scaling None", lambda a: a.update(scaling=None), TypeError, "scaling"),
    ("scaling complex", lambda a: a.update(scaling=torch.ones(K, dtype=torch.complex64)), TypeError, "scaling"),
]


@backends
@pytest.mark.parametrize("name, change, exc, match", LORA_BAD, ids=[c[0] for c in LORA_BAD])
@pytest.mark.parametrize("op", ["lora_delta", "lora_linear"])
def test_lora_args_rejected(backend, op, name, change, exc, match):
    args = _good()
    change(args)
    with hk.use_backend(backend), pytest.raises(exc, match=match):
        if op == "lora_delta":
            hk.lora_delta(args["x"], args["A"], args["B"], args["layout"], args["groups"], args["scaling"])
        else:
            W, b = torch.randn(D_OUT, D_IN), torch.randn(D_OUT)
            hk.lora_linear(args["x"], W, b, args["A"], args["B"], args["layout"], args["groups"], args["scaling"])


LINEAR_BAD = [
    ("weight transposed", lambda: (torch.randn(D_IN, D_OUT), torch.randn(D_OUT)), ValueError, "weight"),
    ("weight fp64", lambda: (torch.randn(D_OUT, D_IN, dtype=torch.float64), None), TypeError, "weight"),
    ("weight 1-D", lambda: (torch.randn(D_OUT * D_IN), None), ValueError, "weight"),
    ("bias too long", lambda: (torch.randn(D_OUT, D_IN), torch.randn(D_OUT + 1)), ValueError, "bias"),
    ("bias 2-D", lambda: (torch.randn(D_OUT, D_IN), torch.randn(1, D_OUT)), ValueError, "bias"),
    ("bias fp16", lambda: (torch.randn(D_OUT, D_IN), torch.randn(D_OUT).half()), TypeError, "bias"),
    ("weight not a tensor", lambda: ([[0.0] * D_IN] * D_OUT, None), TypeError, "weight"),
    # the meta device stands in for another GPU: F.linear would hand back the bias alone
    ("weight on another device", lambda: (torch.randn(D_OUT, D_IN, device="meta"), None), ValueError,
     "weight is on meta"),
    ("bias on another device", lambda: (torch.randn(D_OUT, D_IN), torch.randn(D_OUT, device="meta")), ValueError,
     "bias is on meta"),
]


@backends
@pytest.mark.parametrize("name, make, exc, match", LINEAR_BAD, ids=[c[0] for c in LINEAR_BAD])
def test_lora_linear_base_rejected(backend, name, make, exc, match):
    a = _good()
    W, b = make()
    with hk.use_backend(backend), pytest.raises(exc, match=match):
        hk.lora_linear(a["x"], W, b, a["A"], a["B"], a["layout"], a["groups"], a["scaling"])


def _layers(n=2, widths=((5, 4), (3, 6), (2, 2)), dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    As = [torch.randn(RT, w[0], generator=g, dtype=dtype) for w in widths[:n]]
    Bs = [torch.randn(RT, w[1], generator=g, dtype=dtype) for w in widths[:n]]
    return As, Bs


def _with(ts: list, i: int, t) -> list:
    out = list(ts)
    out[i] = t
    return out


def _nan_row(t: torch.Tensor, row: int) -> torch.Tensor:
    t = t.clone()
    t[row, 0] = math.nan
    return t


# server-op argument sets: (name, fn(As, Bs, layout) -> (A, B) to pass, exception, regex)
LIST_BAD = [
    ("B has one layer more", lambda As, Bs: (As, Bs + [Bs[0]]), ValueError, "layers"),
    ("A has one layer more", lambda As, Bs: (As + [As[0]], Bs), ValueError, "layers"),
    ("A list, B tensor", lambda As, Bs: (As, Bs[0]), TypeError, "list"),
    ("A tensor, B list", lambda As, Bs: (As[0], Bs), TypeError, "list"),
    ("empty lists", lambda As, Bs: ([], []), ValueError, "layer"),
    ("layer 1 of A too many rows", lambda As, Bs: (_with(As, 1, torch.randn(RT + 1, 3)), Bs), ValueError, r"A\[1\]"),
    ("layer 1 of B too few rows", lambda As, Bs: (As, _with(Bs, 1, torch.randn(RT - 1, 6))), ValueError, r"B\[1\]"),
    ("layer 1 of B fp16", lambda As, Bs: (As, _with(Bs, 1, Bs[1].half())), TypeError, r"B\[1\]"),
    ("layer 1 on another device", lambda As, Bs: (_with(As, 1, _meta(As[1])), Bs), ValueError, "device|meta"),
    ("layer 0 of A is 1-D", lambda As, Bs: (_with(As, 0, torch.randn(RT)), Bs), ValueError, r"A\[0\]"),
    ("layer 0 of A is int", lambda As, Bs: (_with(As, 0, torch.ones(RT, 5, dtype=torch.int32)), Bs), TypeError, r"A"),
    ("a layer is not a tensor", lambda As, Bs: (_with(As, 1, As[1].tolist()), Bs), TypeError, r"A\[1\]"),
]
SERVER_OPS = ["component_norms", "delta_fro_norms", "weighted_aggregate"]


def _call_server(op, A, B, layout, **kw):
    if op == "component_norms":
        return hk.component_norms(A, B, layout, **kw)
    if op == "delta_fro_norms":
        return hk.delta_fro_norms(A, B, layout, **kw)
    return hk.weighted_aggregate(A, B, layout, kw.pop("weights", [0.5, 0.25, 0.25]), **kw)


@backends
@pytest.mark.parametrize("name, make, exc, match", LIST_BAD, ids=[c[0] for c in LIST_BAD])
@pytest.mark.parametrize("op", SERVER_OPS)
def test_server_layer_lists_rejected(backend, op, name, make, exc, match):
    As, Bs = _layers(2)
    A, B = make(As, Bs)
    with hk.use_backend(backend), pytest.raises(exc, match=match):
        _call_server(op, A, B, AdapterLayout(RANKS))


SERVER_BAD = [
    ("rows != total rank", "component_norms", lambda A, B: (A[:-1], B[:-1], {}), ValueError, "rows"),
    ("A, B dtypes differ", "component_norms", lambda A, B: (A, B.double(), {}), TypeError, "dtype"),
    ("reduce='mean'", "component_norms", lambda A, B: (A, B, {"reduce": "mean"}), ValueError, "reduce"),
    ("layout is ranks", "component_norms", lambda A, B: (A, B, {"layout": RANKS}), TypeError, "layout"),
    ("rows != total rank", "delta_fro_norms", lambda A, B: (A[:-1], B[:-1], {}), ValueError, "rows"),
    ("scaling [K+1]", "delta_fro_norms", lambda A, B: (A, B, {"scaling": torch.ones(K + 1)}), ValueError, "scaling"),
    ("scaling nan", "delta_fro_norms", lambda A, B: (A, B, {"scaling": math.nan}), ValueError, "scaling"),
    ("weights [K+1]", "weighted_aggregate", lambda A, B: (A, B, {"weights": [1.0] * (K + 1)}), ValueError, "weights"),
    ("weights [1, K]", "weighted_aggregate", lambda A, B: (A, B, {"weights": torch.ones(1, K)}), ValueError, "weights"),
    (
        "weights nan",
        "weighted_aggregate",
        lambda A, B: (A, B, {"weights": [1.0, math.nan, 1.0]}),
        ValueError,
        "weights",
    ),
    (
        "weights inf",
        "weighted_aggregate",
        lambda A, B: (A, B, {"weights": torch.tensor([1.0, 1, math.inf])}),
        ValueError,
        "weights",
    ),  # noqa: E501
    ("weights str", "weighted_aggregate", lambda A, B: (A, B, {"weights": "abc"}), TypeError, "weights"),
    ("weights a bool list", "weighted_aggregate", lambda A, B: (A, B, {"weights": [True, False, 1.0]}), TypeError,
     "weights"),
    (
        "weights bool",
        "weighted_aggregate",
        lambda A, B: (A, B, {"weights": torch.ones(K, dtype=torch.bool)}),
        TypeError,
        "weights",
    ),  # noqa: E501
    (
        "out_rank < r_max",
        "weighted_aggregate",
        lambda A, B: (A, B, {"out_rank": max(RANKS) - 1}),
        ValueError,
        "out_rank",
    ),  # noqa: E501
    ("out_rank negative", "weighted_aggregate", lambda A, B: (A, B, {"out_rank": -1}), ValueError, "out_rank"),
    ("out_rank float", "weighted_aggregate", lambda A, B: (A, B, {"out_rank": 3.0}), TypeError, "out_rank"),
    ("out_rank bool", "weighted_aggregate", lambda A, B: (A, B, {"out_rank": True}), TypeError, "out_rank"),
    ("nan in A of adapter 1", "weighted_aggregate", lambda A, B: (_nan_row(A, 3), B, {}), ValueError, "adapter 1"),
    (
        "inf in B of adapter 2",
        "weighted_aggregate",
        lambda A, B: (A, _nan_row(B, 5) * math.inf, {}),
        ValueError,
        "adapter",
    ),  # noqa: E501
]


@backends
@pytest.mark.parametrize("name, op, make, exc, match", SERVER_BAD, ids=[f"{c[1]}: {c[0]}" for c in SERVER_BAD])
def test_server_args_rejected(backend, name, op, make, exc, match):
    As, Bs = _layers(1)
    A, B, kw = make(As[0], Bs[0])
    layout = kw.pop("layout", AdapterLayout(RANKS))
    with hk.use_backend(backend), pytest.raises(exc, match=match):
        _call_server(op, A, B, layout, **kw)


TRUNC_BAD = [
    ("ranks above the global rank", lambda A, B: (A, B, [2, 5]), ValueError, "rank"),
    ("A_g, B_g rows differ", lambda A, B: (A, B[:-1], [2]), ValueError, "rows"),
    ("A_g, B_g dtypes differ", lambda A, B: (A, B.half(), [2]), TypeError, "dtype"),
    ("A_g 1-D", lambda A, B: (A[0], B, [2]), ValueError, "A_g"),
    ("ranks with a bool", lambda A, B: (A, B, [True, 2]), TypeError, "rank"),
    ("ranks with a float", lambda A, B: (A, B, [2.0]), TypeError, "rank"),
    ("ranks with 0", lambda A, B: (A, B, [0, 2]), ValueError, "rank"),
    ("ranks negative", lambda A, B: (A, B, [-2]), ValueError, "rank"),
    ("lists of different lengths", lambda A, B: ([A, A], [B], [2]), ValueError, "layers"),
    ("layer 1 too few rows", lambda A, B: ([A, A[:1]], [B, B[:1]], [2]), ValueError, r"A_g\[1\]"),
    # one launch serves every layer (triton: a table of pointers), so all must be on one device
    ("layer 1 on another device", lambda A, B: ([A, A.to("meta")], [B, B.to("meta")], [2]), ValueError,
     r"A_g\[1\] is on meta"),
]


@backends
@pytest.mark.parametrize("name, make, exc, match", TRUNC_BAD, ids=[c[0] for c in TRUNC_BAD])
def test_truncate_args_rejected(backend, name, make, exc, match):
    A_g, B_g = torch.randn(4, 5), torch.randn(4, 3)
    A, B, ranks = make(A_g, B_g)
    with hk.use_backend(backend), pytest.raises(exc, match=match):
        hk.truncate(A, B, ranks)


LOWRANK_BAD = [
    ("flora: out_scaling 0", "flora", {"out_scaling": 0.0}, ValueError, "out_scaling"),
    ("flora: out_scaling nan", "flora", {"out_scaling": math.nan}, TypeError, "out_scaling"),
    ("flora: weights [K-1]", "flora", {"weights": [1.0] * (K - 1)}, ValueError, "weights"),
    ("flora: nan in adapter 2", "flora", {"A": "nan_row_5"}, ValueError, "adapter 2"),
    ("svd: a rank above R", "svd", {"ranks": [RT + 1]}, ValueError, "ranks"),
    ("svd: rank 0", "svd", {"ranks": [0, 2]}, ValueError, "rank"),
    ("svd: out_scaling 0", "svd", {"out_scaling": 0.0}, ValueError, "out_scaling|receiver"),
    ("svd: out_scaling [K'] with a 0", "svd", {"ranks": [1, 2], "out_scaling": [1.0, 0.0]}, ValueError, "receiver 1"),
    ("svd: per-sender scaling, K' != K", "svd", {"ranks": [2], "scaling": [1.0, 2.0, 3.0]}, ValueError, "out_scaling"),
    ("svd: weights nan", "svd", {"weights": [1.0, math.nan, 0.0]}, ValueError, "weights"),
    ("svd: lists of different lengths", "svd", {"A": "two_layers"}, ValueError, "layers"),
]


@pytest.mark.parametrize("name, op, kw, exc, match", LOWRANK_BAD, ids=[c[0] for c in LOWRANK_BAD])
def test_lowrank_args_rejected(name, op, kw, exc, match):
    As, Bs = _layers(1)
    A, B = As[0], Bs[0]
    kw = dict(kw)
    if kw.get("A") == "nan_row_5":
        A = _nan_row(A, 5)
    elif kw.get("A") == "two_layers":
        A, B = [A, A], [B]
    kw.pop("A", None)
    weights = kw.pop("weights", [0.5, 0.25, 0.25])
    layout = AdapterLayout(RANKS)
    with pytest.raises(exc, match=match):
        if op == "flora":
            hk.flora_stack(A, B, layout, weights, kw.pop("scaling", None), **kw)
        else:
            hk.lowrank_svd_redistribute(
                A, B, layout, weights, kw.pop("ranks", [2, 2, 2]), kw.pop("scaling", None), **kw
            )


# ---------------------------------------------------------------------------------------------
# 3. tampered TokenGroups / AdapterLayout, each op call in a child process
# ---------------------------------------------------------------------------------------------
def _fields(g: TokenGroups) -> dict:
    return dict(
        adapter_ids=g.adapter_ids,
        num_adapters=g.num_adapters,
        order=g.order,
        starts=g.starts,
        counts=g.counts,
        counts_list=g.counts_list,
        starts_list=g.starts_list,
        is_sorted=g.is_sorted,
    )


def _tampered(**changes) -> TokenGroups:
    """The groups of IDS (K = 3, T = 8) with some fields replaced: ``fn(fields) -> value``."""
    good = TokenGroups.from_adapter_ids(torch.tensor(IDS), K)
    f = _fields(good)
    for name, fn in changes.items():
        f[name] = fn(f)
    return TokenGroups(**f)


def _set(t: torch.Tensor, i: int, v) -> torch.Tensor:
    t = t.clone()
    t[i] = v
    return t


# starts_list of IDS is (2, 4, 6, 8): two -1 tokens, then two tokens per adapter
GROUPS_TAMPERED = {
    "starts_list past T": dict(starts_list=lambda f: (*f["starts_list"][:-1], T + 50)),
    "starts and starts_list past T": dict(
        starts_list=lambda f: (*f["starts_list"][:-1], T + 50), starts=lambda f: _set(f["starts"], -1, T + 50)
    ),
    "starts_list end short of T": dict(starts_list=lambda f: (*f["starts_list"][:-1], T - 1)),
    "negative starts_list": dict(starts_list=lambda f: (-3, *f["starts_list"][1:])),
    "negative starts and starts_list": dict(
        starts_list=lambda f: (-3, *f["starts_list"][1:]), starts=lambda f: _set(f["starts"], 0, -3)
    ),
    "decreasing starts_list": dict(starts_list=lambda f: (2, 6, 4, 8)),
    "starts tensor != starts_list": dict(starts=lambda f: _set(f["starts"], 1, 5)),
    "starts_list != starts tensor": dict(starts_list=lambda f: (2, 5, 6, 8)),
    "starts_list too short": dict(starts_list=lambda f: f["starts_list"][:-1], starts=lambda f: f["starts"][:-1]),
    "counts_list != starts_list": dict(counts_list=lambda f: (1, 2, 2)),
    "counts tensor != counts_list": dict(counts=lambda f: _set(f["counts"], 0, 5)),
    "order index >= T": dict(order=lambda f: _set(f["order"], T - 1, 10**6)),
    "order index negative": dict(order=lambda f: _set(f["order"], T - 1, -5)),
    "order has a duplicate": dict(order=lambda f: _set(f["order"], T - 1, int(f["order"][T - 2]))),
    "order too short": dict(order=lambda f: f["order"][:-1]),
    "order int32": dict(order=lambda f: f["order"].int()),
    "order float": dict(order=lambda f: f["order"].float()),
    "adapter_ids disagree with order": dict(
        adapter_ids=lambda f: torch.where(f["adapter_ids"] == 0, 1, f["adapter_ids"])
    ),
    "is_sorted but unsorted with -1": dict(is_sorted=lambda f: True),
}

LAYOUT_TAMPERED = {
    "offsets past R": ("offsets", (0, 2, 5, 60)),
    "negative offsets": ("offsets", (-4, 2, 5, 6)),
    "ranks larger": ("ranks", (2, 30, 1)),
    "max_rank larger": ("max_rank", 30),
    "total_rank smaller": ("total_rank", 4),
    "num_adapters larger": ("num_adapters", 5),
}


def _run_case(kind: str, name: str, backend: str, op: str) -> dict:
    """Run one tampered case in this process; a dict saying what happened."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D_IN, generator=g).requires_grad_()
    A = torch.randn(RT, D_IN, generator=g).requires_grad_()
    B = torch.randn(RT, D_OUT, generator=g).requires_grad_()
    layout = AdapterLayout(RANKS)
    groups = TokenGroups.from_adapter_ids(torch.tensor(IDS), K)
    try:
        if kind == "selftest":
            if name == "segfault":
                os.kill(os.getpid(), signal.SIGSEGV)
            raise ValueError("selftest")
        if kind == "groups":
            groups = _tampered(**GROUPS_TAMPERED[name])
        else:
            attr, value = LAYOUT_TAMPERED[name]
            setattr(layout, attr, value)
        with hk.use_backend(backend):
            if op == "lora_delta":
                y = hk.lora_delta(x, A, B, layout, groups, 0.5)
                y.backward(torch.ones_like(y))
            elif op == "lora_linear":
                y = hk.lora_linear(x, torch.randn(D_OUT, D_IN), None, A, B, layout, groups, 0.5)
                y.backward(torch.ones_like(y))
            elif op == "component_norms":
                hk.component_norms(A.detach(), B.detach(), layout)
            elif op == "delta_fro_norms":
                hk.delta_fro_norms(A.detach(), B.detach(), layout)
            elif op == "weighted_aggregate":
                hk.weighted_aggregate(A.detach(), B.detach(), layout, [1.0] * K)
            else:
                raise AssertionError(op)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return {"outcome": "raised", "type": type(e).__name__, "msg": str(e)[:300]}
    return {"outcome": "returned"}


def _child_main(cases: list[list[str]]) -> None:
    """Child process: run the cases in order, one JSON line each, flushed before the next."""
    for case in cases:
        res = _run_case(*case)
        print(json.dumps({"case": case, **res}), flush=True)


FIRST_CASE_TIMEOUT = 180.0  # seconds, includes importing torch / triton in the child
CASE_TIMEOUT = 30.0


def _text(chunks: list) -> str:
    return "".join(c for c in chunks if c is not None)


def _pump(stream, put) -> None:
    for line in stream:
        put(line)
    put(None)


def _run_in_children(cases: list[tuple]) -> dict[tuple, dict]:
    """Run ``cases`` in child processes.  A case that kills its child (signal) is recorded as
    a crash, one that stops answering as a hang (the child is killed); the remaining cases go
    on in a fresh child."""
    results: dict[tuple, dict] = {}
    todo = list(cases)
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1" if not torch.cuda.is_available() else "0")
    code = "import json, sys\nfrom tests import test_malformed as m\nm._child_main(json.loads(sys.argv[1]))\n"
    while todo:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps([list(c) for c in todo])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        errs: list[str] = []
        threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, errs.append), daemon=True).start()
        done, hung = 0, False
        while done < len(todo):
            try:
                line = lines.get(timeout=FIRST_CASE_TIMEOUT if done == 0 else CASE_TIMEOUT)
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if line is None:  # the child's stdout closed: it exited or died
                break
            if line.startswith("{"):
                rec = json.loads(line)
                results[tuple(rec.pop("case"))] = rec
                done += 1
        rc = proc.wait()
        if done < len(todo):
            failed = todo[done]
            if hung:
                results[failed] = {"outcome": "crashed", "msg": f"hung (no answer in {CASE_TIMEOUT:.0f} s), killed"}
            elif rc == 0:
                raise RuntimeError(f"child exited cleanly without running {failed}:\n{_text(errs)[-3000:]}")
            else:
                how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
                results[failed] = {"outcome": "crashed", "msg": f"{how}; stderr: {_text(errs)[-500:]}"}
            done += 1
        todo = todo[done:]
    return results


TAMPER_OPS_GROUPS = ["lora_delta", "lora_linear"]
TAMPER_OPS_LAYOUT = ["lora_delta", "component_norms", "delta_fro_norms", "weighted_aggregate"]


def _all_tamper_cases(backend: str) -> list[tuple]:
    cases = [("groups", n, backend, op) for n in GROUPS_TAMPERED for op in TAMPER_OPS_GROUPS]
    cases += [("layout", n, backend, op) for n in LAYOUT_TAMPERED for op in TAMPER_OPS_LAYOUT]
    return cases


AVAILABLE = [p.values[0] for p in BACKENDS if not p.marks]


@pytest.fixture(scope="module")
def tamper_results() -> dict:
    """Every tampered case of every available backend, run once, in as few children as possible."""
    return _run_in_children([c for b in AVAILABLE for c in _all_tamper_cases(b)])


def _assert_refused(res: dict, what: str, match: tuple[str, ...]) -> None:
    assert res["outcome"] != "crashed", f"{what}: the process crashed (out-of-bounds access): {res['msg']}"
    assert res["outcome"] == "raised", f"{what}: no exception (the op returned a result)"
    assert res["type"] in ("ValueError", "TypeError", "AttributeError"), (
        f"{what}: raised {res['type']}: {res['msg']} (expected ValueError/TypeError naming the argument)"
    )
    assert any(m in res["msg"] for m in match), f"{what}: message does not name the argument: {res['msg']}"


@backends
@pytest.mark.parametrize("op", TAMPER_OPS_GROUPS)
@pytest.mark.parametrize("name", list(GROUPS_TAMPERED))
def test_tampered_groups_rejected(tamper_results, backend, op, name):
    res = tamper_results[("groups", name, backend, op)]
    _assert_refused(res, f"{op} on {backend} with {name}", ("groups", "order", "starts", "counts", "adapter_ids"))


@backends
@pytest.mark.parametrize("op", TAMPER_OPS_LAYOUT)
@pytest.mark.parametrize("name", list(LAYOUT_TAMPERED))
def test_tampered_layout_rejected(tamper_results, backend, op, name):
    res = tamper_results[("layout", name, backend, op)]
    attr = LAYOUT_TAMPERED[name][0]
    _assert_refused(res, f"{op} on {backend} with {name}", ("layout", "AdapterLayout", attr, "immutable"))


def test_child_harness_reports_crashes():
    """The harness itself: a child killed by a signal is reported as a crash, and the cases
    after it still run (in a fresh child)."""
    res = _run_in_children([("selftest", "segfault", "torch", "-"), ("selftest", "raise", "torch", "-")])
    assert res[("selftest", "segfault", "torch", "-")]["outcome"] == "crashed"
    assert res[("selftest", "raise", "torch", "-")] == {"outcome": "raised", "type": "ValueError", "msg": "selftest"}

"""`screen_updates`: the one place where client updates are accepted or rejected (DESIGN.md section 7)."""

import logging

import pytest
import torch

from hetlora.fl.strategies import ClientUpdate
from hetlora.fl.validation import Screening, screen_updates

DIMS = [(5, 6), (3, 7)]
HEAD = (4, 9)


def _u(cid, rank=2, received=None, n=10, seed=None):
    g = torch.Generator().manual_seed(cid if seed is None else seed)
    return ClientUpdate(
        client_id=cid, rank=rank, rank_received=rank if received is None else received,
        A=[torch.randn(rank, di, generator=g) for di, _ in DIMS],
        B=[torch.randn(rank, do, generator=g) for _, do in DIMS],
        scaling=0.5, head_W=torch.randn(*HEAD, generator=g), head_b=torch.randn(HEAD[0], generator=g),
        num_examples=n)


def test_sound_updates_are_all_accepted_in_order():
    ups = [_u(3), _u(1, rank=4), _u(7, rank=1)]
    s = screen_updates(ups, DIMS, 4, HEAD)
    assert [u.client_id for u in s.accepted] == [3, 1, 7]
    assert s.rejected == [] and s.failed is False
    assert s.metrics() == {"num_accepted": 3, "num_rejected": 0, "rejected": [], "failed": False}


def test_each_kind_of_bad_update_is_rejected_with_its_client_and_reason(caplog):
    nan, inf_head, shape, rank_hi, above_sent, layers, n0 = (_u(i) for i in range(10, 17))
    nan.B[1][0, 2] = float("nan")
    inf_head.head_b[1] = float("-inf")
    shape.A[1] = torch.zeros(2, 4)
    rank_hi.rank = rank_hi.rank_received = 5
    above_sent.rank_received = 1
    layers.A = layers.A[:1]
    n0.num_examples = 0
    good = _u(99)
    with caplog.at_level(logging.WARNING, logger="hetlora.fl"):
        s = screen_updates([nan, inf_head, good, shape, rank_hi, above_sent, layers, n0, "junk"], DIMS, 4, HEAD,
                           round_idx=7, min_clients=1)
    assert [u.client_id for u in s.accepted] == [99] and not s.failed
    reasons = {r["client"]: r["reason"] for r in s.rejected}
    assert "non-finite" in reasons[10]
    assert "head" in reasons[11] and "non-finite" in reasons[11]
    assert "layer 1: A has shape (2, 4)" in reasons[12]
    assert "outside [1, 4]" in reasons[13]
    assert "above the rank 1" in reasons[14]
    assert "expected 2 layers" in reasons[15]
    assert "num_examples" in reasons[16]
    assert reasons["'?'"].startswith("not a ClientUpdate")
    assert len(s.rejected) == 8
    # every rejection was logged with the round, the client id and the reason
    text = caplog.text
    assert "round 7" in text and "client 12" in text and "shape" in text


def test_a_raising_update_is_rejected_not_propagated():
    class Weird(ClientUpdate):
        @property
        def A(self):  # noqa: N802
            raise RuntimeError("boom")

        @A.setter
        def A(self, v):  # noqa: N802
            pass

    u = _u(5)
    w = Weird(client_id=5, rank=2, rank_received=2, A=None, B=u.B, scaling=1.0, head_W=u.head_W,
              head_b=u.head_b, num_examples=3)
    s = screen_updates([w, _u(6)], DIMS, 4, HEAD)
    assert [u.client_id for u in s.accepted] == [6]
    assert "malformed update" in s.rejected[0]["reason"] and "boom" in s.rejected[0]["reason"]


@pytest.mark.parametrize("bad,accepted,failed", [(0, 3, False), (1, 2, False), (2, 1, True), (3, 0, True)])
def test_round_fails_exactly_below_min_clients(bad, accepted, failed):
    ups = [_u(i) for i in range(3)]
    for u in ups[:bad]:
        u.A[0][0, 0] = float("inf")
    s = screen_updates(ups, DIMS, 4, HEAD, min_clients=2)
    assert len(s.accepted) == accepted and s.failed is failed and len(s.rejected) == bad


def test_clients_without_a_reply_count_as_rejected():
    s = screen_updates([_u(1)], DIMS, 4, HEAD, errors=[(4, "client raised ValueError"), (6, "timeout")],
                       min_clients=2)
    assert [r["client"] for r in s.rejected] == [4, 6]
    assert s.rejected[1]["reason"] == "timeout"
    assert s.failed and len(s.accepted) == 1


@pytest.mark.parametrize("m", [0, -1, 1.5, True, "2"])
def test_min_clients_must_be_a_positive_int(m):
    with pytest.raises(ValueError, match="min_clients"):
        screen_updates([], DIMS, 4, HEAD, min_clients=m)


def test_screening_defaults_are_independent():
    a, b = Screening(), Screening()
    a.accepted.append(1)
    assert b.accepted == []


def test_finite_flags_match_isfinite_on_every_kind_of_tensor():
    """The batched check: NaN and +-inf anywhere, huge finite values whose absolute sum overflows
    (still finite: must pass), empty and integer tensors, several dtypes in one call."""
    from hetlora.fl.validation import finite_flags

    g = torch.Generator().manual_seed(0)
    ts = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for bad in (None, float("nan"), float("inf"), float("-inf")):
            t = torch.randn(7, 33, generator=g).to(dtype)
            if bad is not None:
                t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = bad
            ts.append(t)
    ts.append(torch.full((1000,), 3e38))  # sum of |x| is inf, every value finite
    ts.append(torch.full((1000,), 6e4, dtype=torch.float16))  # the same in half precision
    ts += [torch.zeros(0, 5), torch.arange(6), torch.tensor([float("nan"), float("inf")])]
    flags = finite_flags(ts)
    assert [flags[id(t)] for t in ts] == [bool(torch.isfinite(t).all()) for t in ts]
    assert sum(not f for f in flags.values()) == 13  # 12 planted + the last one


@pytest.mark.parametrize("norm", ["real", "nan_blind_max", "raising"])
def test_finite_flags_hold_whatever_the_multi_tensor_norm_does(monkeypatch, norm):
    """A NaN must be caught by the sum term where a device's max-norm skips NaN (as a GPU
    reduction may), and the per-tensor fallback must be right where the foreach norm is missing."""
    from hetlora.fl import validation

    real = torch._foreach_norm
    if norm == "nan_blind_max":
        def fake(ts, ord=2):
            if ord == float("inf"):
                return [torch.where(t.isnan(), 0.0, t.abs().float()).amax() for t in ts]
            return real(ts, ord)
        monkeypatch.setattr(torch, "_foreach_norm", fake)
    elif norm == "raising":
        def fake(ts, ord=2):
            raise NotImplementedError("no foreach norm for this dtype")
        monkeypatch.setattr(torch, "_foreach_norm", fake)
    ts = [torch.randn(4, 5) for _ in range(5)]
    ts[1][2, 3] = float("nan")
    ts[3][0, 0] = float("-inf")
    flags = validation.finite_flags(ts)
    assert [flags[id(t)] for t in ts] == [True, False, True, False, True]


def test_full_fine_tuning_updates_are_checked_weight_by_weight():
    def full(cid):
        u = _u(cid)
        g = torch.Generator().manual_seed(100 + cid)
        u.weights = [torch.randn(do, di, generator=g) for di, do in DIMS]
        u.biases = [torch.randn(do, generator=g) for _, do in DIMS]
        return u

    good, nan_w, inf_b, shape_w, missing = (full(i) for i in range(5))
    nan_w.weights[1][2, 0] = float("nan")
    inf_b.biases[0][1] = float("inf")
    shape_w.weights[0] = torch.zeros(5, 6)
    missing.weights = missing.weights[:1]
    s = screen_updates([good, nan_w, inf_b, shape_w, missing], DIMS, 4, HEAD, full=True)
    assert [u.client_id for u in s.accepted] == [0]
    reasons = {r["client"]: r["reason"] for r in s.rejected}
    assert reasons[1] == "layer 1: non-finite values (NaN/Inf) in the weight"
    assert reasons[2] == "layer 0: non-finite values (NaN/Inf) in the bias"
    assert reasons[3] == "layer 0: weight has shape (5, 6), expected (6, 5)"
    assert "one weight per target layer" in reasons[4]


def test_full_fine_tuning_biases_are_checked_against_the_layers():
    """A bias of the wrong shape would broadcast into the global bias; a missing one would crash
    the aggregation; a bias where the layer has none would be dropped unseen."""
    def full(cid, biases):
        u = _u(cid)
        g = torch.Generator().manual_seed(200 + cid)
        u.weights = [torch.randn(do, di, generator=g) for di, do in DIMS]
        u.biases = biases
        return u

    d0, d1 = (do for _, do in DIMS)
    ups = [full(0, [torch.zeros(d0), None]), full(1, [torch.zeros(1), None]), full(2, None),
           full(3, [torch.zeros(d0)]), full(4, [torch.zeros(d0), torch.zeros(d1)]), full(5, [None, None])]
    s = screen_updates(ups, DIMS, 4, HEAD, full=True, bias_layers=[True, False])
    assert [u.client_id for u in s.accepted] == [0]
    reasons = {r["client"]: r["reason"] for r in s.rejected}
    assert reasons[1] == f"layer 0: bias has shape (1,), expected ({d0},)"
    assert reasons[2] == reasons[5] == "layer 0: no bias, but the layer has one"
    assert reasons[3] == "full fine-tuning update with 1 biases for 2 target layers"
    assert reasons[4] == "layer 1: a bias where the layer has none"
    # without the layers' pattern, the biases given are still checked for shape
    s = screen_updates(ups[:2], DIMS, 4, HEAD, full=True)
    assert [u.client_id for u in s.accepted] == [0] and "bias has shape (1,)" in s.rejected[0]["reason"]

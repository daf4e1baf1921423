"""Screening of client updates before aggregation (DESIGN.md section 7), in one place.

The simulator (`hetlora.fl.sim`) and the Flower strategy (`hetlora.flower`) both call
`screen_updates`: every update is checked by `validate_update` (shapes, ranks within
``[1, r_max]`` and not above the rank sent, finite values, head, example count); a
rejected one is logged with the client id and the reason and left out of the round; if
fewer than ``min_clients`` remain the round is *failed* — the caller keeps the global
model unchanged and marks the round failed in its metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .strategies import ClientUpdate

__all__ = ["validate_update", "finite_flags", "Screening", "screen_updates"]

log = logging.getLogger("hetlora.fl")


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def finite_flags(tensors: Sequence[torch.Tensor]) -> dict[int, bool]:
    """``id(t) -> every value of t is finite`` for many tensors at once, with one read per device
    (a GPU round of 128 clients x 12 layers would otherwise wait for the GPU 3,000 times).

    Per (device, dtype) group two multi-tensor norms do it: the max-abs norm is inf or NaN
    where a tensor holds an inf (max never overflows), and the sum of absolute values is NaN
    where it holds a NaN (a NaN always reaches a sum; finite or infinite terms never make one).
    Empty tensors are finite; other dtypes fall back to ``isfinite(t).all()``."""
    out: dict[int, bool] = {}
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() == 0 or not t.is_floating_point():
            out[id(t)] = _all_finite(t)
        else:
            groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        try:
            inf = torch.stack(torch._foreach_norm(ts, float("inf")))
            l1 = torch.stack(torch._foreach_norm(ts, 1))
            flags = (torch.isfinite(inf) & ~torch.isnan(l1)).tolist()
        except (RuntimeError, NotImplementedError):  # a build without the foreach norm for this dtype
            flags = [_all_finite(t) for t in ts]
        out.update(zip(map(id, ts), flags))
    return out


def validate_update(
    u: ClientUpdate, dims: Sequence[tuple[int, int]], r_max: int, head_shape: tuple[int, int], full: bool = False,
    finite: Callable[[torch.Tensor], bool] = _all_finite, bias_layers: Sequence[bool] | None = None,
) -> str | None:
    """Reason why update ``u`` must be rejected (DESIGN.md section 7), or None if it is sound.

    Checks: rank in ``[1, r_max]`` and not above the rank it was given; one ``A``/``B`` per
    layer of shapes ``[rank, d_in]`` / ``[rank, d_out]``; head ``[C, d]`` / ``[C]``; FullFT
    weights ``[d_out, d_in]`` and biases ``[d_out]``, a bias exactly where ``bias_layers`` (per
    layer: the global layer has one) says, or where given if it is None; every tensor finite (by
    ``finite``: `screen_updates` passes the flags of `finite_flags`); ``num_examples >= 1``.
    """
    if isinstance(u.rank, bool) or not isinstance(u.rank, int) or not 1 <= u.rank <= r_max:
        return f"rank {u.rank!r} outside [1, {r_max}]"
    if u.rank > u.rank_received:
        return f"rank {u.rank} above the rank {u.rank_received} it was given"
    if len(u.A) != len(dims) or len(u.B) != len(dims):
        return f"expected {len(dims)} layers, got {len(u.A)} A and {len(u.B)} B"
    for i, ((d_in, d_out), a, b) in enumerate(zip(dims, u.A, u.B)):
        if tuple(a.shape) != (u.rank, d_in):
            return f"layer {i}: A has shape {tuple(a.shape)}, expected {(u.rank, d_in)}"
        if tuple(b.shape) != (u.rank, d_out):
            return f"layer {i}: B has shape {tuple(b.shape)}, expected {(u.rank, d_out)}"
        if not finite(a) or not finite(b):
            return f"layer {i}: non-finite values (NaN/Inf) in the adapter"
    if tuple(u.head_W.shape) != tuple(head_shape) or tuple(u.head_b.shape) != (head_shape[0],):
        return f"head has shapes {tuple(u.head_W.shape)}/{tuple(u.head_b.shape)}, expected {tuple(head_shape)}"
    if not finite(u.head_W) or not finite(u.head_b):
        return "non-finite values (NaN/Inf) in the classifier head"
    if full:
        if u.weights is None or len(u.weights) != len(dims):
            return "full fine-tuning update without one weight per target layer"
        for i, ((d_in, d_out), w) in enumerate(zip(dims, u.weights)):
            if tuple(w.shape) != (d_out, d_in):
                return f"layer {i}: weight has shape {tuple(w.shape)}, expected {(d_out, d_in)}"
            if not finite(w):
                return f"layer {i}: non-finite values (NaN/Inf) in the weight"
        biases = u.biases if u.biases is not None else [None] * len(dims)
        if len(biases) != len(dims):
            return f"full fine-tuning update with {len(biases)} biases for {len(dims)} target layers"
        for i, ((_, d_out), bvec) in enumerate(zip(dims, biases)):
            if bias_layers is not None and (bvec is not None) != bool(bias_layers[i]):
                return (f"layer {i}: a bias where the layer has none" if bvec is not None
                        else f"layer {i}: no bias, but the layer has one")
            if bvec is None:
                continue
            if tuple(bvec.shape) != (d_out,):
                return f"layer {i}: bias has shape {tuple(bvec.shape)}, expected {(d_out,)}"
            if not finite(bvec):
                return f"layer {i}: non-finite values (NaN/Inf) in the bias"
    if not isinstance(u.num_examples, int) or u.num_examples < 1:
        return f"num_examples {u.num_examples!r} must be a positive int"
    if not math.isfinite(u.scaling) or u.scaling <= 0:
        return f"scaling {u.scaling!r} must be finite and positive"
    return None



@dataclass
class Screening:
    """Result of `screen_updates`.

    accepted: the sound updates, in arrival order.  rejected: ``[{"client": id, "reason": str}]``.
    failed: fewer than ``min_clients`` updates were accepted: aggregate nothing this round.
    """

    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failed: bool = False
    min_clients: int = 1

    def metrics(self) -> dict:
        """The fields every round record carries: num_accepted, num_rejected, rejected, failed."""
        return {"num_accepted": len(self.accepted), "num_rejected": len(self.rejected),
                "rejected": list(self.rejected), "failed": self.failed}


def _tensors(u: ClientUpdate) -> list[torch.Tensor]:
    """Every tensor an update carries; none for one that cannot be read (`validate_update`
    then says why), and anything that is not a tensor is skipped."""
    try:
        parts = (u.A, u.B, [u.head_W], [u.head_b], u.weights, u.biases)
        return [t for part in parts if isinstance(part, (list, tuple)) for t in part if isinstance(t, torch.Tensor)]
    except Exception:
        return []


def _client_id(u: object) -> int | str:
    cid = getattr(u, "client_id", "?")
    return int(cid) if isinstance(cid, int) and not isinstance(cid, bool) else repr(cid)


def screen_updates(
    updates: Sequence[ClientUpdate],
    dims: Sequence[tuple[int, int]],
    r_max: int,
    head_shape: tuple[int, int],
    *,
    full: bool = False,
    min_clients: int = 1,
    round_idx: int | None = None,
    errors: Sequence[tuple[int | str, str]] = (),
    bias_layers: Sequence[bool] | None = None,
) -> Screening:
    """Split ``updates`` into accepted and rejected ones (never raises on a bad update).

    Args:
        updates: the clients' replies (anything; non-`ClientUpdate` objects are rejected).
        dims: per target layer ``(d_in, d_out)``.  r_max: the largest rank a client may send.
        head_shape: ``(C, d)`` of the classifier head.  full: FullFT updates (full weights).
        min_clients: the round fails when fewer than this many updates are accepted.
        round_idx: only for the log lines.
        errors: ``(client id, reason)`` of clients that sent no update at all (a crashed
            client, a Flower error reply): counted as rejected with that reason.
        bias_layers: with ``full``, per target layer whether the global layer has a bias (an
            update must carry one exactly there); None checks only the biases given.
    """
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ValueError(f"min_clients must be an int >= 1, got {min_clients!r}")
    out = Screening(min_clients=min_clients)
    where = f"round {round_idx}: " if round_idx is not None else ""
    for cid, reason in errors:
        out.rejected.append({"client": cid, "reason": reason})
        log.warning("%sclient %s sent no update: %s", where, cid, reason)
    flags = finite_flags([t for u in updates if isinstance(u, ClientUpdate) for t in _tensors(u)])

    def finite(t: torch.Tensor) -> bool:
        hit = flags.get(id(t))
        return _all_finite(t) if hit is None else hit

    for u in updates:
        if not isinstance(u, ClientUpdate):
            reason = f"not a ClientUpdate ({type(u).__name__})"
        else:
            try:
                reason = validate_update(u, dims, r_max, head_shape, full=full, finite=finite,
                                         bias_layers=bias_layers)
            except Exception as e:  # a malformed object must not end the round either
                reason = f"malformed update: {type(e).__name__}: {e}"
        if reason is None:
            out.accepted.append(u)
        else:
            out.rejected.append({"client": _client_id(u), "reason": reason})
            log.warning("%srejected the update of client %s: %s", where, _client_id(u), reason)
    if len(out.accepted) < min_clients:
        out.failed = True
        log.warning("%sonly %d update(s) accepted, fewer than min_clients=%d: the round failed and the global "
                    "model is unchanged", where, len(out.accepted), min_clients)
    return out

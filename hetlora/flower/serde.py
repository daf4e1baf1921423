"""Tensors <-> Flower records.

Tensors travel as numpy arrays (`flwr.app.Array`) in an `ArrayRecord` under flat names
(``A.<layer>``, ``B.<layer>``, ``head_W``, ``head_b`` and, for strategies that change the
base, ``W.<layer>`` / ``bias.<layer>``); bfloat16 travels as float32 (exact both ways).
Decoding never checks shapes: that is `hetlora.fl.validation.screen_updates`' job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["to_array", "from_array", "encode_tensors", "decode_layers"]


def to_array(t: torch.Tensor) -> Array:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return Array(np.ascontiguousarray(t.numpy()))


def from_array(a: Array, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    t = torch.from_numpy(np.array(a.numpy(), copy=True))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def encode_tensors(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], head_W: torch.Tensor,
                   head_b: torch.Tensor, weights: Sequence[torch.Tensor] | None = None,
                   biases: Sequence[torch.Tensor | None] | None = None) -> ArrayRecord:
    """One `ArrayRecord` holding an adapter (any rank per record), a head and optional base weights."""
    d: dict[str, Array] = {}
    for i, (a, b) in enumerate(zip(A, B)):
        d[f"A.{i}"], d[f"B.{i}"] = to_array(a), to_array(b)
    d["head_W"], d["head_b"] = to_array(head_W), to_array(head_b)
    if weights is not None:
        for i, w in enumerate(weights):
            d[f"W.{i}"] = to_array(w)
            if biases is not None and biases[i] is not None:
                d[f"bias.{i}"] = to_array(biases[i])
    return ArrayRecord(d)


def decode_layers(rec: ArrayRecord, prefix: str, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """``rec[prefix.0], rec[prefix.1], ...`` (as many as there are) as tensors."""
    out = []
    i = 0
    while f"{prefix}.{i}" in rec:
        out.append(from_array(rec[f"{prefix}.{i}"], dtype, device))
        i += 1
    return out


def decode_tensors(rec: ArrayRecord, dtype: torch.dtype, device) -> dict:
    """The inverse of `encode_tensors`: ``{"A", "B", "head_W", "head_b", "weights", "biases"}``
    (``weights``/``biases`` None when the record carries no full weights)."""
    W = decode_layers(rec, "W", dtype, device) or None
    bias = None
    if W is not None:
        bias = [from_array(rec[f"bias.{i}"], dtype, device) if f"bias.{i}" in rec else None for i in range(len(W))]
    return {"A": decode_layers(rec, "A", dtype, device), "B": decode_layers(rec, "B", dtype, device),
            "head_W": from_array(rec["head_W"], dtype, device), "head_b": from_array(rec["head_b"], dtype, device),
            "weights": W, "biases": bias}

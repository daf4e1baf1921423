"""Atomic checkpoints of a simulation: safetensors for tensors, JSON for the rest.

Layout under ``<run_dir>/checkpoints/``:

* ``round_<NNNN>.safetensors``: the global state's tensors (global adapter per layer
  ``A.<i> [r_g, d_in]`` / ``B.<i> [r_g, d_out]``, ``head_W [C, d]``, ``head_b [C]``, and
  ``W.<i>`` / ``bias.<i>`` when the strategy changes the base), ``client_ranks [N]``
  int64 and ``torch_rng`` uint8 (torch's CPU generator state);
* ``latest.json``: ``{"round", "file", "state": GlobalState.meta(), "numpy_rng",
  "python_rng", "extra"}`` -- written after the tensor file, so it only ever names a
  complete one.

Every file is written to a temporary name in the same folder, fsync'ed, then
``os.replace``'d (atomic on POSIX): a run killed at any moment leaves the previous
checkpoint intact.  Nothing is unpickled on load (safetensors + JSON only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write, atomic_write_bytes
from .strategies import GlobalState

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "CKPT_DIR"]

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


def _np_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _py_state() -> list:
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def save_checkpoint(run_dir: str | Path, round_idx: int, state: GlobalState, client_ranks: np.ndarray,
                    extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write the checkpoint of the state after round ``round_idx``; returns the tensor file.

    ``client_ranks``: ``[N]`` ints, every client's current rank.  ``extra``: JSON-able.
    Older checkpoints beyond the last ``keep`` are removed.
    """
    d = Path(run_dir) / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.tensors().items()}
    tensors["client_ranks"] = torch.as_tensor(np.asarray(client_ranks, dtype=np.int64))
    tensors["torch_rng"] = torch.get_rng_state()
    fname = f"round_{round_idx:04d}.safetensors"
    atomic_write(d / fname, lambda tmp: save_file(tensors, tmp, metadata={"round": str(round_idx)}))
    meta = {"round": round_idx, "file": fname, "state": state.meta(), "numpy_rng": _np_state(),
            "python_rng": _py_state(), "extra": extra or {}}
    atomic_write_bytes(d / LATEST, json.dumps(meta).encode())
    files = sorted(d.glob("round_*.safetensors"))
    for old in files[:-keep] if keep > 0 else []:
        if old.name != fname:
            old.unlink(missing_ok=True)
    return d / fname


def load_checkpoint(run_dir: str | Path, restore_rng: bool = True,
                    device: str | torch.device = "cpu") -> tuple[int, GlobalState, np.ndarray, dict] | None:
    """``(round, state, client_ranks, extra)`` of the latest checkpoint, or None if there is none.

    With ``restore_rng`` the torch / numpy / python global RNG states are restored too.
    """
    d = Path(run_dir) / CKPT_DIR
    latest = d / LATEST
    if not latest.exists():
        stray = sorted(d.glob("round_*.safetensors")) if d.is_dir() else []
        if stray:
            # round files without their index: starting over would silently discard them
            raise ValueError(
                f"checkpoint index {latest} is missing but {d} holds {len(stray)} round file(s) "
                f"(latest {stray[-1].name}); restore {LATEST} or remove the directory to start over"
            )
        return None
    try:
        meta = json.loads(latest.read_text())
        fname = meta["file"]
        if not isinstance(fname, str) or Path(fname).name != fname:
            raise ValueError(f"'file' must be a file name in {d}, got {fname!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint index {latest} is unreadable or corrupt ({e}); "
                         f"the tensor files in {d} are kept") from None
    try:
        # cloned: load_file may map the file, and the run must not depend on it staying put
        t = {k: v.clone() for k, v in load_file(str(d / fname), device="cpu").items()}
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError)
        raise ValueError(f"checkpoint {d / fname} is unreadable, truncated or not a safetensors file ({e}); "
                         f"an earlier round_*.safetensors in {d} may still be usable") from None
    ranks = t.pop("client_ranks").numpy().astype(np.int64)
    rng = t.pop("torch_rng")
    state = GlobalState.from_tensors({k: v.to(device) for k, v in t.items()}, meta["state"])
    if restore_rng:
        torch.set_rng_state(rng)
        n = meta["numpy_rng"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached"]))
        v, internal, gauss = meta["python_rng"]
        random.setstate((v, tuple(internal), gauss))
    return int(meta["round"]), state, ranks, meta.get("extra", {})

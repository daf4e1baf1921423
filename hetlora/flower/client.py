"""The node side: local training with the simulator's own code.

A train message carries the node's adapter rows (``ArrayRecord`` "adapter": rank ``r``
``A``/``B`` per layer, the global head and, for FLoRA/FullFT, the base weights) and its task
(``ConfigRecord`` "task": client id, rank, scaling, steps, round, the run's `FedConfig` as
JSON).  The node builds (once per process, cached) the run's model and data exactly as
`hetlora.fl.sim.Simulation.setup` does, takes its partition ``data.clients[client id]`` and
runs `hetlora.fl.local.train_round` on that single task (sequential mode: the same
mini-batches, regulariser and self-pruning as ``hetlora simulate --mode sequential``).
The reply is the trained adapter at its (possibly pruned) rank, the head, and metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from hetlora.fl.config import FedConfig
from hetlora.fl.local import ClientTask, train_round
from hetlora.fl.sim import Simulation
from hetlora.fl.strategies import ClientUpdate, Distribution, GlobalState, make_strategy
from hetlora_kernels import AdapterLayout

from .serde import decode_tensors, encode_tensors

__all__ = ["node_info", "train_on_node", "local_simulation"]

log = logging.getLogger("hetlora.flower")

#: the FedConfig fields that determine the model and the data a node builds
_SETUP_FIELDS = ("model", "task", "dataset", "text_column", "label_column", "test_fraction", "max_length",
                 "num_clients", "partition", "dirichlet_alpha", "holdout_fraction", "eval_samples", "seed",
                 "target_modules", "lora_dropout", "dtype", "device", "threads", "r_min", "r_max")

_CACHE: dict[str, Simulation] = {}
# cached models whose base weights a message replaced (FLoRA, full fine-tuning): a later message
# without base weights (another strategy's run in the same process) must get the pristine base
_BASE_REPLACED: set[str] = set()


def local_simulation(cfg: FedConfig, *, pristine_base: bool = False) -> Simulation:
    """The set-up `Simulation` (model + data) of ``cfg`` for this process, built once and cached;
    rebuilt when ``pristine_base`` is asked for and a message has replaced the cached base weights."""
    key = json.dumps({k: getattr(cfg, k) for k in _SETUP_FIELDS}, sort_keys=True)
    sim = _CACHE.get(key)
    if sim is not None and pristine_base and key in _BASE_REPLACED:
        sim = None
    if sim is None:
        sim = Simulation(cfg.replace(progress=False, plots=False), verbose=False)
        sim.setup()
        _CACHE.clear()  # one run's model and data per process
        _BASE_REPLACED.clear()
        _CACHE[key] = sim
    if not pristine_base:
        _BASE_REPLACED.add(key)
    return sim


def _int_or_none(v) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


def declared_rank(node_config) -> int | None:
    """The rank a node declares in its ``node_config`` (``rank=...``), or None: none given, or one
    that is not a positive int (then the server's rank rule gives the rank, and this says so)."""
    raw = node_config.get("rank")
    if raw is None:
        return None
    r = _int_or_none(raw)
    if r is None or r < 1:
        log.warning("node_config rank=%r is not a positive int: the server's rank rule gives this node its rank",
                    raw)
        return None
    return r


def node_info(context: Context) -> ConfigRecord:
    """What the server needs from ``node_config``: partition-id, num-partitions, declared rank (and,
    for the server's log, a declared rank that is not a positive int, as ``rank-invalid``)."""
    nc = context.node_config
    out = ConfigRecord()
    for key in ("partition-id", "num-partitions"):
        v = _int_or_none(nc.get(key))
        if v is not None:
            out[key] = v
    r = declared_rank(nc)
    if r is not None:
        out["rank"] = r
    elif nc.get("rank") is not None:
        out["rank-invalid"] = str(nc.get("rank"))
    return out


class _Preset:
    """The wrapped strategy with ``distribute`` answering what the server sent."""

    def __init__(self, strategy, dist: Distribution) -> None:
        self._strategy, self._dist = strategy, dist

    def distribute(self, state, client_ids, ranks, round_idx) -> Distribution:
        return self._dist

    def __getattr__(self, name):
        return getattr(self._strategy, name)


def train_on_node(msg: Message, context: Context,
                  update_hook: Callable[[int, ClientUpdate, Context], ClientUpdate] | None = None) -> Message:
    """Handle one train message (see the module docstring); raises on a task this node cannot do
    (Flower turns that into an error reply, which the server drops and counts)."""
    task = msg.content["task"]
    cfg = FedConfig.from_json(str(task["fedconfig"]))
    nc = context.node_config
    if isinstance(nc.get("device"), str) and nc["device"]:
        cfg = cfg.replace(device=str(nc["device"]))
    cfg = cfg.replace(mode="sequential", progress=False, plots=False)
    cid, r, rnd = int(task["client-id"]), int(task["rank"]), int(task["round"])
    pid = _int_or_none(nc.get("partition-id"))
    if pid is not None and pid != cid:
        raise ValueError(f"this node holds partition {pid}, the server sent a task for client {cid}")
    declared = declared_rank(nc)
    if declared is not None and r > declared:
        raise ValueError(f"this node declared rank {declared}, the server sent rank {r}")
    arr = msg.content["adapter"]
    sim = local_simulation(cfg, pristine_base="W.0" not in arr)
    fm = sim.fm
    t_ = decode_tensors(arr, fm.dtype, fm.device)
    A, B, head_W, head_b, W, bias = t_["A"], t_["B"], t_["head_W"], t_["head_b"], t_["weights"], t_["biases"]
    scaling = float(task["scaling"])
    state = GlobalState(A, B, scaling, head_W, head_b, W, bias)
    dist = Distribution(A, B, AdapterLayout([r]), [scaling], [int(task.get("params-down", 0))])
    tr, ho = sim.data.clients[cid]
    t = ClientTask(cid, r, tr, ho, int(task["steps"]))
    strategy = _Preset(make_strategy(cfg), dist)
    updates, _ = train_round(fm, strategy, state, [t], sim.data.train, cfg, rnd, local_eval=bool(task["local-eval"]))
    u = updates[0]
    if update_hook is not None:
        u = update_hook(rnd, u, context)
    rec = encode_tensors(u.A, u.B, u.head_W, u.head_b, u.weights, u.biases)
    met = MetricRecord({"client-id": cid, "rank": int(u.rank), "rank-received": int(u.rank_received),
                        "num-examples": int(u.num_examples), "train-loss": float(u.train_loss),
                        "scaling": float(u.scaling), "local-n": int(u.local_n)})
    if u.local_acc is not None:
        met["local-acc"] = float(u.local_acc)
    return Message(RecordDict({"update": rec, "metrics": met}), reply_to=msg)

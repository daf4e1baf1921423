"""`FlowerStrategy`: a Flower (Message API) server strategy around any `hetlora.fl` strategy.

One round, exactly as `hetlora.fl.sim.Simulation.run_round` does it, with Flower carrying
the messages:

1. ``configure_train``: every node not seen before is asked (a ``query`` message) for its
   ``node_config`` (before round 1 the server waits for ``min_nodes`` nodes):
   ``partition-id`` maps the node to the simulator's client id and an optional ``rank`` is
   the rank that device declares (real heterogeneous devices; otherwise the server's
   ``rank_rule`` gives it).  Then the round
   samples the *same client ids* as ``Simulation.sample_clients(round)``, distributes the
   global adapter with the wrapped strategy (HetLoRA: truncation to each client's rank)
   and sends every node its own rows, its rank and its task (a `ConfigRecord`).
2. ``aggregate_train``: every reply is decoded into a `ClientUpdate` whose client id,
   received rank and scaling come from the server's own bookkeeping (never from the reply); error
   replies, replies that never came, malformed replies and updates that fail
   `hetlora.fl.validation.screen_updates` (NaN/Inf, wrong shapes or ranks) are dropped,
   logged with the node id and the reason and counted; if at least ``min_clients``
   remain, the wrapped strategy's ``aggregate`` forms the new global state, else the
   round is failed and the global model unchanged.  The global model is evaluated on the
   global test set and the round's record (the simulator's metrics.jsonl format plus
   ``nodes`` and ``num_replies``) is appended to ``<run_dir>/metrics.jsonl``.

The global state lives in the strategy (``self.sim.state``); the `ArrayRecord` Flower
passes between rounds is only a copy of it for Flower's own bookkeeping.  The number of
training examples a node reports weights its update, as the partition size does in the
simulator: on a real deployment that number is the node's word.  Client-level differential
privacy (``FedConfig.dp_clip``) works as in the simulator: the server half of a round is
`Simulation.conclude_round`, the same code.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
import traceback
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as _FlwrStrategy

from hetlora.fl.checkpoint import atomic_write_bytes, save_checkpoint
from hetlora.fl.config import FedConfig
from hetlora.fl.determinism import deterministic_algorithms
from hetlora.fl.sim import Simulation
from hetlora.fl.strategies import ClientUpdate

from .serde import decode_tensors, encode_tensors

__all__ = ["FlowerStrategy"]

log = logging.getLogger("hetlora.flower")


class FlowerStrategy(_FlwrStrategy):
    """Run ``config.strategy`` (any `hetlora.fl` strategy, HetLoRA by default) on Flower.

    Args:
        config: the `FedConfig` of the run (the same one ``hetlora simulate`` takes).
        sim: an optional already set-up `Simulation` of ``config`` (tests); by default one is
            built here (model, data, ranks, initial global state).
        min_nodes: nodes to wait for before round 1 (default ``config.num_clients``).
        node_wait_s: how long to wait for them; afterwards the run goes on with the nodes
            that came (a sampled client with no node counts as a failed client).
        write_outputs: write ``config.json``, ``metrics.jsonl``, checkpoints and (in
            `finish`) the global peft adapter into ``config.run_dir``.
        resume: continue the run in ``config.run_dir`` after its latest checkpoint (the global
            state, every client's rank, the ranks nodes declared, the metrics so far), as
            ``hetlora simulate --resume`` does: Flower's rounds 1, 2, ... are then rounds
            last + 1, last + 2, ... of the run, which ends at ``config.rounds`` as before.
            Without a checkpoint the run starts from round 1.
        overwrite: replace an earlier run in ``config.run_dir`` (deleted first); without it, or
            ``resume``, a run directory that holds a run is refused before anything is loaded.
    """

    def __init__(self, config: FedConfig, *, sim: Simulation | None = None, min_nodes: int | None = None,
                 node_wait_s: float = 120.0, write_outputs: bool = True, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.config = config.validate()
        if sim is None:
            sim = Simulation(config, verbose=False)
        # as hetlora simulate: a run directory holding a run is refused unless resumed or replaced
        earlier = sim.check_run_dir(resume, overwrite) if write_outputs else False
        if sim.state is None:
            sim.setup()
        if earlier and overwrite:
            shutil.rmtree(config.run_dir)
        self.sim = sim
        self.min_nodes = config.num_clients if min_nodes is None else int(min_nodes)
        self.node_wait_s = float(node_wait_s)
        self.write_outputs = write_outputs
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.client_of: dict[int, int] = {}  # node id -> client id
        self.declared_ranks: dict[int, int] = {}  # client id -> rank its node declared
        self._asked: set[int] = set()  # nodes asked for their node_config
        self._discovered = False
        self.records: list[dict] = []
        self._pending: dict[int, dict] = {}
        self._cum = {"elapsed": 0.0, "up": 0, "down": 0}
        self.round_offset = 0  # rounds done before this process (resume)
        if resume:
            last, self.records, extra = sim.restore()
            self.round_offset = last
            # a rank a node declared was applied once, in the first run: pruning may have lowered it since
            self.declared_ranks = {int(k): int(v) for k, v in (extra.get("declared_ranks") or {}).items()}
            if self.records:
                r = self.records[-1]
                self._cum = {"elapsed": float(r.get("elapsed", 0.0)), "up": int(r.get("cum_bytes_up", 0)),
                             "down": int(r.get("cum_bytes_down", 0))}
            log.info("resuming %s after round %d", config.name, last)
        if write_outputs:
            d = config.run_dir
            sim.write_run_files()
            atomic_write_bytes(d / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records).encode())
            self._status("running")

    def _status(self, status: str, **extra) -> None:
        """``<run_dir>/status.json``: running, finished or failed (with the error).  `flwr run`
        exits 0 even when the ServerApp raised (Flower 1.42), so a script checks this file."""
        if not self.write_outputs:
            return
        done = self.records[-1]["round"] if self.records else 0
        rec = {"status": status, "rounds_done": done, "rounds": self.config.rounds,
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
        atomic_write_bytes(self.config.run_dir / "status.json", (json.dumps(rec, indent=1) + "\n").encode())

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def state(self):
        return self.sim.state

    def global_arrays(self) -> ArrayRecord:
        """The global state as an `ArrayRecord` (adapter, head and, if any, base weights)."""
        s = self.sim.state
        return encode_tensors(s.A, s.B, s.head_W, s.head_b, s.base_weights, s.base_biases)

    def summary(self) -> None:
        cfg = self.config
        log.info("FlowerStrategy(%s): %d clients, %d per round, ranks in [%d, %d], %d rounds", cfg.strategy,
                 cfg.num_clients, cfg.clients_per_round, cfg.r_min, cfg.r_max, cfg.rounds)

    def discover(self, grid: Grid, wait: bool = True) -> None:
        """Ask every connected node not asked yet for its partition-id (-> client id) and declared rank.

        With ``wait`` (before round 1) first wait up to ``node_wait_s`` for ``min_nodes`` nodes.
        A partition whose node is gone moves to the new node that claims it (a reconnected
        SuperNode gets a new node id); a rank a node declares is taken once per partition.
        """
        t0 = time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids())
            if not wait or len(nodes) >= self.min_nodes or time.monotonic() - t0 > self.node_wait_s:
                break
            log.info("waiting for nodes: %d of %d connected", len(nodes), self.min_nodes)
            time.sleep(1.0)
        alive = set(nodes)
        new = [n for n in nodes if n not in self._asked]
        self._asked.update(new)
        if not new:
            return
        msgs = [Message(RecordDict({"query": ConfigRecord({"want": "node-config"})}), n, MessageType.QUERY)
                for n in new]
        replies = grid.send_and_receive(msgs, timeout=max(self.node_wait_s, 30.0))
        cfg = self.config
        for m in replies:
            node = int(m.metadata.src_node_id)
            if m.has_error():
                log.warning("node %d did not say its node_config: %s", node, m.error.reason)
                continue
            try:
                info = m.content["node"]
                pid = int(info["partition-id"])
            except Exception as e:  # a node with no partition-id cannot be mapped to a client
                log.warning("node %d has no usable partition-id (%s): it is not used", node, e)
                continue
            if not 0 <= pid < cfg.num_clients:
                log.warning("node %d: partition-id %d outside [0, %d): it is not used", node, pid, cfg.num_clients)
                continue
            old = self.node_of.get(pid)
            if old is not None and old != node:
                if old in alive:
                    log.warning("node %d: partition-id %d is already node %d's: it is not used", node, pid, old)
                    continue
                log.info("partition-id %d moved from node %d (gone) to node %d", pid, old, node)
                self.client_of.pop(old, None)
            self.node_of[pid], self.client_of[node] = node, pid
            if "rank-invalid" in info:
                log.warning("node %d declared rank=%r, not a positive int: the rank rule's rank is used", node,
                            info["rank-invalid"])
            if "rank" in info and pid not in self.declared_ranks:
                r = int(info["rank"])
                if r < 1:
                    log.warning("node %d declared rank %d < 1: the rank rule's rank is used", node, r)
                    continue
                if r > cfg.r_max:
                    log.warning("node %d declared rank %d > r_max=%d: it trains at r_max", node, r, cfg.r_max)
                    r = cfg.r_max
                if r < cfg.r_min:  # the device's limit wins (a node refuses a rank above it); pruning
                    # never lowers it further, nor raises it to r_min
                    log.warning("node %d declared rank %d < r_min=%d: it trains at rank %d", node, r, cfg.r_min, r)
                self.declared_ranks[pid] = r
                self.sim.client_ranks[pid] = self.sim.strategy.client_rank(r)
        missing = sorted(set(range(cfg.num_clients)) - set(self.node_of))
        log.info("%d node(s) mapped to clients%s", len(self.node_of),
                 f"; no node for client(s) {missing}" if missing else "")

    # -- Flower's hooks ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample the simulator's clients for ``server_round`` and send each node its adapter rows,
        rank and task.  ``arrays`` is ignored: the global state is ``self.sim.state``."""
        server_round += self.round_offset
        t0 = time.perf_counter()
        self.discover(grid, wait=not self._discovered)  # later rounds: only nodes that joined since
        self._discovered = True
        sim, cfg, strat = self.sim, self.config, self.sim.strategy
        chosen = [int(c) for c in sim.sample_clients(server_round)]
        alive = set(grid.get_node_ids())
        ids, ranks, steps, nodes, no_node = [], [], [], [], []
        for c in chosen:
            node = self.node_of.get(c)
            if node is None or node not in alive:
                no_node.append(c)
                continue
            tr, _ = sim.data.clients[c]
            ids.append(c)
            ranks.append(int(min(strat.client_rank(int(sim.client_ranks[c])), max(strat.global_rank, 1))))
            steps.append(sim._steps(len(tr)))
            nodes.append(node)
        is_eval = server_round % cfg.eval_every == 0 or server_round == cfg.rounds
        messages = []
        down = {}
        if ids:
            with deterministic_algorithms(cfg.deterministic):  # as the simulator's rounds run it
                dist = strat.distribute(sim.state, ids, ranks, server_round)
            state = sim.state
            cfg_json = cfg.to_json()
            for j, (c, r, n, node) in enumerate(zip(ids, ranks, steps, nodes)):
                rows = dist.layout.rows(j)
                A_j, B_j = [a[rows] for a in dist.A], [b[rows] for b in dist.B]
                arr = encode_tensors(A_j, B_j, state.head_W, state.head_b, state.base_weights, state.base_biases)
                task = ConfigRecord({"client-id": c, "rank": r, "scaling": float(dist.scalings[j]), "steps": n,
                                     "round": server_round, "local-eval": bool(is_eval),
                                     "params-down": int(dist.params_down[j]), "fedconfig": cfg_json})
                for k, v in config.items():  # Flower's own train_config rides along
                    if k not in task:
                        task[k] = v
                messages.append(Message(RecordDict({"adapter": arr, "task": task}), node, MessageType.TRAIN))
                # what this message carries (head excluded), which on Flower can be more than the
                # strategy's count: FLoRA's clients are sent the merged target weights, not the
                # stacked modules the simulator counts (they would merge those themselves)
                down[c] = sum(t.numel() for t in (*A_j, *B_j, *(state.base_weights or ()),
                                                  *(b for b in state.base_biases or () if b is not None)))
        # the grid gives each message its id when it pushes it: replies are matched by that id later
        self._pending[server_round] = {"t0": t0, "chosen": chosen, "ids": ids, "ranks": dict(zip(ids, ranks)),
                                       "scalings": {c: float(dist.scalings[j]) for j, c in enumerate(ids)},
                                       "nodes": dict(zip(nodes, ids)), "no_node": no_node, "down": down,
                                       "is_eval": is_eval, "sent": list(zip(messages, nodes, ids))}
        log.info("round %d: sent %d client(s) %s with ranks %s", server_round, len(ids), ids, ranks)
        return messages

    def _decode(self, msg: Message, cid: int, rank_sent: int, scaling_sent: float) -> ClientUpdate:
        """The reply's update; the client id, the rank it was given and its scaling come from the
        server's own bookkeeping, not from the reply (a node reporting another scaling would move
        HetLoRA's sparsity weights without changing its factors)."""
        fm = self.sim.fm
        rec = msg.content["update"]
        met = msg.content["metrics"]
        t = decode_tensors(rec, fm.dtype, fm.device)
        rank = met["rank"]
        rank = int(rank) if isinstance(rank, (int, float)) and float(rank).is_integer() else rank
        local_acc = float(met["local-acc"]) if "local-acc" in met else None
        return ClientUpdate(
            client_id=cid, rank=rank, rank_received=rank_sent, A=t["A"], B=t["B"], scaling=scaling_sent,
            head_W=t["head_W"], head_b=t["head_b"], num_examples=int(met["num-examples"]), weights=t["weights"],
            biases=t["biases"], train_loss=float(met["train-loss"]),
            local_acc=local_acc, local_n=int(met.get("local-n", 0)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                     MetricRecord | None]:
        """Screen the replies, aggregate the sound ones with the wrapped strategy, evaluate, record."""
        server_round += self.round_offset
        sim, cfg = self.sim, self.config
        pend = self._pending.pop(server_round, None)
        if pend is None:  # called without configure_train (should not happen)
            pend = {"t0": time.perf_counter(), "chosen": [], "ids": [], "ranks": {}, "scalings": {}, "nodes": {},
                    "no_node": [], "down": {}, "is_eval": True}
        replies = list(replies)
        errors: list[tuple[int | str, str]] = []
        for c in pend["no_node"]:
            errors.append((c, "no connected node has this partition-id"))
        updates: list[ClientUpdate] = []
        seen: set[int] = set()
        node_of_update: dict[int, int] = {}
        # a reply answers the message whose id it names (an error reply for a node that is gone comes
        # from the SuperLink, not from the node); without message ids (in-process grids), by sender
        by_id = {m.metadata.message_id: (node, cid) for m, node, cid in pend.get("sent", ())
                 if m.metadata.message_id}
        for m in replies:
            sender = int(m.metadata.src_node_id)
            node, cid = by_id.get(m.metadata.reply_to_message_id, (sender, pend["nodes"].get(sender)))
            if cid is None or cid in seen:
                log.warning("round %d: ignored an unexpected reply from node %d", server_round, sender)
                continue
            seen.add(cid)
            node_of_update[cid] = node
            if m.has_error():
                reason = str(m.error.reason).strip().splitlines()
                errors.append((cid, f"node {node}: error reply (code {m.error.code}): "
                                    f"{reason[-1] if reason else ''}"[:500]))
                continue
            try:
                updates.append(self._decode(m, cid, pend["ranks"][cid], pend["scalings"][cid]))
            except Exception as e:
                errors.append((cid, f"node {node}: malformed reply: {type(e).__name__}: {e}"[:500]))
        for node, cid in pend["nodes"].items():
            if cid not in seen:
                errors.append((cid, f"node {node}: no reply (lost or timed out)"))
        # the sampled clients' order, whatever order the replies came in: aggregation sums in this order,
        # as the simulator does, so the global adapter does not depend on which node answered first
        order = {c: i for i, c in enumerate(pend["chosen"])}
        updates.sort(key=lambda u: order.get(u.client_id, len(order)))
        errors.sort(key=lambda e: order.get(e[0], len(order)) if isinstance(e[0], int) else len(order))

        # the simulator's own server half: screening, aggregation (or client-level DP), evaluation
        rec = sim.conclude_round(server_round, pend["chosen"], pend["ranks"], updates, pend["down"], pend["is_eval"],
                                 pend["t0"], errors=errors)
        rec["engine"] = "flower"
        rec["nodes"] = {int(c): int(n) for n, c in pend["nodes"].items()}
        rec["num_replies"] = len(replies)
        for rej in rec["rejected"]:
            c = rej["client"]
            node = node_of_update.get(c, self.node_of.get(c) if isinstance(c, int) else None)
            rej["node"] = node
            log.warning("round %d: dropped node %s (client %s): %s", server_round, node, c, rej["reason"])
        self._cum["elapsed"] += rec["wall_time"]
        self._cum["up"] += rec["bytes_up_total"]
        self._cum["down"] += rec["bytes_down_total"]
        rec["elapsed"], rec["cum_bytes_up"], rec["cum_bytes_down"] = (self._cum["elapsed"], self._cum["up"],
                                                                       self._cum["down"])
        self.records.append(rec)
        log.info("round %d: %d replies, %d accepted, %d rejected%s%s", server_round, len(replies),
                 rec["num_accepted"], rec["num_rejected"],
                 " ROUND FAILED (global model unchanged)" if rec["failed"] else "",
                 (f", global test acc {rec['eval_acc']:.3f} loss {rec['eval_loss']:.3f}" if "eval_acc" in rec else "")
                 + (f" ppl {rec['eval_ppl']:.2f}" if "eval_ppl" in rec else ""))
        if self.write_outputs:
            d = cfg.run_dir
            with open(d / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if (cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0) or server_round == cfg.rounds:
                save_checkpoint(d, server_round, sim.state, sim.client_ranks,
                                {"strategy": cfg.strategy, "engine": "flower",
                                 "declared_ranks": {str(k): v for k, v in self.declared_ranks.items()}})
        metrics = {"num-replies": len(replies), "num-accepted": rec["num_accepted"],
                   "num-rejected": rec["num_rejected"], "failed": int(rec["failed"])}
        for k in ("train_loss", "eval_acc", "eval_loss", "eval_ppl"):
            if rec.get(k) is not None:
                metrics[k.replace("_", "-")] = float(rec[k])
        return self.global_arrays(), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the global model is evaluated on the server's test set."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # -- after the run ------------------------------------------------------------------------------
    def finish(self) -> None:
        """Export the global adapter (peft directory + head) into ``<run_dir>/adapters/global``."""
        if not self.write_outputs:
            return
        try:
            p = self.sim.export_global(self.config.run_dir / "adapters" / "global")
            log.info("global adapter written to %s", p.resolve())
        except Exception as e:  # an export is a convenience: never lose a finished run to it
            log.warning("adapter export failed: %s", e)

    def run(self, grid: Grid, timeout: float = 3600.0):
        """The rounds left (all ``config.rounds``, or those after a resumed checkpoint) through
        Flower's `Strategy.start`, then `finish`."""
        left = self.config.rounds - self.round_offset
        res = None
        try:
            if left > 0:
                res = self.start(grid, initial_arrays=self.global_arrays(), num_rounds=left, timeout=timeout)
            else:
                log.info("%s: all %d rounds already done", self.config.name, self.config.rounds)
            self.finish()
        except BaseException as e:
            self._status("failed", error=f"{type(e).__name__}: {e}",
                         traceback="".join(traceback.format_exception(e))[-4000:])
            raise
        self._status("finished")
        return res


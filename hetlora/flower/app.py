"""The Flower apps: `make_server_app` (runs `FlowerStrategy`) and `make_client_app`.

Settings come from a `FedConfig` given to `make_server_app` (in-process use, tests) or,
under ``flwr run``, from the run config (``[tool.flwr.app.config]`` of the app's
pyproject.toml, overridable with ``flwr run --run-config "k=v ..."``): every key is a
`FedConfig` field with ``-`` for ``_`` (``num-clients``, ``r-max``, ...; ``ranks`` and
``target-modules`` as comma-separated strings, ``""`` for None), plus ``min-nodes``,
``node-wait-s``, ``round-timeout-s``, ``resume`` (true: continue the run in its run
directory after its latest checkpoint) and ``overwrite`` (true: replace an earlier run there)
for Flower itself.  Flower refuses run-config keys the app's pyproject.toml does not declare:
the example app declares every field.  Nodes need no settings: every
train message carries the run's `FedConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from hetlora.fl.config import FedConfig
from hetlora.fl.strategies import ClientUpdate

from .client import node_info, train_on_node
from .strategy import FlowerStrategy

__all__ = ["make_server_app", "make_client_app", "fedconfig_from_run_config", "FLOWER_KEYS"]

#: run-config keys that are not FedConfig fields: ``min-nodes`` (nodes to wait for before round
#: 1; 0 or absent: num-clients), ``node-wait-s`` (how long), ``round-timeout-s`` (per round),
#: ``resume`` (continue after the run directory's latest checkpoint), ``overwrite`` (replace an earlier run)
FLOWER_KEYS = ("min-nodes", "node-wait-s", "round-timeout-s", "resume", "overwrite")


def fedconfig_from_run_config(run_config: Mapping) -> tuple[FedConfig, dict]:
    """``(FedConfig, flower_options)`` from a Flower run config (see the module docstring).

    Raises ``ValueError`` naming an unknown key (or an invalid value, via `FedConfig`)."""
    fields = {f.name: f for f in dataclasses.fields(FedConfig)}
    d: dict = {}
    extra: dict = {}
    for key, v in run_config.items():
        if key in FLOWER_KEYS:
            extra[key] = v
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"run config: unknown key {key!r} (not a FedConfig field nor one of {list(FLOWER_KEYS)})")
        if isinstance(v, str) and v.strip() == "":
            if fields[name].default is not None:
                continue  # "" leaves a field with a default at its default
            v = None
        elif name == "ranks" and isinstance(v, str):
            try:
                v = [int(x) for x in v.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"run config: ranks must be comma-separated ints, got {v!r}") from None
        elif name == "target_modules" and isinstance(v, str):
            v = [x for x in v.replace(",", " ").split() if x]
        elif name == "tiers" and isinstance(v, str) and v.lstrip().startswith("["):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ValueError(f"run config: tiers is not valid JSON ({e}): {v!r}") from None
        d[name] = v  # tiers may also be "0.5:min,0.3:mid,0.2:max", which FedConfig reads
    return FedConfig.from_dict(d), extra


def _number(extra: Mapping, key: str, default, kind):
    """A Flower option of the run config as ``kind`` (int or float), naming the key when it is not one."""
    v = extra.get(key, default)
    try:
        out = kind(v)
    except (TypeError, ValueError):
        raise ValueError(f"run config: {key} must be a number, got {v!r}") from None
    if kind is int and not float(v) == out:
        raise ValueError(f"run config: {key} must be a whole number, got {v!r}")
    if not math.isfinite(out) or out < 0:  # a negative wait or timeout would end every round at once
        raise ValueError(f"run config: {key} must be a finite number >= 0, got {v!r}")
    return out


def _flag(v: object, key: str) -> bool:
    """A run-config boolean: true/false, 1/0 or the strings "true"/"false"/"1"/"0"."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"run config: {key} must be true or false, got {v!r}")


def _logging() -> None:
    for name in ("hetlora.flower", "hetlora.fl"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            lg.addHandler(h)
            lg.setLevel(logging.INFO)
            lg.propagate = False


def make_server_app(config: FedConfig | None = None, *, min_nodes: int | None = None, node_wait_s: float = 120.0,
                    round_timeout_s: float = 3600.0, resume: bool = False, overwrite: bool = False,
                    on_finish: Callable[[FlowerStrategy], None] | None = None) -> ServerApp:
    """A `ServerApp` running ``config.rounds`` rounds of `FlowerStrategy`.

    Args:
        config: the run's `FedConfig`; None reads it from the run config.
        min_nodes / node_wait_s: nodes to wait for before round 1, and how long.
        round_timeout_s: how long a round waits for replies.
        resume: continue the run after its latest checkpoint (`FlowerStrategy`'s ``resume``).
        overwrite: replace an earlier run in the run directory (without it, or resume, one is refused).
        on_finish: called with the strategy after the last round (tests read its state).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _logging()
        cfg, mn, wait, timeout, res, over = config, min_nodes, node_wait_s, round_timeout_s, resume, overwrite
        if cfg is None:
            cfg, extra = fedconfig_from_run_config(context.run_config)
            mn = _number(extra, "min-nodes", 0, int) or mn
            wait = _number(extra, "node-wait-s", wait, float)
            timeout = _number(extra, "round-timeout-s", timeout, float)
            res = _flag(extra.get("resume", res), "resume")
            over = _flag(extra.get("overwrite", over), "overwrite")
        strategy = FlowerStrategy(cfg, min_nodes=mn, node_wait_s=wait, resume=res, overwrite=over)
        strategy.run(grid, timeout=timeout)
        if on_finish is not None:
            on_finish(strategy)

    return app


def make_client_app(update_hook: Callable[[int, ClientUpdate, Context], ClientUpdate] | None = None) -> ClientApp:
    """A `ClientApp`: ``train`` runs `hetlora.flower.client.train_on_node`; ``query`` answers the
    node's partition-id and declared rank.  ``update_hook(round, update, context)`` may replace
    the trained update before it is sent (fault injection in tests)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_on_node(msg, context, update_hook)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"node": node_info(context)}), reply_to=msg)

    return app

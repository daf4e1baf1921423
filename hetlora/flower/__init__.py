"""Run the `hetlora.fl` strategies on Flower (flwr 1.42, Message API).

* `FlowerStrategy`: a Flower server strategy wrapping any `hetlora.fl` strategy (HetLoRA
  first).  ``configure_train`` sends every sampled node its truncated adapter and its rank;
  ``aggregate_train`` screens the heterogeneous-rank replies with the simulator's
  `hetlora.fl.validation.screen_updates` (error replies, NaN/Inf, wrong shapes or ranks are
  dropped, logged with the node id and the reason, and counted), aggregates with the
  strategy's own ``aggregate`` and evaluates on the global test set.
* `make_client_app`: a ClientApp that trains with the simulator's local-training code
  (`hetlora.fl.local.train_round`, self-pruning included) on its partition.
* `make_server_app`: the ServerApp (settings from a `FedConfig` or the run config).

Flower is optional: install it with ``pip install -e .[flower]`` (``scripts/setup.sh`` does).
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without flwr
    raise ImportError(
        "hetlora.flower needs Flower (flwr 1.42): install it with `pip install -e .[flower]` "
        "or run `scripts/setup.sh`"
    ) from e

from .app import fedconfig_from_run_config, make_client_app, make_server_app
from .strategy import FlowerStrategy

__all__ = ["FlowerStrategy", "make_client_app", "make_server_app", "fedconfig_from_run_config"]

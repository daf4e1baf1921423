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


def _ray_shadowed() -> str | None:
    """A ``ray.py`` (or ``ray/`` without the package) found before the real ray package, e.g.
    a script named ray.py beside the one that calls ``run_simulation``: Flower's simulation
    engine then fails with a confusing "partially initialized module" error."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("ray")
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin:
        return None
    path = Path(origin)
    if path.name == "__init__.py" and (path.parent / "_private").is_dir():
        return None  # the ray package itself
    return origin


if (_shadow := _ray_shadowed()) is not None:
    import warnings

    warnings.warn(
        f"{_shadow} shadows the ray package, which Flower's simulation engine imports "
        "(run_simulation would fail with 'partially initialized module ray'): rename that file",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = ["FlowerStrategy", "make_client_app", "make_server_app", "fedconfig_from_run_config"]

"""Federated fine-tuning with heterogeneous LoRA ranks: config, strategies, simulator.

``from hetlora.fl import FedConfig, Simulation``; ``Simulation(FedConfig()).run()`` is
``hetlora simulate`` with no flags (real 20 Newsgroups, MiniLM, 20 clients, mixed ranks).
"""

from .config import FedConfig
from .strategies import (
    ClientUpdate,
    FlexLoRA,
    FLoRA,
    FullFT,
    GlobalState,
    HetLoRA,
    HomLoRA,
    Strategy,
    ZeroPadAvg,
    make_strategy,
)

__all__ = [
    "FedConfig",
    "Simulation",
    "History",
    "Strategy",
    "HetLoRA",
    "HomLoRA",
    "ZeroPadAvg",
    "FLoRA",
    "FlexLoRA",
    "FullFT",
    "ClientUpdate",
    "GlobalState",
    "make_strategy",
    "FedData",
    "TokenData",
]


def __getattr__(name):
    # the simulator pulls in transformers; import it on first use only
    if name in ("Simulation", "History", "FedData"):
        from . import sim

        return getattr(sim, name)
    if name == "TokenData":
        from . import local

        return local.TokenData
    raise AttributeError(f"module 'hetlora.fl' has no attribute {name!r}")

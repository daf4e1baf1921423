"""hetlora_kernels: mixed-rank LoRA ops over a rank-major packed layout.

Tensors in, tensors out; no knowledge of models or clients (DESIGN.md section 4).
"""

from .dispatch import backend_status, get_backend, pinned_kernel_configs, set_backend, use_backend
from .layout import AdapterLayout, TokenGroups
from .lowrank import flora_stack, lowrank_svd_redistribute
from .ops import component_norms, delta_fro_norms, lora_delta, lora_linear, truncate, weighted_aggregate

__all__ = [
    "AdapterLayout",
    "TokenGroups",
    "lora_delta",
    "lora_linear",
    "component_norms",
    "delta_fro_norms",
    "weighted_aggregate",
    "truncate",
    "flora_stack",
    "lowrank_svd_redistribute",
    "set_backend",
    "get_backend",
    "use_backend",
    "backend_status",
    "pinned_kernel_configs",
]

__version__ = "0.1.0"

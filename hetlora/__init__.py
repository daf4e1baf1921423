"""hetlora: federated fine-tuning with heterogeneous LoRA ranks (HetLoRA) and its peers.

Models and federation live here; the tensor ops they call live in `hetlora_kernels`.
"""

from .layer import HetLoraLinear
from .model import MultiLoraModel

__all__ = ["HetLoraLinear", "MultiLoraModel"]
__version__ = "0.1.0"

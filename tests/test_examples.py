"""The examples run as documented (README: ``make demo``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_data import needs_minilm

ROOT = Path(__file__).resolve().parents[1]


@needs_minilm
def test_layer_demo_serves_its_exported_adapters_again(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "layer_demo.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ranks: (2, 4, 8)" in proc.stdout
    assert "from_peft ranks: (8, 2) | same outputs as before: True" in proc.stdout
    assert "merged model: BertModel | same output as adapter 2: True" in proc.stdout
    for k in range(3):
        assert (tmp_path / "runs" / f"demo_adapter_{k}" / "adapter_model.safetensors").is_file()

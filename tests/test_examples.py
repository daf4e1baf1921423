"""The examples run as documented (README: ``make demo`` and "The simulator from Python")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_data import needs_minilm, needs_orange

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


@needs_minilm
@needs_orange
def test_simulate_demo_trains_merges_and_labels(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "simulate_demo.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    accs = [float(a) for a in re.findall(r"round \d: accuracy ([0-9.]+)", proc.stdout)]
    assert len(accs) == 3 and accs[-1] > 0.15  # 20 classes: chance is 0.05
    labels = re.search(r"labels: \[(.*)\]", proc.stdout).group(1).replace("'", "").split(", ")
    names = (tmp_path / "runs" / "api_demo" / "labels.json").read_text()
    assert len(labels) == 2 and all(f'"{x}"' in names for x in labels)
    assert (tmp_path / "runs" / "api_demo" / "merged" / "model.safetensors").is_file()

"""The examples run as documented (README: ``make demo`` and "The simulator from Python")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_data import needs_minilm, needs_orange

ROOT = Path(__file__).resolve().parents[1]


def _run_example(name: str, cwd: Path) -> str:
    """Run ``examples/<name>`` offline in ``cwd``; its standard output (it must exit 0)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@needs_minilm
def test_layer_demo_serves_its_exported_adapters_again(tmp_path):
    out = _run_example("layer_demo.py", tmp_path)
    assert "ranks: (2, 4, 8)" in out
    assert "from_peft ranks: (8, 2) | same outputs as before: True" in out
    assert "merged model: BertModel | same output as adapter 2: True" in out
    for k in range(3):
        assert (tmp_path / "runs" / f"demo_adapter_{k}" / "adapter_model.safetensors").is_file()


@needs_minilm
@needs_orange
def test_simulate_demo_trains_merges_and_labels(tmp_path):
    out = _run_example("simulate_demo.py", tmp_path)
    accs = [float(a) for a in re.findall(r"round \d: accuracy ([0-9.]+)", out)]
    assert len(accs) == 3 and accs[-1] > 0.15  # 20 classes: chance is 0.05
    labels = re.search(r"labels: \[(.*)\]", out).group(1).replace("'", "").split(", ")
    names = (tmp_path / "runs" / "api_demo" / "labels.json").read_text()
    assert len(labels) == 2 and all(f'"{x}"' in names for x in labels)
    assert (tmp_path / "runs" / "api_demo" / "merged" / "model.safetensors").is_file()

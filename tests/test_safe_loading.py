"""Safe loading (DESIGN.md section 7, issue 11 item 4): nothing is unpickled from disk.

* A pickle payload put where hetlora reads a checkpoint or a peft adapter is refused and
  never executed: the payload's ``__reduce__`` writes a marker file when unpickled, and the
  marker must not exist afterwards.  Control tests show the payloads do fire when unpickled.
* A static (``ast``) scan of hetlora/ and hetlora_kernels/: no ``torch.load`` without
  ``weights_only=True``, no pickle-family imports, no ``np.load(allow_pickle=True)``, no
  unsafe ``yaml.load``.  The scanner itself is tested on sources that must be flagged.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import hetlora
import hetlora_kernels
from hetlora.fl import FedConfig, Simulation
from hetlora.fl.checkpoint import load_checkpoint

# what a refusal may raise: a clear ValueError / OSError, or safetensors' own parse error
REFUSED = (ValueError, OSError, SafetensorError)


# --------------------------------------------------------------------------------------------------
# payloads
# --------------------------------------------------------------------------------------------------
class _Bomb:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"A.0": _Bomb(marker)}, protocol=4)


def _torch_save(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"A.0": _Bomb(marker)}, buf)  # a zip with data.pkl, as torch.save writes it
    return buf.getvalue()


PAYLOADS = {"pickle": _raw_pickle, "torch.save": _torch_save}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_control_the_payloads_fire_when_unpickled(tmp_path, kind):
    """Without this the 'marker absent' assertions below would prove nothing."""
    marker = tmp_path / "marker"
    data = PAYLOADS[kind](marker)
    assert not marker.exists()
    if kind == "pickle":
        pickle.loads(data)
    else:
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.read_text() == "unpickled"


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-round run on the tiny random BERT (checkpoints after rounds 1 and 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("safe")
    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=4, clients_per_round=2, rounds=2,
                    local_steps=1, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=16, progress=False,
                    client_eval_samples=4, out_dir=str(out), run_name="run", checkpoint_every=1, export_clients=0,
                    plots=False, tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], threads=1)
    try:
        Simulation(cfg, verbose=False).run()
    finally:
        torch.set_num_threads(n)
    d = out / "run"
    assert load_checkpoint(d, restore_rng=False)[0] == 2
    return d


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_pickle_in_place_of_the_checkpoint_tensor_file_is_refused(run_dir, tmp_path, kind):
    d = _copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    (d / "checkpoints" / "round_0002.safetensors").write_bytes(PAYLOADS[kind](marker))
    with pytest.raises(REFUSED):
        load_checkpoint(d)
    assert not marker.exists(), "the checkpoint loader unpickled the payload"
    with pytest.raises(REFUSED):
        Simulation.from_run_dir(d)  # what `hetlora export` uses
    assert not marker.exists()


def test_pickle_in_place_of_latest_json_is_refused(run_dir, tmp_path):
    d = _copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    (d / "checkpoints" / "latest.json").write_bytes(_raw_pickle(marker))
    with pytest.raises(ValueError):  # json's error (or a clearer ValueError), never a load
        load_checkpoint(d)
    assert not marker.exists()


def test_pickle_named_in_latest_json_is_not_loaded(run_dir, tmp_path):
    """latest.json pointing at a .pt / .bin file next to it: still read as safetensors only."""
    d = _copy_run(run_dir, tmp_path / "run")
    marker = tmp_path / "marker"
    ck = d / "checkpoints"
    for name in ("round_0002.pt", "round_0002.bin"):
        (ck / name).write_bytes(_torch_save(marker))
        meta = json.loads((ck / "latest.json").read_text())
        (ck / "latest.json").write_text(json.dumps({**meta, "file": name}))
        with pytest.raises(REFUSED):
            load_checkpoint(d)
        assert not marker.exists(), name


# --------------------------------------------------------------------------------------------------
# peft adapters
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def mlm_and_adapter(tmp_path):
    from hetlora import MultiLoraModel
    from hetlora.fl.sim import tiny_bert

    mlm = MultiLoraModel(tiny_bert(0), ["query", "value"], [2, 3], alpha=4.0)
    for _, layer in mlm.lora_layers():
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p)
    path = mlm.export_peft(0, tmp_path / "adapter")
    return mlm, Path(path)


def _slot(mlm, k):
    return [t.clone() for _, layer in mlm.lora_layers() for t in layer.get_adapter(k)]


def test_control_a_valid_adapter_imports(mlm_and_adapter):
    mlm, path = mlm_and_adapter
    before = _slot(mlm, 1)
    mlm.import_peft(1, path, strict=True)
    after = _slot(mlm, 1)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_pickle_as_adapter_model_safetensors_is_refused(mlm_and_adapter, tmp_path, kind):
    mlm, path = mlm_and_adapter
    marker = tmp_path / "marker"
    (path / "adapter_model.safetensors").write_bytes(PAYLOADS[kind](marker))
    before = _slot(mlm, 1)
    with pytest.raises(REFUSED):
        mlm.import_peft(1, path)
    assert not marker.exists(), "import_peft unpickled the payload"
    for a, b in zip(before, _slot(mlm, 1)):  # nothing half-loaded
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_adapter_model_bin_only_is_refused(mlm_and_adapter, tmp_path, kind):
    mlm, path = mlm_and_adapter
    marker = tmp_path / "marker"
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(PAYLOADS[kind](marker))
    before = _slot(mlm, 1)
    with pytest.raises(ValueError, match=r"adapter_model\.bin"):
        mlm.import_peft(1, path)
    assert not marker.exists(), "import_peft unpickled adapter_model.bin"
    for a, b in zip(before, _slot(mlm, 1)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# static scan of the package sources
# --------------------------------------------------------------------------------------------------
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal",
                  "pickletools"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _kw_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Lines of ``source`` that could unpickle: see the module docstring."""
    tree = ast.parse(source, filename)
    alias: dict[str, str] = {}  # local name -> full dotted name (import torch as T, from torch import load)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in PICKLE_MODULES:
                    bad.append(f"{filename}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
                if root in PICKLE_MODULES or a.name in PICKLE_MODULES:
                    bad.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        full = alias.get(head, head) + ("." + rest if rest else "")
        where = f"{filename}:{node.lineno}: {name}(...)"
        if full in ("torch.load", "torch.serialization.load") and not _kw_is(node, "weights_only", True):
            bad.append(where + " without weights_only=True")
        elif full in ("numpy.load", "np.load") and not _kw_is(node, "allow_pickle", False) and any(
                k.arg == "allow_pickle" for k in node.keywords):
            bad.append(where + " with allow_pickle")
        elif full in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
            if full != "yaml.load" or loader is None or "Safe" not in (_dotted(loader) or ""):
                bad.append(where + " (use yaml.safe_load)")
        elif full in ("pandas.read_pickle", "pd.read_pickle", "torch.jit.load"):
            bad.append(where)
    return bad


@pytest.mark.parametrize("src,flagged", [
    ("import torch\ntorch.load(f)", True),
    ("import torch\ntorch.load(f, weights_only=False)", True),
    ("import torch\ntorch.load(f, weights_only=True)", False),
    ("import torch as T\nT.load(f)", True),
    ("from torch import load\nload(f)", True),
    ("from torch import load as L\nL(f, map_location='cpu')", True),
    ("import torch\ntorch.serialization.load(f)", True),
    ("import pickle", True),
    ("import pickle as p", True),
    ("from pickle import loads", True),
    ("import joblib", True),
    ("import numpy as np\nnp.load(f, allow_pickle=True)", True),
    ("import numpy as np\nnp.load(f)", False),
    ("import yaml\nyaml.load(s)", True),
    ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", False),
    ("import yaml\nyaml.safe_load(s)", False),
    ("from safetensors.torch import load_file\nload_file(p)", False),
    ("import json\njson.loads(s)", False),
])
def test_the_scanner_flags_what_it_should(src, flagged):
    assert bool(unsafe_loads(src)) is flagged, unsafe_loads(src)


def _package_sources() -> list[Path]:
    files = []
    for pkg in (hetlora, hetlora_kernels):
        root = Path(pkg.__file__).resolve().parent
        files += sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return files


def test_the_package_never_unpickles():
    files = _package_sources()
    names = {p.name for p in files}
    assert len(files) >= 15 and {"checkpoint.py", "peft_io.py", "sim.py", "ops.py"} <= names, "scanned the wrong tree"
    bad = []
    for p in files:
        bad += unsafe_loads(p.read_text(encoding="utf-8"), str(p))
    assert not bad, "possible unpickling in the package:\n" + "\n".join(bad)

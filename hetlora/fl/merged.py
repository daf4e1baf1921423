"""A run's adapter merged into its base model: one standalone directory that transformers loads
alone (`write_merged`), and the classifier that reads such a directory back (`MergedClassifier`).

Directory layout (``hetlora export --merged``)::

    config.json, model.safetensors     the base model, adapter merged (W + s BᵀA); for FLoRA and
                                       full fine-tuning also the trained target weights
    tokenizer files                    where the run's model had a tokenizer
    head.safetensors                   classification: weight [C, d], bias [C]
    hetlora_head.json                  classification: pooling, labels, max_length
    hetlora_export.json                where it came from: run, round, strategy, adapter, rank

A classification export is used as training used it: the last hidden states averaged over
the attention mask, then ``feats @ weight.T + bias`` (`MergedClassifier`).  A causal-LM
export is a plain ``AutoModelForCausalLM`` directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic import chmod_tree

if TYPE_CHECKING:
    from .sim import Simulation

HEAD_FILE = "head.safetensors"
HEAD_META = "hetlora_head.json"
EXPORT_META = "hetlora_export.json"
LABELS_FILE = "labels.json"  # written into a run directory by `Simulation` (classification)


def _prepare_out(path: Path) -> None:
    """Refuse to write over anything but an earlier merged export (nothing is lost)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"out: {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / EXPORT_META).is_file():
        raise ValueError(f"out: {str(path)!r} is a non-empty directory that holds no merged export "
                         f"({EXPORT_META}); choose a new or empty directory")


def write_merged(sim: Simulation, path: str | Path, client: int | None = None) -> Path:
    """Write the global adapter (``client=None``) or client ``client``'s adapter, merged into a
    copy of the run's base model, as a standalone directory (module docstring); returns it.

    The merge happens on a copy of the model: ``sim``'s own model keeps the adapter unmerged (and
    loaded, as `Simulation.export_global` leaves it).  The directory appears whole or not at all:
    it is written beside ``path`` and renamed into place (an earlier merged export there is
    replaced).
    """
    from safetensors.torch import save_file

    path = Path(path)
    _prepare_out(path)
    if sim.state is None or sim.fm is None:
        raise ValueError("sim: has no trained state (use Simulation.from_run_dir)")
    state = sim.model_state(client)
    fm = sim.fm
    fm.load_global(state)
    rank, scaling = state.rank, state.scaling
    model = copy.deepcopy(fm.mlm).merge_and_unload(0)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            if sim.tokenizer is not None:
                sim.tokenizer.save_pretrained(tmp)
        cfg = sim.config
        if not fm.causal:
            save_file({"weight": sim.state.head_W.detach().cpu().contiguous(),
                       "bias": sim.state.head_b.detach().cpu().contiguous()}, str(tmp / HEAD_FILE))
            names = _label_names(sim)
            (tmp / HEAD_META).write_text(json.dumps({
                "pooling": "mean of last_hidden_state over attention_mask",
                "num_labels": int(sim.state.head_W.shape[0]), "label_names": names, "max_length": cfg.max_length},
                indent=1) + "\n")
        last = _last_round(sim.run_dir)
        (tmp / EXPORT_META).write_text(json.dumps({
            "run": str(Path(sim.run_dir).resolve()), "round": last, "strategy": cfg.strategy, "task": cfg.task,
            "adapter": "global" if client is None else f"client {client}", "rank": int(rank),
            "scaling": float(scaling), "base_model": str(sim.model_name),
            "target_modules": list(fm.layer_names)}, indent=1) + "\n")
        chmod_tree(tmp)  # mkdtemp's 0700 and safetensors' 0600 would survive the rename
        if path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)  # the earlier export back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or load reports (a CLI prints its own lines)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _label_names(sim: Simulation) -> list[str] | None:
    """The class names of the run: its ``labels.json``, else (runs made before it was written)
    the dataset's own names where the dataset is installed; None if neither."""
    p = sim.run_dir / LABELS_FILE
    C = int(sim.state.head_W.shape[0])
    try:
        names = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        names = None
    if names is None and sim.config.dataset != "synthetic":
        from .data import load_text_dataset

        cfg = sim.config
        try:
            names = list(load_text_dataset(cfg.dataset, text_column=cfg.text_column, label_column=cfg.label_column,
                                           test_fraction=cfg.test_fraction, seed=cfg.seed).label_names)
        except Exception:  # not installed, moved, offline: the export still works, with class ids
            names = None
    return [str(n) for n in names] if isinstance(names, list) and len(names) == C else None


def _last_round(run_dir: Path) -> int | None:
    p = run_dir / "checkpoints" / "latest.json"
    try:
        return int(json.loads(p.read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class MergedClassifier:
    """A classification export of `write_merged`, ready to label text.

    ``MergedClassifier.from_dir(path)``; ``predict(texts) -> [label]``; ``logits(texts) -> [N, C]``;
    ``logits_from_ids(input_ids, attention_mask)`` for pre-tokenised input.
    """

    def __init__(self, model: torch.nn.Module, head_W: torch.Tensor, head_b: torch.Tensor, tokenizer=None,
                 label_names: Sequence[str] | None = None, max_length: int = 128) -> None:
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head_W = head_W.to(device=self.device, dtype=self.dtype)
        self.head_b = head_b.to(device=self.device, dtype=self.dtype)
        self.tokenizer = tokenizer
        C = self.head_W.shape[0]
        if label_names is not None and len(label_names) != C:
            raise ValueError(f"label_names: {len(label_names)} names for a head of {C} classes")
        self.label_names = list(label_names) if label_names is not None else [str(i) for i in range(C)]
        self.max_length = int(max_length)

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu") -> MergedClassifier:
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from .sim import usable_device

        path = Path(path)
        device = usable_device(device)
        if not path.is_dir():
            raise FileNotFoundError(f"path: no directory {str(path)!r} (a merged export, from hetlora export --merged)")
        if not (path / HEAD_META).is_file() or not (path / HEAD_FILE).is_file():
            what = "a causal-LM export (load it with AutoModelForCausalLM)" if (path / EXPORT_META).is_file() \
                else "not a merged export (hetlora export --merged)"
            raise ValueError(f"path: {str(path)!r} holds no classifier head ({HEAD_FILE}, {HEAD_META}): {what}")
        try:
            meta = json.loads((path / HEAD_META).read_text())
        except ValueError as e:
            raise ValueError(f"path: {str(path / HEAD_META)!r} is not valid JSON ({e})") from None
        head = load_file(str(path / HEAD_FILE))
        W, b = head.get("weight"), head.get("bias")
        if not isinstance(meta, dict) or W is None or b is None or W.dim() != 2 or b.shape != W.shape[:1]:
            raise ValueError(f"path: {str(path)!r} holds a malformed head ({HEAD_META} must be a JSON object; "
                             f"{HEAD_FILE} must hold weight [C, d] and bias [C])")
        with _quiet_transformers():
            try:  # safetensors only: nothing is unpickled
                try:
                    model = AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True)
                except TypeError:
                    model = AutoModel.from_pretrained(path, use_safetensors=True)
                tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
            except OSError as e:
                raise ValueError(f"path: {str(path)!r}: cannot load the merged model ({e})") from None
        return cls(model.to(device), W, b, tok, meta.get("label_names"),
                   meta.get("max_length", 128))

    @torch.no_grad()
    def logits_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids, attention_mask: [N, L]`` -> ``[N, C]`` logits in the model's dtype."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = attention_mask.to(device=self.device, dtype=h.dtype).unsqueeze(-1)
        feats = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return feats @ self.head_W.t() + self.head_b

    def logits(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """``N`` texts -> ``[N, C]`` logits, tokenised as training was (truncated to ``max_length``);
        ``progress``: a progress bar over the batches (on standard error)."""
        if self.tokenizer is None:
            raise ValueError("texts: this export has no tokenizer (its model had none), so it cannot label text; "
                             "in Python, MergedClassifier.logits_from_ids takes token ids")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of strings")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        from .data import _clip_words

        outs = []
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="labelling", unit="batch", leave=False)
        for s in starts:
            chunk = [_clip_words(t, self.max_length + 1) for t in texts[s:s + batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            outs.append(self.logits_from_ids(enc["input_ids"], enc["attention_mask"]))
        C = self.head_W.shape[0]
        return torch.cat(outs) if outs else torch.zeros(0, C, dtype=self.dtype, device=self.device)

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        """The most likely label of each text (its name where the run recorded names)."""
        return [self.label_names[i] for i in self.logits(texts, batch_size).argmax(1).tolist()]

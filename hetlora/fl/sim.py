"""`Simulation`: N clients, K sampled per round, one strategy, on one device.

``Simulation(config).run() -> History`` writes a run directory::

    <out_dir>/<run_name>/
        config.json, config.yaml     the resolved configuration
        labels.json                  class names (classification), for `hetlora export --merged`
        metrics.jsonl                one JSON record per round (see `Simulation.run_round`)
        checkpoints/                 atomic safetensors + JSON (`hetlora.fl.checkpoint`)
        adapters/global, client_<k>  peft adapter directories (+ head.safetensors)
        *.png                        plots (`hetlora.fl.report`)

Every random choice is a pure function of ``(seed, round, client)``: client sampling,
mini-batches, fresh LoRA inits, and LoRA dropout's masks (of ``(seed, round)``:
`hetlora.fl.local.round_rng`).  So concurrent and sequential modes see the same data,
and a run resumed from a checkpoint, or extended with more rounds, continues exactly as the
uninterrupted run would (on a GPU: up to the rounding of atomic adds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetlora_kernels import use_backend

from ..atomic import atomic_write
from .checkpoint import CKPT_DIR, atomic_write_bytes, load_checkpoint, save_checkpoint
from .config import RESUME_MAY_CHANGE, FedConfig
from .determinism import deterministic_algorithms, prepare
from .local import ClientTask, FedModel, TokenData, evaluate, train_round
from .strategies import ClientUpdate, GlobalState, Strategy, client_generator, make_strategy
from .validation import screen_updates


def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this process can use; a ValueError naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} was asked for but this torch sees no CUDA GPU")
    return dev


__all__ = ["Simulation", "History", "FedData", "synthetic_data", "tiny_bert", "assign_ranks"]

log = logging.getLogger("hetlora.fl")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class FedData:
    """Tokenised data split over clients.

    Attributes:
        train: all training examples.  test: the global evaluation subset.
        num_classes: C.  clients: per client ``(train_idx, holdout_idx)`` int64 arrays into
        ``train``.  label_names: C names.
    """

    train: TokenData
    test: TokenData
    num_classes: int
    clients: list[tuple[np.ndarray, np.ndarray]]
    label_names: list[str] = field(default_factory=list)


@dataclass
class History:
    """Per-round records of a run (the lines of ``metrics.jsonl``)."""

    config: FedConfig
    run_dir: Path
    records: list[dict] = field(default_factory=list)

    @property
    def accuracies(self) -> list[tuple[int, float]]:
        return [(r["round"], r["eval_acc"]) for r in self.records if r.get("eval_acc") is not None]

    @property
    def final_accuracy(self) -> float | None:
        acc = self.accuracies
        return acc[-1][1] if acc else None

    @property
    def wall_time(self) -> float:
        return float(sum(r.get("wall_time", 0.0) for r in self.records))


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def tiny_bert(seed: int = 0, vocab_size: int = 64, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random BERT encoder (hidden 32, 2 layers, 2 heads): no download."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = BertModel(cfg, add_pooling_layer=False)
    return m.to(dtype).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 64, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random GPT-2 causal LM (hidden 32, 2 layers, 2 heads; LoRA targets ``c_attn``): no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = GPT2LMHeadModel(cfg)
    return m.to(dtype).eval()


def synthetic_data(seed: int = 0, num_train: int = 400, num_test: int = 100, num_classes: int = 4,
                   length: int = 16, vocab_size: int = 64) -> tuple[TokenData, TokenData, int]:
    """Learnable synthetic token data: class ``c`` draws half its tokens from its own
    8-token band of the vocabulary, the rest uniformly; lengths vary (padding id 0)."""
    rng = np.random.default_rng([seed, 99])

    def make(n):
        y = rng.integers(0, num_classes, n)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.int64)
        for i in range(n):
            L = int(rng.integers(length // 2, length + 1))
            band = 4 + 8 * (y[i] % ((vocab_size - 4) // 8)) + rng.integers(0, 8, L)
            unif = rng.integers(4, vocab_size, L)
            tok = np.where(rng.random(L) < 0.5, band, unif)
            tok[0] = 2  # a CLS-like token
            ids[i, :L] = tok
            mask[i, :L] = 1
        return TokenData(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y.astype(np.int64)))

    return make(num_train), make(num_test), num_classes


def assign_ranks(config: FedConfig) -> np.ndarray:
    """``[N]`` int64 device ranks by ``config.rank_rule`` (seeded)."""
    N = config.num_clients
    rng = np.random.default_rng([config.seed, 31337])
    if config.rank_rule == "list":
        return np.asarray(config.ranks, dtype=np.int64)
    if config.rank_rule == "uniform":
        return rng.integers(config.r_min, config.r_max + 1, N).astype(np.int64)
    fracs = np.array([t[0] for t in config.tiers])
    counts = np.floor(fracs * N).astype(int)
    for i in np.argsort(-(fracs * N - counts))[: N - counts.sum()]:
        counts[i] += 1
    ranks = np.concatenate([np.full(c, config.tier_rank(i)) for i, c in enumerate(counts)])
    return rng.permutation(ranks).astype(np.int64)


def _load_encoder(config: FedConfig) -> tuple[nn.Module, str, object | None]:
    """(encoder, name_or_path, tokenizer or None)."""
    dtype = _DTYPES[config.dtype]
    if config.model == "tiny-random-bert":
        return tiny_bert(config.seed, dtype=dtype), "tiny-random-bert", None
    if config.model == "tiny-random-gpt2":
        return tiny_gpt2(config.seed, dtype=dtype), "tiny-random-gpt2", None
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if config.model == "minilm":
        from .data import default_model_path

        path = str(default_model_path())
    else:
        path = config.model
    from transformers.utils import logging as hf_logging

    # without the (unused) pooler transformers prints a load report of "unexpected" pooler
    # keys on every run; it is expected here, so keep the console for the per-round lines
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise ValueError(f"FedConfig.model: no model directory at {path!r}")

    from .hub import hub_unreachable
    from .hub import offline as hub_offline

    # a hub name out of reach: the local cache alone, failing at once (not after ~50 s of retries)
    why = None if Path(path).expanduser().is_dir() else hub_unreachable()
    try:
        with hub_offline() if why is not None else contextlib.nullcontext():
            if config.task == "causal-lm":
                enc = AutoModelForCausalLM.from_pretrained(path)
            else:
                try:
                    enc = AutoModel.from_pretrained(path, add_pooling_layer=False)  # the pooler is unused
                except TypeError:
                    enc = AutoModel.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # GPT-2 style tokenizers: padding is masked out anyway
    except (OSError, ValueError) as e:
        if why is not None:
            raise ValueError(f"FedConfig.model: {path!r} is not a local directory, not in the local Hugging "
                             f"Face cache, and the hub is out of reach ({why}); download it where there is a "
                             f"network (e.g. `hf download {path} --local-dir DIR`) and pass the directory") from None
        raise ValueError(f"FedConfig.model: cannot load {path!r} as a transformers model "
                         f"(a local directory, or a hub name when online): {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return enc.to(dtype).eval(), path, tok


def _prepare_data(config: FedConfig, tokenizer, vocab_size: int) -> FedData:
    from . import partition as P

    if config.dataset == "synthetic":
        # 400 examples, or 8 per client where there are more than 50 clients (hundreds of clients on a toy model)
        train, test, C = synthetic_data(config.seed, num_train=max(400, 8 * config.num_clients), vocab_size=vocab_size)
        names = [f"class{i}" for i in range(C)]
        natural = None
    else:
        from .data import client_labels_natural, load_text_dataset, tokenize_cached

        try:
            d = load_text_dataset(config.dataset, text_column=config.text_column,
                                  label_column=config.label_column, test_fraction=config.test_fraction,
                                  seed=config.seed)
        except ValueError as e:  # the loader names its own arguments: name them as the config (and flags) do
            msg = str(e)
            for arg, fld in (("name", "dataset"), ("text_column", "text_column"), ("label_column", "label_column")):
                if msg.startswith(arg + ":"):
                    raise ValueError(f"FedConfig.{fld}:{msg[len(arg) + 1:]}") from None
            raise
        if tokenizer is None:  # after the data, whose own errors say more
            raise ValueError(f"FedConfig.model: {config.model!r} has no tokenizer: real datasets need a pretrained "
                             f"model (--model DIR); the tiny random models train on --dataset synthetic")
        if config.task == "classification" and d.num_classes < 2:
            raise ValueError(f"FedConfig.label_column: {config.label_column!r} of {config.dataset!r} holds "
                             f"{d.num_classes} class(es) {d.label_names}: a classifier needs two or more")
        key = Path(str(d.name)).name.replace(":", "_")
        tr = tokenize_cached(d.train_texts, tokenizer, config.max_length, f"{key}-train")
        te = tokenize_cached(d.test_texts, tokenizer, config.max_length, f"{key}-test")
        train = TokenData(tr["input_ids"], tr["attention_mask"], torch.from_numpy(d.train_labels))
        test = TokenData(te["input_ids"], te["attention_mask"], torch.from_numpy(d.test_labels))
        C, names = d.num_classes, list(d.label_names)
        natural = client_labels_natural(d)
    labels = train.labels.numpy()
    if config.partition != "natural" and config.num_clients * 2 > len(labels):
        raise ValueError(f"FedConfig.num_clients: {config.num_clients} clients need at least 2 training "
                         f"examples each; the training split has {len(labels)}")
    if config.partition == "dirichlet":
        parts = P.dirichlet_partition(labels, config.num_clients, config.dirichlet_alpha, config.seed, min_size=2)
    elif config.partition == "iid":
        parts = P.iid_partition(len(labels), config.num_clients, config.seed)
    else:
        if natural is None:
            raise ValueError(f"FedConfig.partition: dataset {config.dataset!r} has no natural clients")
        parts = P.natural_partition(natural)
        if len(parts) != config.num_clients:
            raise ValueError(f"FedConfig.num_clients: the natural split of {config.dataset!r} has "
                             f"{len(parts)} clients, got {config.num_clients}")
    clients = [P.split_holdout(p, config.holdout_fraction, config.seed * 100003 + k) for k, p in enumerate(parts)]
    if config.eval_samples and config.eval_samples < len(test):
        idx = np.sort(np.random.default_rng([config.seed, 4242]).choice(len(test), config.eval_samples, replace=False))
        test = test.subset(idx)
    return FedData(train, test, C, clients, names)


def _elt_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
def _client_keys_to_int(rec: dict) -> dict:
    """A metrics record read back from JSON, with the client ids that key its per-client dicts
    (``bytes_up``, ``client_losses``, ...) as ints again, as in the records of a live run."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict) and v and all(isinstance(c, str) and c.lstrip("-").isdigit() for c in v):
            v = {int(c): x for c, x in v.items()}
        out[k] = v
    return out


def _portable_paths(cfg: dict) -> dict:
    """``cfg`` (a FedConfig mapping) with ``model`` and ``dataset`` made absolute where they name a
    local directory or data file that exists from here (hub names and built-in data sets stay)."""
    out = dict(cfg)
    model, data = out.get("model"), out.get("dataset")
    if isinstance(model, str) and model and Path(model).expanduser().is_dir():
        out["model"] = str(Path(model).expanduser().resolve())
    if isinstance(data, str) and data.lower().endswith((".csv", ".tsv", ".jsonl", ".json")) \
            and Path(data).expanduser().is_file():
        out["dataset"] = str(Path(data).expanduser().resolve())
    return out


class Simulation:
    """One federated run.

    Args:
        config: `FedConfig`.
        data: optional pre-built `FedData` (tests); otherwise built from ``config.dataset``.
        encoder: optional encoder module (tests); otherwise loaded from ``config.model``.
        verbose: print one line per round (and show a progress bar if ``config.progress``).

    Attributes (after `setup`): ``fm`` (`FedModel`), ``strategy``, ``state``
    (`GlobalState`), ``client_ranks [N]``, ``data`` (`FedData`).
    ``update_hook``: optional ``fn(round, list[ClientUpdate]) -> list[ClientUpdate]`` applied
    to the clients' replies before validation (fault injection in tests).
    """

    def __init__(self, config: FedConfig, *, data: FedData | None = None, encoder: nn.Module | None = None,
                 verbose: bool = True) -> None:
        self.config = config.validate()
        prepare(self.config.deterministic)  # before this run's first cuBLAS call
        self._data, self._encoder = data, encoder
        self.verbose = verbose
        self.update_hook: Callable[[int, list[ClientUpdate]], list[ClientUpdate]] | None = None
        self.fm: FedModel | None = None
        self.strategy: Strategy = make_strategy(config)
        self.state: GlobalState | None = None
        self.client_ranks: np.ndarray | None = None
        self.data: FedData | None = None
        self.model_name = config.model
        self.tokenizer = None

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    # -- setup -------------------------------------------------------------------------------------
    def build_model(self) -> FedModel:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self._encoder is not None:
            enc = self._encoder.to(_DTYPES[cfg.dtype])
        else:
            enc, self.model_name, self.tokenizer = _load_encoder(cfg)
        enc = enc.to(cfg.device)
        self.fm = FedModel(enc, cfg.target_modules, dropout=cfg.lora_dropout, causal=cfg.task == "causal-lm",
                           gradient_checkpointing=cfg.gradient_checkpointing)
        return self.fm

    def init_state(self, num_classes: int) -> GlobalState:
        fm, cfg = self.fm, self.config
        g = client_generator(cfg.seed, 0, 0, 1)
        bound = 1.0 / math.sqrt(fm.hidden)
        head_W = ((torch.rand(num_classes, fm.hidden, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        head_W = head_W.to(device=fm.device, dtype=fm.dtype)
        head_b = torch.zeros(num_classes, dtype=fm.dtype, device=fm.device)
        W, b = fm.base_weights()
        self.state = self.strategy.init_global(fm.dims, head_W, head_b, g, base_weights=W, base_biases=b)
        return self.state

    def setup(self) -> None:
        """Load the model and data, assign client ranks and initialise the global state; ranks and
        a state already present (`from_run_dir`, `restore`) are kept, so a finished run can be
        rebuilt and evaluated: ``sim = Simulation.from_run_dir(d); sim.setup()``."""
        cfg = self.config
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"FedConfig.device: {cfg.device!r} was asked for but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        if cfg.backend != "auto":
            from hetlora_kernels import backend_status

            ok, why = backend_status(cfg.backend, dev)
            if not ok:
                raise ValueError(f"FedConfig.backend: {cfg.backend!r} cannot run on {cfg.device}: {why}")
        if self.fm is None:
            self.build_model()
        if self.data is None:
            if self._data is not None:
                self.data = self._data
            else:
                vocab = int(getattr(self.fm.encoder.config, "vocab_size", 64))
                self.data = _prepare_data(cfg, self.tokenizer, vocab)
        if len(self.data.clients) != cfg.num_clients:
            raise ValueError(f"FedConfig.num_clients: the data has {len(self.data.clients)} clients, "
                             f"got {cfg.num_clients}")
        # a state already here (from_run_dir, restore) is the run's: kept, with its clients' ranks
        if self.client_ranks is None:
            # the rank each client trains at: its device's rank as the strategy reads it (HomLoRA: one
            # rank for all, full fine-tuning: 1), so that metrics and plots show the ranks in use
            self.client_ranks = np.array([self.strategy.client_rank(int(r)) for r in assign_ranks(cfg)],
                                         dtype=np.int64)
        if self.state is None:
            # a causal LM keeps its own (frozen) LM head: the federated head is empty, [0, d]
            self.init_state(0 if self.fm.causal else self.data.num_classes)

    # -- one round ---------------------------------------------------------------------------------
    def sample_clients(self, round_idx: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, round_idx, 0x5A])
        return np.sort(rng.choice(self.config.num_clients, self.config.clients_per_round, replace=False))

    def _steps(self, n: int) -> int:
        cfg = self.config
        if cfg.local_epochs is None:
            return cfg.local_steps
        return int(min(cfg.local_steps, max(1, math.ceil(cfg.local_epochs * n / cfg.batch_size))))

    def run_round(self, round_idx: int, progress=None) -> dict:
        """Train, validate, aggregate and (maybe) evaluate round ``round_idx`` (1-based).

        Returns the metrics record: round, clients, ranks_received / ranks_sent (per sampled
        client), client_ranks (all N after pruning), train_loss (mean over accepted clients)
        and client_losses, bytes_down / bytes_up per client and totals, rejected
        ``[{client, reason}]``, num_rejected, num_accepted, failed (fewer than
        ``min_clients`` accepted: the global model was not changed), eval_acc / eval_loss (evaluation rounds),
        client_acc (mean local held-out accuracy), wall_time (s); with client-level DP
        (``dp_clip`` set, `hetlora.fl.privacy`) also dp_epsilon (cumulative ε at ``dp_delta``
        after this round; null when σ = 0) and dp_clipped (updates clipped this round).
        """
        cfg, fm, strat = self.config, self.fm, self.strategy
        t0 = time.perf_counter()
        chosen = self.sample_clients(round_idx)
        tasks = []
        for c in chosen:
            tr, ho = self.data.clients[c]
            r = min(strat.client_rank(int(self.client_ranks[c])), max(strat.global_rank, 1))
            tasks.append(ClientTask(int(c), int(r), tr, ho, self._steps(len(tr))))
        is_eval = round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds
        on_step = (lambda n: progress.update(n)) if progress is not None else None
        updates, down = train_round(fm, strat, self.state, tasks, self.data.train, cfg, round_idx,
                                    local_eval=is_eval, on_step=on_step)
        if self.update_hook is not None:
            updates = self.update_hook(round_idx, updates)
        return self.conclude_round(round_idx, [int(c) for c in chosen], {t.client_id: t.rank for t in tasks},
                                   updates, {t.client_id: d for t, d in zip(tasks, down)}, is_eval, t0)

    def conclude_round(self, round_idx: int, chosen: Sequence[int], ranks_given: dict[int, int],
                       updates: Sequence[ClientUpdate], params_down: dict[int, int], is_eval: bool, t0: float,
                       errors: Sequence[tuple[int | str, str]] = ()) -> dict:
        """The server half of a round, shared by the simulator and the Flower strategy: screen
        ``updates`` (`screen_updates`; ``errors`` are clients that sent none), aggregate the
        accepted ones with the strategy (or the client-level DP path), evaluate on
        evaluation rounds and return the metrics record (see `run_round`).

        chosen: the sampled client ids; ranks_given: client id -> rank it was sent;
        params_down: client id -> parameters sent to it (head excluded); t0: the round's
        start (``time.perf_counter()``)."""
        with use_backend(self.config.backend), deterministic_algorithms(self.config.deterministic):
            return self._conclude_round(round_idx, chosen, ranks_given, updates, params_down, is_eval, t0, errors)

    def _conclude_round(self, round_idx, chosen, ranks_given, updates, params_down, is_eval, t0, errors) -> dict:
        cfg, fm, strat = self.config, self.fm, self.strategy
        head_shape = tuple(self.state.head_W.shape)
        biases = self.state.base_biases
        screen = screen_updates(updates, fm.dims, cfg.r_max, head_shape, full=strat.full_finetune,
                                min_clients=cfg.min_clients, round_idx=round_idx, errors=errors,
                                bias_layers=None if biases is None else [b is not None for b in biases])
        accepted = screen.accepted
        dp_info: dict = {"dp_clipped": 0}
        if not screen.failed:
            for u in accepted:
                self.client_ranks[u.client_id] = u.rank  # a pruned rank sticks
            if cfg.dp_clip is not None:  # client-level DP: clipped, noised, uniform weights (fl.privacy)
                from .privacy import dp_aggregate

                self.state, dp_info = dp_aggregate(self.state, accepted, cfg, round_idx)
            else:
                self.state = strat.aggregate(self.state, accepted)

        eb = _elt_bytes(fm.dtype)
        head_params = head_shape[0] * (head_shape[1] + 1)
        bytes_down = {int(c): int((d + head_params) * eb) for c, d in params_down.items()}
        sound = [u for u in updates if isinstance(u, ClientUpdate) and isinstance(u.rank, int)
                 and not isinstance(u.rank, bool)]
        bytes_up = {int(u.client_id): int((strat.params_up(u, fm.dims) + head_params) * eb) for u in sound}
        sent = {int(u.client_id): int(u.rank) for u in sound}
        losses = [u.train_loss for u in accepted]
        rec: dict = {
            "round": round_idx,
            "strategy": strat.name,
            "clients": [int(c) for c in chosen],
            "ranks_received": [ranks_given.get(int(c)) for c in chosen],
            "ranks_sent": [sent.get(int(c)) for c in chosen],
            "client_ranks": [int(r) for r in self.client_ranks],
            "train_loss": float(np.mean(losses)) if losses else None,
            "client_losses": {int(u.client_id): u.train_loss for u in accepted},
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "bytes_down_total": int(sum(bytes_down.values())),
            "bytes_up_total": int(sum(bytes_up.values())),
            **screen.metrics(),
            "global_rank": self.state.rank,
        }
        if cfg.dp_clip is not None:
            from .privacy import round_epsilon

            eps = round_epsilon(cfg, round_idx)
            rec["dp_epsilon"] = eps if math.isfinite(eps) else None  # null: σ = 0, no finite guarantee
            rec["dp_clipped"] = int(dp_info["dp_clipped"])
        if is_eval:
            acc, loss = evaluate(fm, self.state, self.data.test, cfg.eval_batch_size)
            rec["eval_acc"], rec["eval_loss"] = acc, loss
            if fm.causal:
                rec["eval_ppl"] = math.exp(loss) if loss < 700 else math.inf
            loc = [(u.local_acc, u.local_n) for u in accepted if u.local_acc is not None and u.local_n]
            if loc:
                rec["client_acc"] = float(sum(a * n for a, n in loc) / sum(n for _, n in loc))
        rec["wall_time"] = time.perf_counter() - t0
        return rec

    # -- the run -------------------------------------------------------------------------------------
    def write_run_files(self) -> None:
        """``config.json``, ``config.yaml`` and (classification) ``labels.json`` into the run
        directory (also Flower's server strategy writes them so)."""
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        # local model and data paths as absolute ones: the run is evaluated, exported and resumed
        # from other working directories too
        cfg = FedConfig.from_dict(_portable_paths(self.config.to_dict()))
        atomic_write_bytes(d / "config.json", (cfg.to_json() + "\n").encode())
        atomic_write_bytes(d / "config.yaml", cfg.to_yaml().encode())
        if self.data is not None and not self.fm.causal and len(self.data.label_names) == self.data.num_classes:
            from .merged import LABELS_FILE

            atomic_write_bytes(d / LABELS_FILE, (json.dumps(list(self.data.label_names)) + "\n").encode())

    RESUME_MAY_CHANGE = RESUME_MAY_CHANGE  # (defined beside FedConfig: the CLI's help lists it too)

    def _check_resumable(self, d: Path) -> None:
        """Refuse to resume a run directory made with other settings (its ``config.json``), naming
        every field that differs: the checkpoint's state and ranks only fit the run that wrote them."""
        p = d / "config.json"
        if not p.exists():
            return
        try:
            saved = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"resume: cannot read the settings of the run in {d} ({p}: {e})") from e
        if not isinstance(saved, dict):
            raise ValueError(f"resume: {p} does not hold a FedConfig mapping")
        now, saved = _portable_paths(json.loads(self.config.to_json())), _portable_paths(saved)
        may_change = set(self.RESUME_MAY_CHANGE)
        if float(now.get("lora_dropout") or 0) > 0:
            # dropout masks come from the device's generator and, per client, from where the client
            # sits in the batch: another mode or device draws other masks (equal in distribution only)
            may_change -= {"mode", "device"}
        diff = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in sorted(set(saved) & set(now))
                if k not in may_change and saved[k] != now[k]]
        if diff:
            raise ValueError(
                f"resume: the run in {d} was made with other settings: {'; '.join(diff)}. Resume it with "
                f"the same settings (only {', '.join(sorted(may_change))} may change), or start "
                f"a new run (another --run-name)")

    def restore(self) -> tuple[int, list[dict], dict]:
        """Load the latest checkpoint of the run directory into ``state`` and ``client_ranks``.

        Returns ``(last round, the metrics records of rounds <= last, the checkpoint's extra
        dict)``, or ``(0, [], {})`` when there is no checkpoint (nothing changes then).  Shared
        by ``run(resume=True)`` and Flower's `FlowerStrategy(resume=True)`.
        """
        if self.state is None:
            self.setup()
        d = self.run_dir
        if not (d / CKPT_DIR).is_dir():
            return 0, [], {}
        self._check_resumable(d)
        ck = load_checkpoint(d, device=self.fm.device)
        if ck is None:
            return 0, [], {}
        last, state, ranks, extra = ck
        dt = self.fm.dtype
        self.state = GlobalState(
            [a.to(dt) for a in state.A], [b.to(dt) for b in state.B], state.scaling,
            state.head_W.to(dt), state.head_b.to(dt),
            None if state.base_weights is None else [w.to(dt) for w in state.base_weights],
            state.base_biases, state.stacked, state.stack_rank)
        self.client_ranks = ranks
        records: list[dict] = []
        metrics = d / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short by the crash (rounds after the checkpoint)
                    continue
                if isinstance(r, dict) and isinstance(r.get("round"), int) and r["round"] <= last:
                    records.append(_client_keys_to_int(r))
        return last, records, extra or {}

    def check_run_dir(self, resume: bool = False, overwrite: bool = False) -> bool:
        """Refuse, before any work, a run directory that cannot be written or that holds an earlier run
        (``metrics.jsonl`` or checkpoints) unless ``resume`` (continue it) or ``overwrite`` (replace it)
        says what to do with it.  Returns whether an earlier run is there."""
        cfg, d = self.config, self.run_dir
        if resume and overwrite:
            raise ValueError("resume and overwrite: choose one (continue the earlier run, or replace it)")
        for p in (Path(cfg.out_dir), d):
            if p.exists() and not p.is_dir():
                raise ValueError(f"FedConfig.out_dir: {str(p)!r} is a file, not a directory")
        earlier = (d / "metrics.jsonl").exists() or (d / CKPT_DIR).exists()
        if earlier and not (resume or overwrite):
            raise ValueError(
                f"{str(d)!r} already holds a run: resume it (--resume, run(resume=True)), replace it "
                f"(--overwrite, run(overwrite=True)) or give this one another name (--run-name)")
        return earlier

    def run(self, resume: bool = False, overwrite: bool = False) -> History:
        """Run all rounds and return the History.  The run directory must not hold an earlier run
        unless ``resume`` (continue it from its latest checkpoint) or ``overwrite`` (delete it first)."""
        cfg = self.config
        earlier = self.check_run_dir(resume, overwrite)
        if self.state is None:
            self.setup()
        d = self.run_dir
        if earlier and overwrite:
            shutil.rmtree(d)  # it holds a run (checked above): its files would mix with this one's
        d.mkdir(parents=True, exist_ok=True)
        metrics = d / "metrics.jsonl"
        history = History(cfg, d)
        start = 1
        if resume:
            last, history.records, _ = self.restore()
            start = last + 1
            if last >= cfg.rounds:
                self._say(f"{cfg.name}: all {cfg.rounds} rounds were already done (checkpoint of round {last}); "
                          f"nothing to run (--rounds N continues it to round N)")
            elif last:
                self._say(f"resuming {cfg.name} after round {last}")
            else:
                self._say(f"resume: no checkpoint in {d}: starting at round 1")
        if start <= cfg.rounds:  # (a resume with fewer --rounds than done must not rewrite the run's
            # config to a number of rounds its checkpoint and metrics have passed)
            self.write_run_files()
            atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in history.records).encode())

        elapsed = sum(r.get("wall_time", 0.0) for r in history.records)
        cum_up = history.records[-1]["cum_bytes_up"] if history.records else 0
        cum_down = history.records[-1]["cum_bytes_down"] if history.records else 0
        for rnd in range(start, cfg.rounds + 1):
            bar = None
            if self.verbose and cfg.progress:
                from tqdm.auto import tqdm

                # the round's own clients (sampling is a function of seed and round): with local_epochs
                # clients run different numbers of steps
                steps = sum(self._steps(len(self.data.clients[c][0])) for c in self.sample_clients(rnd))
                bar = tqdm(total=steps, desc=f"{cfg.strategy} round {rnd}/{cfg.rounds}",
                           unit="client-step", leave=False)
            try:
                rec = self.run_round(rnd, bar)
            finally:
                if bar is not None:
                    bar.close()
            elapsed += rec["wall_time"]
            cum_up += rec["bytes_up_total"]
            cum_down += rec["bytes_down_total"]
            rec["elapsed"], rec["cum_bytes_up"], rec["cum_bytes_down"] = elapsed, cum_up, cum_down
            history.records.append(rec)
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self._say(self._line(rec))
            if (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0) or rnd == cfg.rounds:
                save_checkpoint(d, rnd, self.state, self.client_ranks, {"strategy": cfg.strategy})
        if start <= cfg.rounds or not (d / "adapters").exists():
            try:
                self._export_run_adapters()
            except Exception as e:  # exports are a convenience: never lose a finished run to them
                log.warning("adapter export failed: %s", e)
            try:
                from .report import plot_runs

                if cfg.plots:
                    plot_runs([d])
            except Exception as e:
                log.warning("plotting failed: %s", e)
        return history

    def _line(self, rec: dict) -> str:
        cfg = self.config
        acc = f"acc {100 * rec['eval_acc']:5.1f}%  loss {rec['eval_loss']:.3f}" if "eval_acc" in rec else "acc   -  "
        if "eval_ppl" in rec:
            acc = f"next-token acc {100 * rec['eval_acc']:5.1f}%  ppl {rec['eval_ppl']:.2f}"
        tl = f"{rec['train_loss']:.3f}" if rec["train_loss"] is not None else "-"
        ranks = [r for r in rec["ranks_sent"] if r]
        rr = f"{min(ranks)}..{max(ranks)}" if ranks else "-"
        rej = f"  rejected {rec['num_rejected']}" if rec["num_rejected"] else ""
        if "dp_epsilon" in rec:
            eps = rec["dp_epsilon"]
            rej = (f"  ε {eps:.2f}" if eps is not None else "  ε inf") + f" (clipped {rec['dp_clipped']})" + rej
        if rec.get("failed"):
            rej += "  ROUND FAILED (too few valid updates; global model unchanged)"
        return (f"[{cfg.strategy}] round {rec['round']:3d}/{cfg.rounds}  {acc}  train_loss {tl}  ranks {rr}  "
                f"up {rec['bytes_up_total'] / 1e6:.2f} MB  {rec['wall_time']:.1f}s (total {rec['elapsed']:.0f}s){rej}")

    def _say(self, msg: str) -> None:
        if self.verbose:
            try:
                from tqdm.auto import tqdm

                tqdm.write(msg)
            except Exception:
                print(msg, flush=True)

    # -- export ----------------------------------------------------------------------------------------
    def _export_run_adapters(self) -> None:
        """`export_adapters` into ``<run_dir>/adapters`` as a whole or not at all: written into a
        sibling folder, then renamed into place.  A run killed while exporting leaves no
        ``adapters`` (or the previous complete one), so its resume exports again."""
        d = self.run_dir
        part, old = d / ".adapters.partial", d / ".adapters.old"
        for p in (part, old):
            if p.exists():
                shutil.rmtree(p)
        self.export_adapters(part)
        if (d / "adapters").exists():
            os.replace(d / "adapters", old)
        os.replace(part, d / "adapters")
        shutil.rmtree(old, ignore_errors=True)

    def export_adapters(self, out: str | Path | None = None, clients: list[int] | None = None) -> list[Path]:
        """Write the global adapter (and a few clients') as peft directories (see `export_global`)."""
        out = Path(out) if out is not None else self.run_dir / "adapters"
        out.mkdir(parents=True, exist_ok=True)
        written = [self.export_global(out / "global")]
        if clients is None:
            n = min(self.config.export_clients, self.config.num_clients)
            clients = [int(c) for c in np.random.default_rng([self.config.seed, 777]).choice(
                self.config.num_clients, n, replace=False)] if n else []
        for c in clients:
            written.append(self.export_client(c, out / f"client_{c}"))
        return written

    def _export_slot(self, A, B, rank: int, scaling: float, path: Path) -> Path:
        from safetensors.torch import save_file

        from hetlora_kernels import AdapterLayout

        self.fm.set_adapters(A, B, AdapterLayout([rank]), [scaling])
        base = self.model_name if self.model_name not in ("tiny-random-bert", "tiny-random-gpt2") else None
        # an earlier export's target weights (a FLoRA run's, say) must not outlive it beside this adapter
        (Path(path) / "target_weights.safetensors").unlink(missing_ok=True)
        p = self.fm.mlm.export_peft(0, path, base_model_name_or_path=base)
        head = {"weight": self.state.head_W.detach().cpu().contiguous(),
                "bias": self.state.head_b.detach().cpu().contiguous()}
        atomic_write(Path(p) / "head.safetensors", lambda f: save_file(head, f))
        if self.state.base_weights is not None:
            # the adapter alone is not the model when the strategy changes the base (FLoRA merges,
            # full fine-tuning): the target layers' weights go beside it, in each module's own
            # layout (a GPT-2 Conv1D stores [d_in, d_out]), ready for load_state_dict(strict=False)
            t = {f"{name}.weight": (w.t() if layer.fan_in_fan_out else w).detach().cpu().contiguous()
                 for name, w, layer in zip(self.fm.layer_names, self.state.base_weights, self.fm.layers)}
            for name, bias in zip(self.fm.layer_names, self.state.base_biases or []):
                if bias is not None:
                    t[f"{name}.bias"] = bias.detach().cpu().contiguous()
            atomic_write(Path(p) / "target_weights.safetensors", lambda f: save_file(t, f))
        return Path(p)

    def adapter_of(self, client: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], int, float]:
        """``(A per layer, B per layer, rank, scaling)``: the global adapter (``client=None``, rank
        ``state.rank``) or what the server would send client ``client`` now (its current rank)."""
        if client is None:
            return self.state.A, self.state.B, self.state.rank, self.state.scaling
        if isinstance(client, bool) or not isinstance(client, (int, np.integer)) \
                or not 0 <= client < self.config.num_clients:
            raise ValueError(f"client must lie in [0, {self.config.num_clients - 1}], got {client!r}")
        client = int(client)
        r = min(self.strategy.client_rank(int(self.client_ranks[client])), max(self.strategy.global_rank, 1))
        dist = self.strategy.distribute(self.state, [client], [r], self.config.rounds + 1)
        return dist.A, dist.B, r, dist.scalings[0]

    def model_state(self, client: int | None = None) -> GlobalState:
        """The global state (``client=None``), or the model client ``client`` would get now: the
        global state with its adapter (`adapter_of`) in place of the global one."""
        if client is None:
            return self.state
        A, B, _, scaling = self.adapter_of(client)
        return replace(self.state, A=list(A), B=list(B), scaling=scaling)

    def export_merged(self, path: str | Path, client: int | None = None) -> Path:
        """The global adapter (or client ``client``'s) merged into a copy of the base model: a
        standalone transformers directory with the tokenizer and the classifier head
        (`hetlora.fl.merged.write_merged`)."""
        from .merged import write_merged

        return write_merged(self, path, client)

    def export_global(self, path: str | Path) -> Path:
        """The global adapter (rank ``state.rank``) as a peft directory, with the classifier head
        in ``head.safetensors`` and, for strategies that change the base (FLoRA, FullFT), the
        target layers' weights in ``target_weights.safetensors``."""
        if self.state.base_weights is not None:
            self.fm.set_base(self.state.base_weights, self.state.base_biases)
        return self._export_slot(self.state.A, self.state.B, self.state.rank, self.state.scaling, Path(path))

    def export_client(self, client: int, path: str | Path) -> Path:
        """Client ``client``'s adapter: what the server would send it now (its current rank); the
        same files as `export_global`."""
        A, B, r, s = self.adapter_of(client)
        return self._export_slot(A, B, r, s, Path(path))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, verbose: bool = False, device: str | None = None) -> Simulation:
        """Rebuild a finished (or interrupted) run's model and latest state from its directory
        (no data is loaded).  Raises ``FileNotFoundError`` if it has no checkpoint.

        ``device``: where to rebuild it (default: the run's own device, or the CPU when the run
        was made on a CUDA GPU and this torch sees none: a GPU run exports on a laptop)."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json")
        cfg = FedConfig.from_json(run_dir / "config.json")
        cfg.out_dir, cfg.run_name = str(run_dir.parent), run_dir.name
        if device is None and torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        if device is not None:
            cfg.device = str(usable_device(device))
        if torch.device(cfg.device).type != "cuda":
            cfg.cuda_graphs = False  # a GPU run's setting, meaningless (and refused) elsewhere
        sim = cls(cfg, verbose=verbose)
        sim.build_model()
        ck = load_checkpoint(run_dir, restore_rng=False, device=sim.fm.device)
        if ck is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint (checkpoints/latest.json)")
        _, sim.state, sim.client_ranks, _ = ck
        return sim

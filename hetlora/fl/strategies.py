"""Federated strategies behind one interface: distribute -> local objective -> post-local -> aggregate.

Conventions (all strategies):

* Per target layer ``l`` a client adapter is ``A [r, d_in_l]``, ``B [r, d_out_l]``
  (rank-major, DESIGN.md section 2) with scaling ``s``: ``Delta W = s B^T A``.
* `GlobalState` is what the server keeps between rounds: a global adapter per layer
  (``A [r_g, d_in]``, ``B [r_g, d_out]``, evaluated with scaling ``state.scaling``), the
  classifier head (``head_W [C, d]``, ``head_b [C]``), and, for strategies that change
  the base model (FLoRA, FullFT), the target layers' current weights.
* The classifier head (the only trainable non-LoRA parameter) is FedAvg'd with
  weights proportional to the clients' numbers of training examples, for every strategy.
* Tensors stay in the model's dtype; aggregation sums in float64 where the kernels do.

A client round, as `hetlora.fl.local` runs it:
``distribute`` -> ``on_receive`` (remember what is needed to decide pruning) ->
local training of ``loss + local_penalty`` -> ``post_local`` (new ranks) -> updates ->
``aggregate``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from hetlora.layer import scaling_value
from hetlora_kernels import AdapterLayout, delta_fro_norms, truncate, weighted_aggregate

from .config import FedConfig

__all__ = [
    "ClientUpdate",
    "Distribution",
    "GlobalState",
    "Strategy",
    "HetLoRA",
    "HomLoRA",
    "ZeroPadAvg",
    "FLoRA",
    "FlexLoRA",
    "FullFT",
    "make_strategy",
    "tail_norm_products",
    "kaiming_rows",
]


# ---------------------------------------------------------------------------------------------
# containers
# ---------------------------------------------------------------------------------------------
@dataclass
class GlobalState:
    """The server's state between rounds.

    Attributes:
        A, B: per layer ``[r_g, d_in]`` / ``[r_g, d_out]`` global adapter factors.
        scaling: the scaling the global adapter is evaluated with (``Delta W = scaling B^T A``).
        head_W: ``[C, d]``, head_b: ``[C]`` global classifier head.
        base_weights / base_biases: per target layer ``[d_out, d_in]`` / ``[d_out]`` (or None)
            when the strategy changes the frozen base (FLoRA merges, FullFT trains it);
            None for the others.
        stacked, stack_rank: FlexLoRA / FLoRA bookkeeping (see below).
    """

    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scaling: float
    head_W: torch.Tensor
    head_b: torch.Tensor
    base_weights: list[torch.Tensor] | None = None
    base_biases: list[torch.Tensor | None] | None = None
    stacked: bool = False
    """FlexLoRA: A/B hold the stacked ``Σ p_k s_k B_k^T A_k`` of the last round (rank Σ r_k)."""
    stack_rank: int = 0
    """FLoRA: components stacked in the last aggregation (what clients download to merge)."""

    @property
    def rank(self) -> int:
        return int(self.A[0].shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict (for safetensors checkpoints)."""
        out = {"head_W": self.head_W, "head_b": self.head_b}
        for i, (a, b) in enumerate(zip(self.A, self.B)):
            out[f"A.{i}"], out[f"B.{i}"] = a, b
        if self.base_weights is not None:
            for i, w in enumerate(self.base_weights):
                out[f"W.{i}"] = w
                if self.base_biases is not None and self.base_biases[i] is not None:
                    out[f"bias.{i}"] = self.base_biases[i]
        return {k: v.detach().contiguous() for k, v in out.items()}

    def meta(self) -> dict:
        """The non-tensor fields (JSON)."""
        return {"scaling": self.scaling, "stacked": self.stacked, "stack_rank": self.stack_rank,
                "num_layers": len(self.A)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict) -> GlobalState:
        n = int(meta["num_layers"])
        A = [t[f"A.{i}"] for i in range(n)]
        B = [t[f"B.{i}"] for i in range(n)]
        W = [t[f"W.{i}"] for i in range(n)] if "W.0" in t else None
        bias = [t.get(f"bias.{i}") for i in range(n)] if W is not None else None
        return cls(A, B, float(meta["scaling"]), t["head_W"], t["head_b"], W, bias,
                   bool(meta.get("stacked", False)), int(meta.get("stack_rank", 0)))


@dataclass
class Distribution:
    """What the server sends to the K sampled clients of a round.

    Attributes:
        A, B: per layer packed ``[R, d_in]`` / ``[R, d_out]`` for ``layout`` (client j owns
            ``layout.rows(j)``).
        layout: the clients' ranks this round.
        scalings: K floats, client j's scaling ``s_j``.
        params_down: K ints, LoRA/weight parameters each client downloads (head excluded).
    """

    A: list[torch.Tensor]
    B: list[torch.Tensor]
    layout: AdapterLayout
    scalings: list[float]
    params_down: list[int]


@dataclass
class ClientUpdate:
    """One client's reply after local training.

    Attributes:
        client_id: global client index.  rank: rank of the adapter sent (after pruning).
        rank_received: rank it was given this round.
        A, B: per layer ``[rank, d_in]`` / ``[rank, d_out]`` (rank-major).  scaling: ``s_k``.
        head_W ``[C, d]``, head_b ``[C]``: the client's head.  num_examples: training examples.
        weights / biases: FullFT only: per target layer ``[d_out, d_in]`` / ``[d_out]`` or None.
        train_loss: mean local training loss over its steps.
        local_acc / local_n: accuracy of its local model on its own held-out examples.
    """

    client_id: int
    rank: int
    rank_received: int
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scaling: float
    head_W: torch.Tensor
    head_b: torch.Tensor
    num_examples: int
    weights: list[torch.Tensor] | None = None
    biases: list[torch.Tensor | None] | None = None
    train_loss: float = float("nan")
    local_acc: float | None = None
    local_n: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def kaiming_rows(rows: int, d_in: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """peft's LoRA-A init, ``[rows, d_in]``: Kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in)), drawn from ``generator`` (float64 then cast, so the
    same seed gives the same values in every dtype)."""
    bound = 1.0 / math.sqrt(d_in)
    u = torch.rand(rows, d_in, generator=generator, dtype=torch.float64)
    return ((u * 2 - 1) * bound).to(dtype=dtype, device=device)


def client_generator(seed: int, round_idx: int, client_id: int, stream: int) -> torch.Generator:
    """A torch generator for one (seed, round, client, purpose): the same in every mode."""
    ss = np.random.SeedSequence([seed, round_idx, client_id, stream])
    g = torch.Generator()
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def _safe_norm(sq: torch.Tensor) -> torch.Tensor:
    # sqrt with a zero (not NaN) gradient at 0: B starts at zero, so tail norms are 0
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def tail_start(rank: int, gamma: float) -> int:
    """First row of the tail that self-pruning would remove: ``floor(gamma * r)``, with ``gamma``
    read as the decimal it prints as (``0.7`` is 7/10): in binary floating point ``0.7 * 90`` is
    ``62.99999999999999``, and the floor would be 62 instead of the 63 one writes."""
    return int(math.floor(Fraction(repr(float(gamma))) * rank))


@functools.lru_cache(maxsize=64)
def _tail_rows(layout: AdapterLayout, gamma: float, device: torch.device) -> torch.Tensor:
    """``[R]`` bool: the packed rows in their adapter's tail.  Built once per (layout, γ, device):
    local training calls the penalty every step, and a tensor made from a list on a GPU is a
    host-to-device copy that waits for the queue."""
    starts = torch.tensor([tail_start(r, gamma) for r in layout.ranks])
    return (layout.row_component() >= starts[layout.row_adapter()]).to(device)


def tail_norm_products(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], layout: AdapterLayout, gamma: float
) -> torch.Tensor:
    """``[K]``: ``sum_layers ||A_k[tail]||_F * ||B_k[tail]||_F`` with tail = rows floor(γ r_k):r_k.

    Differentiable in As/Bs (zero gradient where a norm is 0).  Per-client sums use
    ``layout.row_adapter`` with ``index_add`` (no Python loop over clients), and all layers go
    through each op at once (`_row_squares`): the local steps call this every step, forward
    and backward, and on a GPU each op is a launch (24 per layer before; now ~15 plus one add
    per layer).
    """
    dev = As[0].device
    owner = layout.row_adapter(dev)
    in_tail = _tail_rows(layout, gamma, dev)
    K = layout.num_adapters
    sq_a, sq_b = _row_squares(As), _row_squares(Bs)
    L = sq_a.shape[0]
    sa = torch.zeros(L, K, dtype=sq_a.dtype, device=dev).index_add(1, owner, sq_a * in_tail)
    sb = torch.zeros(L, K, dtype=sq_b.dtype, device=dev).index_add(1, owner, sq_b * in_tail)
    terms = (_safe_norm(sa) * _safe_norm(sb)).unbind(0)
    total = terms[0]
    for t in terms[1:]:  # layer by layer, in order: the same sum as one layer at a time, to the bit
        total = total + t
    return total


def _row_squares(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, R]``: each row's sum of squares in each of ``L`` tensors ``[R, d_i]`` (one stack when
    the widths agree, as every layer's A or B of a uniform model does)."""
    if all(t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts):
        return torch.stack(list(ts)).pow(2).sum(-1)
    return torch.stack([t.pow(2).sum(1) for t in ts])


def _pack(updates: Sequence[ClientUpdate], num_layers: int):
    layout = AdapterLayout([u.rank for u in updates])
    As = [torch.cat([u.A[i] for u in updates]) for i in range(num_layers)]
    Bs = [torch.cat([u.B[i] for u in updates]) for i in range(num_layers)]
    return As, Bs, layout


def data_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """``[K]`` float64 ``n_k / sum n``."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return n / n.sum()


def _fedavg_head(state: GlobalState, updates: Sequence[ClientUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    w = data_weights(updates)
    W = sum(wk * u.head_W.double() for wk, u in zip(w.tolist(), updates))
    b = sum(wk * u.head_b.double() for wk, u in zip(w.tolist(), updates))
    return W.to(state.head_W.dtype), b.to(state.head_b.dtype)


# ---------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------
class Strategy:
    """Base class: truncation-style distribution of a global adapter, no regulariser, no
    pruning, FedAvg-by-data-size of the factors and the head.  Subclasses override the
    four hooks: `distribute`, `local_penalty`/`on_receive`/`post_local`, `aggregate`."""

    name = "base"
    #: trains the target layers' full weights instead of LoRA (sequential only)
    full_finetune = False
    #: changes the base weights (state.base_weights is kept)
    modifies_base = False

    def __init__(self, config: FedConfig):
        self.config = config
        self.r_max = config.r_max

    # -- ranks / scaling -------------------------------------------------------------------
    def client_rank(self, assigned: int) -> int:
        """The rank a client with device rank ``assigned`` trains at (capped at the global rank)."""
        return min(assigned, self.r_max)

    def scaling(self, rank: int) -> float:
        return scaling_value(self.config.lora_alpha, rank, self.config.scaling_rule)

    @property
    def global_rank(self) -> int:
        return self.r_max

    # -- state -----------------------------------------------------------------------------
    def init_global(
        self,
        dims: Sequence[tuple[int, int]],
        head_W: torch.Tensor,
        head_b: torch.Tensor,
        generator: torch.Generator,
        base_weights: list[torch.Tensor] | None = None,
        base_biases: list[torch.Tensor | None] | None = None,
    ) -> GlobalState:
        """Global adapter at ``global_rank``: A peft-initialised (Kaiming), B zero."""
        dt, dev = head_W.dtype, head_W.device
        r = self.global_rank
        A = [kaiming_rows(r, d_in, generator, dt, dev) for d_in, _ in dims]
        B = [torch.zeros(r, d_out, dtype=dt, device=dev) for _, d_out in dims]
        return GlobalState(A, B, self.scaling(r), head_W, head_b)

    # -- 1. distribute ---------------------------------------------------------------------
    def distribute(self, state: GlobalState, client_ids: Sequence[int], ranks: Sequence[int],
                   round_idx: int) -> Distribution:
        """Client j gets rows ``0:r_j`` of the global adapter (`hetlora_kernels.truncate`)."""
        A, B, layout = truncate(state.A, state.B, list(ranks))
        down = [r * sum(d_in + d_out for d_in, d_out in self._dims(state)) for r in ranks]
        return Distribution(A, B, layout, [self.scaling(r) for r in ranks], down)

    @staticmethod
    def _dims(state: GlobalState) -> list[tuple[int, int]]:
        return [(a.shape[1], b.shape[1]) for a, b in zip(state.A, state.B)]

    # -- 2. local objective ----------------------------------------------------------------
    def local_penalty(self, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                      layout: AdapterLayout) -> torch.Tensor | None:
        """``[K]`` per-client regulariser added to each client's loss, or None."""
        return None

    def on_receive(self, As, Bs, layout: AdapterLayout):
        """Called once with the received adapters before local training; returns a context."""
        return None

    # -- 3. post-local ---------------------------------------------------------------------
    def post_local(self, ctx, As, Bs, layout: AdapterLayout) -> list[int]:
        """Ranks the clients send back (and keep); default: unchanged."""
        return list(layout.ranks)

    # -- 4. aggregate ----------------------------------------------------------------------
    def aggregation_weights(self, updates: Sequence[ClientUpdate], As, Bs, layout) -> torch.Tensor:
        """``[K]`` or ``[L, K]`` float64 weights summing to 1 (per layer)."""
        return data_weights(updates)

    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        """Zero-pad every client adapter to the global rank and sum with the weights."""
        if not updates:
            return state
        L = len(state.A)
        As, Bs, layout = _pack(updates, L)
        w = self.aggregation_weights(updates, As, Bs, layout)
        r = state.rank
        if w.dim() == 1:
            newA, newB = weighted_aggregate(As, Bs, layout, w, r)
        else:
            newA, newB = [], []
            for i in range(L):
                a, b = weighted_aggregate(As[i], Bs[i], layout, w[i], r)
                newA.append(a)
                newB.append(b)
        hW, hb = _fedavg_head(state, updates)
        return GlobalState(list(newA), list(newB), state.scaling, hW, hb, state.base_weights, state.base_biases)

    def params_up(self, u: ClientUpdate, dims: Sequence[tuple[int, int]]) -> int:
        """Parameters a client uploads (head excluded)."""
        return u.rank * sum(d_in + d_out for d_in, d_out in dims)


class HetLoRA(Strategy):
    """HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
    Foundation Models", EMNLP 2024).

    Rule (DESIGN.md section 3), as implemented here:

    1. *Distribute by truncation*: client k gets rows ``0:r_k`` of the global rank-``r_max``
       ``A`` and ``B`` of every target layer (`hetlora_kernels.truncate`).
    2. *Local objective*: ``loss_k + λ Σ_layers ||A_k[t:r_k]||_F ||B_k[t:r_k]||_F`` with
       ``t = floor(γ r_k)`` (γ = ``config.gamma`` = 0.99, λ = ``config.lam`` = 0.01).
    3. *Self-pruning* after local training: if the tail norm product (same sum over layers)
       is below its value at receipt, ``r_k <- max(r_min, floor(γ r_k))``; the client sends
       the pruned adapter and keeps the new rank in later rounds (the server's truncation
       can only cap it further).
    4. *Sparsity-weighted aggregation*: zero-pad every received adapter to ``r_max`` and sum
       with ``p_k = ||ΔW_k||_F / Σ_i ||ΔW_i||_F`` where ``ΔW_k = s_k B_k^T A_k`` is the
       client's whole LoRA product, computed without the ``d_out x d_in`` matrix
       (`hetlora_kernels.delta_fro_norms`).  ``aggregation="layer"`` (default) uses each
       layer's own norms; ``"client"`` uses one weight per client, the sum over layers.
       If every norm is 0 (no client moved B yet) the weights fall back to data sizes.
       ``norm_cap`` (off by default) first clips each norm to ``norm_cap x`` the median
       over the round's clients: norm-proportional weights otherwise let one client take
       almost all of the aggregate by scaling its update.

    What was confirmed, and where a reading had to be chosen:

    * The regulariser and the pruning test were checked against two public
      re-implementations (read, not copied): both penalise ``||A[tail]|| · ||B[tail]||``
      summed over LoRA layers with ``tail`` starting at ``int(γ r)``, and both prune when
      the tail product after local training is smaller than before it.  One of them
      removes exactly the tail (``floor(γ r)`` kept); we do the same, with ``r_min`` as a
      floor so that a rank never reaches 0 (with γ = 0.99 and r < 100, one component per
      pruning).
    * Sparsity weights: the paper's Figure 2 weights the zero-padded factors by the
      Frobenius norm of the client's LoRA product.  One public re-implementation computes
      it per layer, another sums the per-layer norms into one weight per client: both are
      offered (``aggregation``), per layer by default (DESIGN.md).  Neither multiplies by
      data size; we do not either.
    * γ = 0.99 and λ = 0.01 are the values a public re-implementation uses; the paper's
      ranks span r_min = 5 .. r_max = 50 on PaLM-2; our default 2 .. 16 is scaled to
      MiniLM's width 384 (config.py).
    * Scaling: the paper does not discuss ``alpha/r``; truncation and zero-padding only
      preserve a component's meaning if its scale does not depend on the adapter's rank,
      so the simulator defaults to ``scaling_rule="fixed"`` (config.py).
    """

    name = "hetlora"

    def local_penalty(self, As, Bs, layout):
        if self.config.lam == 0:
            return None
        return self.config.lam * tail_norm_products(As, Bs, layout, self.config.gamma)

    @torch.no_grad()
    def on_receive(self, As, Bs, layout):
        return tail_norm_products([a.detach() for a in As], [b.detach() for b in Bs], layout, self.config.gamma)

    @torch.no_grad()
    def post_local(self, ctx, As, Bs, layout):
        if not self.config.prune:
            return list(layout.ranks)
        after = tail_norm_products([a.detach() for a in As], [b.detach() for b in Bs], layout, self.config.gamma)
        shrank = (after < ctx).tolist()  # one read for all clients
        out = []
        for k, r in enumerate(layout.ranks):
            if shrank[k]:
                # never up: a client below r_min (a Flower node may declare one) keeps its rank
                out.append(min(r, max(self.config.r_min, tail_start(r, self.config.gamma))))
            else:
                out.append(r)
        return out

    def aggregation_weights(self, updates, As, Bs, layout):
        s = torch.tensor([u.scaling for u in updates], dtype=torch.float64)
        norms = delta_fro_norms(As, Bs, layout, s).double()  # [L, K], on the adapters' device
        # data sizes are host numbers: on a GPU run the fallback must follow the norms there
        fallback = data_weights(updates).to(norms.device)
        cap = self.config.norm_cap
        if self.config.aggregation == "client":
            n = norms.sum(0)
            if cap is not None:
                n = torch.minimum(n, cap * n.median())
            tot = n.sum()
            # torch.where, not `if tot > 0`: no host read of a device scalar
            return torch.where(tot > 0, n / torch.where(tot > 0, tot, torch.ones_like(tot)), fallback)
        if cap is not None:
            # torch.median's lower median, from a sort: median(dim=...) also returns indices, which
            # have no deterministic CUDA kernel (FedConfig.deterministic would raise)
            med = norms.sort(dim=1).values[:, (norms.shape[1] - 1) // 2].unsqueeze(1)
            norms = torch.minimum(norms, cap * med)
        tot = norms.sum(1, keepdim=True)
        safe = torch.where(tot > 0, tot, torch.ones_like(tot))
        w = norms / safe
        return torch.where(tot > 0, w, fallback.unsqueeze(0).expand_as(w))


class ZeroPadAvg(Strategy):
    """Zero-padding average: HetLoRA without sparsity weighting, regulariser or pruning
    (the naive heterogeneous baseline that the HetLoRA paper, Cho et al. 2024, compares
    against).  Distribution by truncation; aggregation ``Σ_k p_k pad(A_k)``,
    ``Σ_k p_k pad(B_k)`` with FedAvg weights ``p_k = n_k / Σ n`` (data sizes; the paper's
    baseline text does not fix the weights, data size is FedAvg's choice).  Note that a
    component ``j`` is averaged with the zeros of every client whose rank is below ``j``,
    so high components shrink each round: this is the weakness HetLoRA's weighting and
    pruning address."""

    name = "zeropad"


class HomLoRA(Strategy):
    """Homogeneous LoRA with FedAvg (McMahan et al. 2017 applied to LoRA factors, the
    HetLoRA paper's "HomLoRA" baseline): every client trains at the same rank
    ``config.hom_rank`` (default ``r_max``, whatever its device class), the global
    adapter has that rank, and the server averages ``A`` and ``B`` with weights
    ``n_k / Σ n``."""

    name = "homlora"

    def __init__(self, config: FedConfig):
        super().__init__(config)
        self.rank = config.hom_rank or config.r_max

    def client_rank(self, assigned: int) -> int:
        return self.rank

    @property
    def global_rank(self) -> int:
        return self.rank


def _flora_stack(updates: Sequence[ClientUpdate], num_layers: int):
    """The updates stacked: ``(A_s, B_s, layout)`` with per layer ``A_s [R, d_in]``, ``B_s [R, d_out]``
    and ``B_s^T A_s = Σ_k w_k s_k B_k^T A_k`` (``w_k`` the data weights, ``R = Σ r_k``)."""
    As, Bs, layout = _pack(updates, num_layers)
    weights, scalings = data_weights(updates), [u.scaling for u in updates]
    try:
        from hetlora_kernels.lowrank import flora_stack
    except ImportError:
        flora_stack = None
    s = torch.tensor(scalings, dtype=torch.float64)
    if flora_stack is not None:
        A_s, B_s = flora_stack(list(As), list(Bs), layout, weights, scaling=s)
        return list(A_s), list(B_s), layout
    coef = (weights.to(torch.float64) * s)[layout.row_adapter()]
    return list(As), [b * coef.to(b).unsqueeze(1) for b in Bs], layout


def _svd_redistribute(A_s, B_s, ranks):
    """Fallback: rank-``r`` factors of ``M = B_s^T A_s`` for every ``r`` in ranks, by QR of
    the stacked factors and an ``R x R`` SVD (never the ``d_out x d_in`` matrix).
    Returns per layer packed ``(A [Σr, d_in], B [Σr, d_out])`` with ``B_j^T A_j`` = the
    best rank-``r_j`` approximation of ``M`` (singular values split as sqrt on both)."""
    outA, outB = [], []
    for A, B in zip(A_s, B_s):
        acc = torch.float64
        Qa, Ra = torch.linalg.qr(A.to(acc).t())  # A^T = Qa Ra : [d_in, R]
        Qb, Rb = torch.linalg.qr(B.to(acc).t())  # B^T = Qb Rb : [d_out, R]
        U, S, Vh = torch.linalg.svd(Rb @ Ra.t())  # M = Qb (Rb Ra^T) Qa^T
        left = Qb @ U  # [d_out, R]
        right = Qa @ Vh.t()  # [d_in, R]
        rs = S.sqrt()
        pa, pb = [], []
        for r in ranks:
            n = min(r, S.shape[0])
            a = torch.zeros(r, A.shape[1], dtype=acc, device=A.device)
            b = torch.zeros(r, B.shape[1], dtype=acc, device=B.device)
            a[:n] = rs[:n, None] * right[:, :n].t()
            b[:n] = rs[:n, None] * left[:, :n].t()
            pa.append(a)
            pb.append(b)
        outA.append(torch.cat(pa).to(A.dtype))
        outB.append(torch.cat(pb).to(B.dtype))
    return outA, outB


def _pad_rows(ts: list[torch.Tensor], src: AdapterLayout, dst: AdapterLayout) -> list[torch.Tensor]:
    """Re-pack per-layer ``[src.total_rank, d]`` into ``dst`` (same K, ranks >=), zero rows appended."""
    out = []
    for t in ts:
        o = t.new_zeros(dst.total_rank, t.shape[1])
        for k in range(src.num_adapters):
            o[dst.offsets[k]:dst.offsets[k] + src.ranks[k]] = t[src.rows(k)]
        out.append(o)
    return out


def _base_carrying_state(name, dims, head_W, head_b, base_weights, base_biases) -> GlobalState:
    """Initial state of a strategy whose global model is the (merged / trained) target-layer
    weights: a placeholder rank-1 zero adapter plus copies of the base weights and biases."""
    if base_weights is None:
        raise ValueError(f"{name} needs the target layers' base weights (base_weights)")
    dt, dev = head_W.dtype, head_W.device
    A = [torch.zeros(1, d_in, dtype=dt, device=dev) for d_in, _ in dims]
    B = [torch.zeros(1, d_out, dtype=dt, device=dev) for _, d_out in dims]
    return GlobalState(A, B, 1.0, head_W, head_b, [w.clone() for w in base_weights],
                       [None if b is None else b.clone() for b in (base_biases or [None] * len(dims))])


class FLoRA(Strategy):
    """FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS 2024): stacking.

    Each round every sampled client starts from a *fresh* LoRA of its own rank (A
    Kaiming-uniform from a per-(seed, round, client) generator, B zero).  The server
    stacks the received modules, ``A_s = [A_1; ...; A_K]``, ``B_s = [p_1 s_1 B_1; ...]``
    with ``p_k = n_k / Σ n``, so that ``B_s^T A_s = Σ_k p_k s_k B_k^T A_k`` exactly (no
    cross terms, unlike averaging A and B separately), and merges that product into the
    target layers' base weights: ``W <- W + B_s^T A_s`` (`hetlora_kernels.lowrank.flora_stack`
    when present).  The global model is the merged base with no adapter.  Download cost:
    the stacked modules (``Σ_k r_k`` components per layer) that clients merge themselves.
    """

    name = "flora"
    modifies_base = True

    def init_global(self, dims, head_W, head_b, generator, base_weights=None, base_biases=None):
        return _base_carrying_state("FLoRA", dims, head_W, head_b, base_weights, base_biases)

    def distribute(self, state, client_ids, ranks, round_idx):
        dims = self._dims(state)
        dt, dev = state.head_W.dtype, state.head_W.device
        As, Bs = [], []
        for li, (d_in, d_out) in enumerate(dims):
            pa = []
            for cid, r in zip(client_ids, ranks):
                g = client_generator(self.config.seed, round_idx, cid, 1000 + li)
                pa.append(kaiming_rows(r, d_in, g, dt, dev))
            As.append(torch.cat(pa))
            Bs.append(torch.zeros(sum(ranks), d_out, dtype=dt, device=dev))
        per = sum(d_in + d_out for d_in, d_out in dims)
        # clients download last round's stacked modules (to merge) or, in round 1, nothing
        down = [state.stack_rank * per for _ in ranks]
        return Distribution(As, Bs, AdapterLayout(list(ranks)), [self.scaling(r) for r in ranks], down)

    def aggregate(self, state, updates):
        if not updates:
            return state
        A_s, B_s, layout = _flora_stack(updates, len(state.A))
        W = [w + (b.double().t() @ a.double()).to(w.dtype) for w, a, b in zip(state.base_weights, A_s, B_s)]
        hW, hb = _fedavg_head(state, updates)
        return GlobalState(state.A, state.B, 1.0, hW, hb, W, state.base_biases, stack_rank=layout.total_rank)


class FlexLoRA(Strategy):
    """FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources", NeurIPS 2024).

    The server forms the full-rank ``ΔW = Σ_k p_k s_k B_k^T A_k`` (``p_k = n_k / Σ n``) and
    gives client k the best rank-``r_k`` approximation of ``ΔW`` by SVD (Eckart-Young),
    singular values split ``sqrt(σ)`` into both factors and the client's own scaling
    ``s_k`` divided out, so that ``s_k B_k^T A_k`` is that approximation.  Here ``ΔW`` is
    never formed: the server keeps it as stacked factors ``(A_s, B_s)`` of rank
    ``R = Σ_k r_k`` (see FLoRA) and the SVD works on them in ``O(R^2 d)``
    (`hetlora_kernels.lowrank.lowrank_svd_redistribute`, else a QR + small-SVD fallback
    here).  A client whose rank exceeds R gets zero rows beyond R.  Round 1 starts like
    HetLoRA (truncation of a Kaiming A / zero B global adapter), since the SVD of a zero
    ``ΔW`` would give all-zero factors that cannot learn.  The global model evaluated is
    the stacked ``ΔW`` itself.
    """

    name = "flexlora"

    def distribute(self, state, client_ids, ranks, round_idx):
        if not state.stacked:
            return super().distribute(state, client_ids, ranks, round_idx)
        try:
            from hetlora_kernels.lowrank import lowrank_svd_redistribute
        except ImportError:
            lowrank_svd_redistribute = None
        layout = AdapterLayout(list(ranks))
        sc = [self.scaling(r) for r in ranks]
        # ΔW has rank <= its stacked rank R: a client asking for more gets zero extra rows
        capped = [min(r, state.rank) for r in ranks]
        if lowrank_svd_redistribute is not None:
            A, B, _ = lowrank_svd_redistribute(list(state.A), list(state.B), AdapterLayout([state.rank]),
                                               torch.ones(1, dtype=torch.float64), capped, scaling=state.scaling,
                                               out_scaling=torch.tensor(sc, dtype=torch.float64))
            A, B = list(A), list(B)
        else:
            A, B = _svd_redistribute(state.A, [b * state.scaling for b in state.B], capped)
            inv = torch.tensor([1.0 / s for s in sc], dtype=torch.float64)[AdapterLayout(capped).row_adapter()]
            B = [b * inv.to(b).unsqueeze(1) for b in B]
        if capped != list(ranks):
            A, B = _pad_rows(A, AdapterLayout(capped), layout), _pad_rows(B, AdapterLayout(capped), layout)
        down = [r * sum(d_in + d_out for d_in, d_out in self._dims(state)) for r in ranks]
        return Distribution(A, B, layout, sc, down)

    def aggregate(self, state, updates):
        if not updates:
            return state
        A_s, B_s, _ = _flora_stack(updates, len(state.A))
        hW, hb = _fedavg_head(state, updates)
        return GlobalState(list(A_s), list(B_s), 1.0, hW, hb, stacked=True)


class FullFT(Strategy):
    """Full fine-tuning FedAvg (McMahan et al. 2017) of the target layers' weights and
    biases: the upper reference of the HetLoRA paper.  Each client trains its own copy of
    every target layer; the server averages them with ``n_k / Σ n``.  Runs in sequential
    mode only: the K clients would need K different copies of each target weight, so
    there is no shared frozen base layer to batch over and concurrency saves nothing."""

    name = "fullft"
    full_finetune = True
    modifies_base = True

    def client_rank(self, assigned: int) -> int:
        return 1

    def init_global(self, dims, head_W, head_b, generator, base_weights=None, base_biases=None):
        return _base_carrying_state("FullFT", dims, head_W, head_b, base_weights, base_biases)

    def distribute(self, state, client_ids, ranks, round_idx):
        dims = self._dims(state)
        dt, dev = state.head_W.dtype, state.head_W.device
        K = len(client_ids)
        A = [torch.zeros(K, d_in, dtype=dt, device=dev) for d_in, _ in dims]
        B = [torch.zeros(K, d_out, dtype=dt, device=dev) for _, d_out in dims]
        down = [sum(d_in * d_out + d_out for d_in, d_out in dims)] * K
        return Distribution(A, B, AdapterLayout([1] * K), [1.0] * K, down)

    def aggregate(self, state, updates):
        if not updates:
            return state
        w = data_weights(updates).tolist()
        L = len(state.base_weights)
        W = [sum(wk * u.weights[i].double() for wk, u in zip(w, updates)).to(state.base_weights[i].dtype)
             for i in range(L)]
        bias = []
        for i in range(L):
            if state.base_biases is None or state.base_biases[i] is None:
                bias.append(None)
            else:
                bias.append(sum(wk * u.biases[i].double() for wk, u in zip(w, updates)).to(state.base_biases[i].dtype))
        hW, hb = _fedavg_head(state, updates)
        return GlobalState(state.A, state.B, 1.0, hW, hb, W, bias)

    def params_up(self, u, dims):
        return sum(d_in * d_out + d_out for d_in, d_out in dims)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "hetlora": HetLoRA,
    "homlora": HomLoRA,
    "zeropad": ZeroPadAvg,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "fullft": FullFT,
}


def make_strategy(config: FedConfig) -> Strategy:
    """The strategy object named by ``config.strategy``."""
    return STRATEGY_CLASSES[config.strategy](config)

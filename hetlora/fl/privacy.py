"""Client-level differential privacy: DP-FedAvg for the padded-adapter strategies.

The construction is DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018), with the fixed-denominator estimator:

1. Client ``k``'s update lives in the *global* parameter space:
   ``Δ_k = pad(sent_k) - pad(received_k)`` for every target layer's ``A`` and ``B``
   (zero-padded to the global rank ``r_g``) and for the classifier head
   (``head_W``, ``head_b``).  ``received_k`` is rows ``0:r_k`` of the global adapter (the
   truncation the strategy sent); ``sent_k`` is the adapter the client returned.  A client
   that pruned its rank (HetLoRA, client-side as without DP) sends fewer rows; its
   zero-padded adapter is 0 in the pruned rows, so its update there is ``-received``.
2. Clip: ``clip(Δ_k) = Δ_k · min(1, S / ||Δ_k||_2)``, the norm taken over *all* of the
   client's tensors together (`clip_update`).
3. Noisy mean: ``Δ = (Σ_k clip(Δ_k) + N(0, σ² S² I)) / K`` with ``K =
   config.clients_per_round``, the *fixed* number of sampled clients (a rejected update
   counts as a zero contribution, so one client changes the sum by at most ``S``);
   the new global state is ``state + Δ`` (`noisy_mean`, `dp_aggregate`).  The noise is
   drawn from a generator seeded by ``(seed, round)`` (`dp_generator`): runs are
   reproducible and a resumed run draws the same noise as an uninterrupted one.
4. Accounting (`epsilon`): opacus's RDP accountant for the sampled Gaussian mechanism
   with sampling rate ``q = clients_per_round / num_clients``, noise multiplier σ and
   one step per round; ``dp_epsilon`` in ``metrics.jsonl`` is the cumulative ε after
   the round at ``config.dp_delta``.  Every round is counted, failed ones too (an upper
   bound, and a pure function of the round index, so resuming needs no accountant state).

Weights.  The strategy's own aggregation weights are *not* used under DP: HetLoRA's
sparsity weights ``||ΔW_k|| / Σ||ΔW_i||`` and FedAvg's ``n_k / Σ n`` depend on the
clients' data without bound (one client can make its weight ~1), so the sensitivity of the
weighted sum would be unbounded.  Every accepted client gets the uniform weight ``1 / K``
(``norm_cap`` is then irrelevant).

Semantics differ from the non-DP zero-padding average in one respect: a global component
``j`` beyond a client's rank is left where it was by that client (its update there is 0)
rather than averaged with the client's padding zeros.  The DP aggregate is
``state + mean of updates``, DP-FedAvg's form; with ``S = ∞`` and σ = 0 it is FedAvg with
uniform weights on the updates.

Caveats, stated rather than hidden:

* The simulator samples exactly K clients without replacement, while the RDP analysis is
  for Poisson sampling at rate q (the usual approximation in DP-FedAvg experiments).
* The trust model is DP-FedAvg's: a trusted server, and the guarantee covers what it
  releases (the global models).  HetLoRA's self-pruning is still decided client-side
  from the client's data, and the new ranks are not privatised: a client's rank after a
  round (recorded in ``client_ranks``, and shaping what it is sent later) can reveal
  that one bit.  Each round's aggregate itself keeps sensitivity ``S`` whatever the
  ranks.  With ``prune=False`` (or homlora / zeropad) no rank depends on data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .strategies import ClientUpdate, GlobalState

__all__ = [
    "flat_state",
    "client_delta",
    "clip_update",
    "dp_generator",
    "noisy_mean",
    "dp_aggregate",
    "epsilon",
    "round_epsilon",
]

_DP_STREAM = 0xD1FF


def _rdp_accountant():
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as e:  # pragma: no cover - exercised only without opacus
        raise ImportError(
            "client-level DP accounting needs opacus: pip install opacus "
            "(or pip install 'hetlora[privacy]')"
        ) from e
    return RDPAccountant()


def flat_state(state: GlobalState) -> list[torch.Tensor]:
    """The tensors DP acts on, in a fixed order: ``A.0..A.{L-1}, B.0..B.{L-1}, head_W, head_b``."""
    return [*state.A, *state.B, state.head_W, state.head_b]


def _unflat(state: GlobalState, tensors: Sequence[torch.Tensor]) -> GlobalState:
    L = len(state.A)
    return GlobalState(list(tensors[:L]), list(tensors[L:2 * L]), state.scaling, tensors[2 * L], tensors[2 * L + 1],
                       state.base_weights, state.base_biases, state.stacked, state.stack_rank)


def client_delta(state: GlobalState, u: ClientUpdate) -> list[torch.Tensor]:
    """``Δ_k`` in float64 in the global parameter space (`flat_state` order).

    The client received rows ``0:u.rank_received`` of every global factor and sent rows
    ``0:u.rank``; both are zero-padded to the global rank.  Raises ``ValueError`` if the
    update does not fit the state (ranks above the global rank, mismatched shapes).
    """
    r_g = state.rank
    if not 1 <= u.rank <= u.rank_received <= r_g:
        raise ValueError(f"client {u.client_id}: ranks sent={u.rank}, received={u.rank_received} "
                         f"must satisfy 1 <= sent <= received <= global rank {r_g}")
    out = []
    for G, X in ((state.A, u.A), (state.B, u.B)):
        if len(X) != len(G):
            raise ValueError(f"client {u.client_id}: {len(X)} layers, the global adapter has {len(G)}")
        for g, x in zip(G, X):
            d = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
            d[:u.rank] = x.to(device=g.device, dtype=torch.float64)
            d[:u.rank_received] -= g[:u.rank_received].double()
            out.append(d)
    out.append(u.head_W.to(state.head_W.device, torch.float64) - state.head_W.double())
    out.append(u.head_b.to(state.head_b.device, torch.float64) - state.head_b.double())
    return out


def _global_norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def clip_update(tensors: Sequence[torch.Tensor], clip: float) -> tuple[list[torch.Tensor], float, bool]:
    """Scale ``tensors`` (one client's update) to L2 norm at most ``clip``, norm over all of them together.

    Returns ``(clipped, norm_before, was_clipped)`` with ``clipped`` in float64 (so the
    bound holds to float64 rounding whatever the input dtype); an update with norm <=
    ``clip`` keeps its values exactly, a larger one is multiplied by ``clip / norm``.
    """
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    tensors = [t.double() for t in tensors]
    norm = _global_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError(f"update has a non-finite norm ({norm})")
    if norm <= clip:
        return tensors, norm, False
    f = clip / norm
    return [t * f for t in tensors], norm, True


def dp_generator(seed: int, round_idx: int) -> torch.Generator:
    """CPU generator of the DP noise of one (seed, round): reproducible, and the same after a resume."""
    ss = np.random.SeedSequence([int(seed), int(round_idx), _DP_STREAM])
    g = torch.Generator()
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def noisy_mean(
    deltas: Sequence[Sequence[torch.Tensor]],
    clip: float,
    noise_multiplier: float,
    denominator: int,
    generator: torch.Generator | None,
    shapes: Sequence[torch.Size] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """``(Σ_k clip(Δ_k) + N(0, (σ S)^2 I)) / denominator`` in float64, and how many Δ_k were clipped.

    Args:
        deltas: per client, its update tensors (all clients the same shapes).
        clip: S.  noise_multiplier: σ >= 0 (0: no noise, ``generator`` may be None).
        denominator: the fixed number of sampled clients K (not the number of deltas).
        generator: CPU torch generator of the noise (`dp_generator`); noise is drawn in
            float64 on the CPU, tensor by tensor in order, then moved to each tensor's device.
        shapes: the tensors' shapes when ``deltas`` is empty.
    """
    if isinstance(denominator, bool) or not isinstance(denominator, int) or denominator < 1:
        raise ValueError(f"denominator must be an int >= 1, got {denominator!r}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if len(deltas) > denominator:
        raise ValueError(f"{len(deltas)} updates but the denominator (sampled clients) is {denominator}")
    if not deltas and shapes is None:
        raise ValueError("noisy_mean needs the tensor shapes when there are no updates")
    n_clipped = 0
    total: list[torch.Tensor] | None = None
    for d in deltas:
        c, _, was = clip_update(d, clip)
        n_clipped += int(was)
        total = [t.clone() for t in c] if total is None else [a + b for a, b in zip(total, c)]
    if total is None:
        total = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    if noise_multiplier > 0:
        if generator is None:
            raise ValueError("noise_multiplier > 0 needs a generator")
        std = float(noise_multiplier) * float(clip)
        total = [t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device)
                 for t in total]
    return [t / denominator for t in total], n_clipped


def dp_aggregate(state: GlobalState, updates: Sequence[ClientUpdate], config, round_idx: int
                 ) -> tuple[GlobalState, dict]:
    """DP-FedAvg step for a padded-adapter strategy (hetlora, homlora, zeropad).

    ``new = state + (Σ_k clip(Δ_k) + N(0, σ² S² I)) / config.clients_per_round`` with
    ``S = config.dp_clip``, ``σ = config.dp_noise_multiplier`` and noise from
    ``dp_generator(config.seed, round_idx)``; uniform weights replace the strategy's
    (module docstring).  Returns the new state (in the state's dtype) and
    ``{"dp_clipped": int, "dp_norms": [float]}`` (the updates' norms before clipping).
    """
    if config.dp_clip is None:
        raise ValueError("FedConfig.dp_clip: DP aggregation needs dp_clip (the clip norm S)")
    if state.base_weights is not None or state.stacked:
        raise ValueError("client-level DP supports only padded-adapter strategies (hetlora, homlora, zeropad)")
    base = flat_state(state)
    deltas = [client_delta(state, u) for u in updates]
    norms = [_global_norm(d) for d in deltas]
    gen = dp_generator(config.seed, round_idx) if config.dp_noise_multiplier > 0 else None
    mean, n_clipped = noisy_mean(deltas, config.dp_clip, config.dp_noise_multiplier, config.clients_per_round,
                                 gen, shapes=[t.shape for t in base])
    new = [(b.double() + m.to(b.device)).to(b.dtype) for b, m in zip(base, mean)]
    return _unflat(state, new), {"dp_clipped": n_clipped, "dp_norms": norms}


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Cumulative ε after ``steps`` rounds of the sampled Gaussian mechanism, at ``delta``.

    opacus's ``RDPAccountant`` (default orders) with history ``[(σ, q, steps)]``: the same
    number as calling ``accountant.step(noise_multiplier=σ, sample_rate=q)`` ``steps``
    times.  0 for ``steps == 0``; ``inf`` for σ = 0.  Raises ``ImportError`` naming
    ``pip install opacus`` if opacus is missing.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    acc = _rdp_accountant()
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc.history = [(float(noise_multiplier), float(sample_rate), steps)]
    return float(acc.get_epsilon(delta=float(delta)))


def round_epsilon(config, round_idx: int) -> float:
    """ε after round ``round_idx`` (1-based, every round counted) of a run with ``config``."""
    return epsilon(config.dp_noise_multiplier, config.clients_per_round / config.num_clients, int(round_idx),
                   config.dp_delta)

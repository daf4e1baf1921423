"""Local (client-side) training: all sampled clients of a round train *together*.

Concurrent mode, one step:

1. one mini-batch per still-active client (each drawn from its own
   per-(seed, round, client) RNG), concatenated: ``input_ids [N, L]``, ``adapter_ids [N]``;
2. one forward of the frozen encoder; every target layer is a `HetLoraLinear` holding the
   K clients' adapters packed rank-major, routed by one `TokenGroups` per step
   (`MultiLoraModel`'s shared `Routing`);
3. mean pooling over ``attention_mask`` and per-client heads held as stacked tensors
   ``head_W [K, C, d]``, ``head_b [K, C]`` indexed by adapter id;
4. loss = Σ_k (mean cross-entropy over client k's rows + its regulariser): the clients'
   parameters are disjoint, so one backward gives each client exactly its own gradient;
5. per-client gradient clipping (norm over the client's LoRA rows in every layer plus
   its head, summed with ``index_add`` over ``layout.row_adapter``) and a functional
   per-client AdamW over the packed tensors (per-client step counts and bias correction;
   a client whose local steps are done is masked: parameters and state untouched), both in
   `ClientAdamW`, which updates alike tensors (every layer's A and B) stacked, in a fixed
   number of ops whatever the number of layers.

Sequential mode runs the same function with one client at a time (K = 1): same data,
same initialisation, same math, so both modes give the same updates up to float
rounding (tested in float64).  The encoder stays in eval mode (its dropout off); only
LoRA dropout follows ``config.lora_dropout`` (with dropout > 0, parity holds in
distribution only).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetlora.model import MultiLoraModel
from hetlora_kernels import AdapterLayout, use_backend
from hetlora_kernels.layout import to_device

from .determinism import deterministic_algorithms
from .strategies import ClientUpdate, Distribution, GlobalState, Strategy

__all__ = ["TokenData", "ClientTask", "FedModel", "ClientAdamW", "ClientSampler", "train_round", "evaluate"]


@dataclass
class TokenData:
    """Tokenised examples: ``input_ids [N, L]`` int64, ``attention_mask [N, L]`` int64,
    ``labels [N]`` int64 (padded to a common L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    _lengths: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def lengths(self) -> np.ndarray:
        """``[N]`` real tokens per example, on the host (computed once): batches are trimmed to
        their longest row from these, not from a read of the mask."""
        if self._lengths is None:
            self._lengths = self.attention_mask.sum(1).cpu().numpy()
        return self._lengths

    def subset(self, idx) -> TokenData:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
        return TokenData(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


@dataclass
class ClientTask:
    """One sampled client's job this round.

    Attributes:
        client_id: global index.  rank: rank it trains at (after the server's cap).
        train_idx / holdout_idx: int64 indices into the training `TokenData`.
        steps: local steps it runs (clients may differ; finished clients are masked).
    """

    client_id: int
    rank: int
    train_idx: np.ndarray
    holdout_idx: np.ndarray
    steps: int


def _enable_checkpointing(encoder: nn.Module) -> list[nn.Module]:
    """transformers' activation checkpointing (non-reentrant: `local_step` takes its gradients with
    ``torch.autograd.grad``) on ``encoder``; returns the checkpointed blocks."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        GradientCheckpointingLayer = ()
    if not getattr(encoder, "supports_gradient_checkpointing", False) or not GradientCheckpointingLayer:
        raise ValueError(f"FedConfig.gradient_checkpointing: {type(encoder).__name__} does not support "
                         "gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = [m for m in encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"FedConfig.gradient_checkpointing: {type(encoder).__name__} has no checkpointable layers")
    return blocks


class FedModel:
    """An encoder with `HetLoraLinear` target layers plus mean pooling (classification; the
    heads live outside), or a causal LM with `HetLoraLinear` target layers and its own frozen
    LM head (``causal=True``: `token_losses`).

    Args:
        encoder: a transformers encoder (``AutoModel``) returning ``last_hidden_state``, or a
            causal LM (``AutoModelForCausalLM``) returning ``logits``; frozen, in eval mode.
        target_modules: peft-style names of the linear layers to adapt.
        dropout: LoRA dropout.
        causal: the model is a causal LM trained on next-token prediction.
    """

    def __init__(self, encoder: nn.Module, target_modules: Sequence[str], dropout: float = 0.0,
                 causal: bool = False, gradient_checkpointing: bool = False) -> None:
        self.causal = bool(causal)
        self.encoder = encoder.eval()
        self._checkpointed = _enable_checkpointing(encoder) if gradient_checkpointing else []
        # one placeholder adapter; every round replaces it by the clients' packed adapters.
        # alphas are passed as the clients' scalings under the "fixed" rule, so any scaling
        # rule of the config is honoured without the layer recomputing it from the rank
        self.mlm = MultiLoraModel(encoder, list(target_modules), [1], alpha=1.0, dropout=dropout,
                                  scaling_rule="fixed", init_lora_weights=False)
        self.mlm.eval()
        self.layer_names = list(self.mlm.lora_module_names)
        self.layers = [layer for _, layer in self.mlm.lora_layers()]
        self.dims = [(layer.in_features, layer.out_features) for layer in self.layers]
        p = self.layers[0].base_layer.weight
        self.dtype, self.device = p.dtype, p.device
        self.hidden = int(encoder.config.hidden_size)
        self.graphs = CaptureState()  # the rounds' CUDA graphs (FedConfig.cuda_graphs)

    # -- adapters / base ----------------------------------------------------------------------
    def set_adapters(self, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], layout: AdapterLayout,
                     scalings: Sequence[float]) -> None:
        """Load packed per-layer ``A [R, d_in]``, ``B [R, d_out]`` with per-adapter scalings."""
        for layer, a, b in zip(self.layers, As, Bs):
            layer.set_adapters(a, b, layout, alphas=[float(s) for s in scalings], scaling_rules="fixed")

    def base_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Clones of the target layers' ``weight [d_out, d_in]`` and ``bias [d_out]`` (or None).

        Always ``[d_out, d_in]`` (nn.Linear's layout), also for a GPT-2 ``Conv1D``, which stores
        its weight as ``[d_in, d_out]``: the strategies merge ``B^T A`` into it and the
        validation checks that shape whatever the module type."""
        W = [(layer.base_layer.weight.t() if layer.fan_in_fan_out else layer.base_layer.weight).detach().clone()
             for layer in self.layers]
        b = [None if layer.base_layer.bias is None else layer.base_layer.bias.detach().clone()
             for layer in self.layers]
        return W, b

    @torch.no_grad()
    def set_base(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None) -> None:
        """Load ``[d_out, d_in]`` weights (see `base_weights`) and ``[d_out]`` biases."""
        for i, layer in enumerate(self.layers):
            layer.base_layer.weight.copy_(weights[i].t() if layer.fan_in_fan_out else weights[i])
            if biases is not None and biases[i] is not None and layer.base_layer.bias is not None:
                layer.base_layer.bias.copy_(biases[i])

    def load_global(self, state: GlobalState) -> None:
        """The global model: the global adapter (one slot) and, if any, the global base weights."""
        if state.base_weights is not None:
            self.set_base(state.base_weights, state.base_biases)
        self.set_adapters(state.A, state.B, AdapterLayout([state.rank]), [state.scaling])

    @property
    def checkpointed(self) -> bool:
        """Whether the frozen model's blocks are recomputed in the backward (gradient checkpointing)."""
        return bool(self._checkpointed)

    def lora_train(self, on: bool) -> None:
        for layer in self.layers:
            layer.lora_dropout.train(on)
        # transformers checkpoints a layer only while the layer itself is training; its own flag
        # alone, so that the frozen model's dropouts stay off as they are without checkpointing
        for block in self._checkpointed:
            block.training = on

    # -- forward -------------------------------------------------------------------------------
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 adapter_ids: torch.Tensor, unpadded: bool = False) -> torch.Tensor:
        """``[N, d]`` mean of the last hidden states over ``attention_mask``.

        ``unpadded``: the caller knows (from host-side lengths) that the mask is all ones; the model
        then gets none, which is what transformers makes of an all-ones mask itself, after
        reading it back from the device to find out (a wait on a GPU, and no CUDA graph)."""
        out = self.mlm(input_ids=input_ids, attention_mask=None if unpadded else attention_mask,
                       adapter_ids=adapter_ids)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def token_losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter_ids: torch.Tensor,
                     unpadded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal LM: per sequence ``(sum of next-token cross-entropies [N], predicted tokens [N],
        correct top-1 predictions [N])`` over the positions whose token and next token are both
        real (``attention_mask`` 1).  Cross-entropy is taken in float32 or wider.  ``unpadded``: as
        in `features`."""
        # under gradient checkpointing no KV cache: its recomputation would fill the cache again and
        # double its keys.  (Not otherwise: without a cache and a mask, transformers reads the
        # position ids back to look for packed sequences, a wait on a GPU.)
        kw = ({"use_cache": False} if self.checkpointed and hasattr(getattr(self.encoder, "config", None), "use_cache")
              else {})
        out = self.mlm(input_ids=input_ids, attention_mask=None if unpadded else attention_mask,
                       adapter_ids=adapter_ids, **kw)
        logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]
        target = input_ids[:, 1:]
        valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(torch.bool)
        lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        ce = F.cross_entropy(lf.reshape(-1, lf.shape[-1]), target.reshape(-1), reduction="none").view(target.shape)
        ce = torch.where(valid, ce, torch.zeros_like(ce))
        correct = ((logits.argmax(-1) == target) & valid).sum(1)
        return ce.sum(1), valid.sum(1), correct


class ClientAdamW:
    """AdamW (Loshchilov & Hutter) over packed tensors shared by K clients, one optimiser
    state per client, with optional per-client gradient clipping.

    Args:
        params: tensors updated in place; row ``i`` of ``params[j]`` belongs to client
            ``owners[j][i]``.
        owners: per tensor, ``[rows]`` int64 client index of each row.
        lrs: per tensor learning rate.
        num_clients: K.

    ``step(grads, active, max_grad_norm=0.0)``: clients with ``active[k] = False`` are masked:
    their rows of the parameters and of both moments, and their step count, are left exactly as
    they were.  A ``None`` gradient leaves its tensor and its state alone (as torch's
    optimisers do).  Same formula as ``torch.optim.AdamW`` (decoupled weight decay,
    bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``), with the bias correction of each
    row from its client's own step count.  With ``max_grad_norm > 0`` each client's gradient is
    first scaled by ``min(1, max_grad_norm / (||g_k|| + 1e-6))``, ``||g_k||`` the norm of its
    rows in every tensor (summed in float64).

    Tensors of one shape, dtype, learning rate and owner index (every layer's A and B of a
    round, when the layers are alike) form a group: its moments are stored stacked, and a step
    stacks its gradients and parameters, so the update is one pass of ~20 ops per group instead
    of per tensor, and one copy back into the parameters (``torch._foreach_copy_``).  On a GPU,
    where a small op costs the host more than the device, launches are a step's cost; the
    arithmetic of each element is unchanged.  Everything stays on the parameters' device (step
    counts included) and nothing is read back.  ``active`` may be a host tensor.
    """

    def __init__(self, params: Sequence[torch.Tensor], owners: Sequence[torch.Tensor], lrs: Sequence[float],
                 num_clients: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        self.params, self.lrs = list(params), [float(lr) for lr in lrs]
        if not (len(self.params) == len(owners) == len(self.lrs)):
            raise ValueError(f"params, owners and lrs must have one entry per tensor: {len(self.params)}, "
                             f"{len(owners)}, {len(self.lrs)}")
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.owners = [o.to(device=p.device, dtype=torch.int64) for o, p in zip(owners, self.params)]
        for j, (p, o) in enumerate(zip(self.params, self.owners)):
            if o.dim() != 1 or p.dim() == 0 or o.shape[0] != p.shape[0]:
                raise ValueError(f"owners[{j}] must be [rows] = [{p.shape[0] if p.dim() else 0}], got {tuple(o.shape)}")
        # groups in order of first appearance, members in parameter order: the clipping sums
        # then add in the same order as one tensor at a time would
        keys: dict[tuple, list[int]] = {}
        for j, (p, o, lr) in enumerate(zip(self.params, owners, self.lrs)):
            keys.setdefault((tuple(p.shape), p.dtype, p.device, lr, id(o)), []).append(j)
        self.groups = list(keys.values())
        self.m = [torch.zeros((len(g), *self.params[g[0]].shape), dtype=self.params[g[0]].dtype,
                              device=self.params[g[0]].device) for g in self.groups]
        self.v = [torch.zeros_like(m) for m in self.m]
        # owner index of the rows of a group's stacked tensors, flattened member-major
        self._flat_owner = [self.owners[g[0]].repeat(len(g)) for g in self.groups]
        self.steps = torch.zeros(num_clients, dtype=torch.int64, device=dev)
        self.betas, self.eps, self.wd = betas, eps, weight_decay

    def moments(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, v)`` of ``params[j]``: views into its group's stacked state, shaped like it."""
        for gi, g in enumerate(self.groups):
            if j in g:
                i = g.index(j)
                return self.m[gi][i], self.v[gi][i]
        raise IndexError(f"j must lie in [0, {len(self.params) - 1}], got {j}")

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | None], active: torch.Tensor, max_grad_norm: float = 0.0) -> None:
        if len(grads) != len(self.params):
            raise ValueError(f"grads must have one entry per parameter ({len(self.params)}), got {len(grads)}")
        b1, b2 = self.betas
        active = to_device(active.to(torch.bool), self.steps.device)
        self.steps += active.to(torch.int64)
        t_all = self.steps.clamp_min(1).to(torch.float64)
        bc1_all, bc2_all = 1 - torch.pow(b1, t_all), 1 - torch.pow(b2, t_all)
        work = []  # (group index, members with a gradient, stacked gradients)
        for gi, g in enumerate(self.groups):
            have = [j for j, i in enumerate(g) if grads[i] is not None]
            if have:
                work.append((gi, have, torch.stack([grads[g[j]] for j in have])))
        if max_grad_norm > 0 and work:
            sq = torch.zeros(self.steps.shape[0], dtype=torch.float64, device=self.steps.device)
            for gi, have, G in work:
                rows = G.shape[1]
                own = self._flat_owner[gi] if len(have) == len(self.groups[gi]) else \
                    self.owners[self.groups[gi][0]].repeat(len(have))
                sq.index_add_(0, own, G.pow(2).reshape(len(have) * rows, -1).sum(1).to(torch.float64))
            coef = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        rows_terms: dict[tuple, tuple[torch.Tensor, ...]] = {}
        for gi, have, G in work:
            g = self.groups[gi]
            p0, own, lr = self.params[g[0]], self.owners[g[0]], self.lrs[g[0]]
            shape = (1, -1) + (1,) * (p0.dim() - 1)
            key = (id(own), p0.dtype, lr)
            if key not in rows_terms:
                bc1 = bc1_all.to(p0.device)[own].to(p0.dtype)
                bc2 = bc2_all.to(p0.device)[own].to(p0.dtype)
                rows_terms[key] = (active.to(p0.device)[own], lr / bc1, bc2.sqrt())
            act, step_size, bc2_sqrt = (t.view(shape) for t in rows_terms[key])
            if max_grad_norm > 0:
                G = G * coef[own].to(G.dtype).view(shape)
            whole = len(have) == len(g)
            sel = None if whole else torch.tensor(have, dtype=torch.int64, device=p0.device)
            P = torch.stack([self.params[g[j]] for j in have])
            M = self.m[gi] if whole else self.m[gi].index_select(0, sel)
            V = self.v[gi] if whole else self.v[gi].index_select(0, sel)
            m_new = M * b1 + G * (1 - b1)
            v_new = V * b2 + G * G * (1 - b2)
            denom = v_new.sqrt() / bc2_sqrt + self.eps
            decayed = P * (1 - lr * self.wd) if self.wd else P  # P * 1.0 is P: skip the launch
            p_new = decayed - step_size * m_new / denom
            torch.where(act, p_new, P, out=P)
            torch.where(act, m_new, M, out=M)
            torch.where(act, v_new, V, out=V)
            if not whole:
                self.m[gi].index_copy_(0, sel, M)
                self.v[gi].index_copy_(0, sel, V)
            torch._foreach_copy_([self.params[g[j]] for j in have], list(P.unbind(0)))


class ClientSampler:
    """Mini-batches of one client's training indices from a per-(seed, round, client) RNG:
    without replacement within an epoch, reshuffled each epoch (incomplete tail dropped).
    Batch size ``min(batch_size, n_k)``."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, round_idx: int, client_id: int) -> None:
        self.idx = np.asarray(indices, dtype=np.int64)
        if len(self.idx) == 0:
            raise ValueError(f"client {client_id} has no training examples")
        self.rng = np.random.default_rng([seed, round_idx, client_id, 7])
        self.bs = min(batch_size, len(self.idx))
        self.perm = self.rng.permutation(self.idx)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos + self.bs > len(self.perm):
            self.perm = self.rng.permutation(self.idx)
            self.pos = 0
        out = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return out


def use_cuda_graphs(cfg, device: torch.device, steps: int) -> bool:
    """Whether a round's local steps go through `StepGraph`: ``cfg.cuda_graphs`` on a CUDA
    device, with at least 3 steps (one eager warm-up, one captured, one replayed: fewer gain
    nothing over the capture's cost)."""
    return bool(getattr(cfg, "cuda_graphs", False)) and torch.device(device).type == "cuda" and steps >= 3


class CaptureState:
    """What the rounds of one model share for their CUDA graphs (`FedModel.graphs`).

    ``pool``: one memory pool for every round's capture.  Each round captures anew and its graph
    dies with the round, so the next capture reuses the pool's blocks instead of taking a new
    pool from the driver each round (unreleased until ``empty_cache``: reserved memory would grow
    by a step's activations every round, and an allocation that fails during a capture cannot
    free cached memory and retry).  ``stream``: the captures' side stream.  ``failed``: why a
    capture failed for a reason that will recur (a host read in the step; not memory), so that
    later rounds do not warm up and fail again.  ``graph``: the last graph captured into the pool,
    held until the next capture has begun: torch frees a pool once no graph uses it, and a capture
    into a freed pool's handle fails an internal assertion (the fourth lend: every round after
    the first)."""

    def __init__(self) -> None:
        self.pool = None
        self.stream = None
        self.graph = None
        self.abandoned: list = []  # graphs of failed captures, kept alive (`StepGraph._after_failure`)
        self.failed: str | None = None


class StepGraph:
    """A round's local step captured in a CUDA graph and replayed (``FedConfig.cuda_graphs``).

    The first call runs the step eagerly on a side stream (PyTorch's recipe for whole-network
    capture: it compiles and tunes the Triton kernels and fills the routing, schedule and
    penalty caches, so that nothing is allocated into a cache during the capture); the second
    captures the step and replays it; later calls copy the batch into the captured input
    buffers and replay.  The graph is tied to the batch layout it was captured with (which
    clients, how many sequences each, ``takes``): another layout runs eagerly.  A capture that
    fails warns once and leaves the rest of the round eager; unless it ran out of memory, later
    rounds sharing ``shared`` (a `CaptureState`) skip the graph too.

    ``step_fn(input_ids, mask, labels, pattern)`` must keep every op on the device.  Batches
    arrive as host tensors of one shape (padded to the data's full length).
    """

    warmup_steps = 1
    # every StepGraph of the process: captures made, captures failed, the last failure (what
    # `bench e2e`'s simulator+graph row reports: a failed capture times the eager steps)
    stats: dict = {"captured": 0, "failed": 0, "last_failure": None}

    def __init__(self, step_fn, device: torch.device, shared: CaptureState | None = None) -> None:
        self.step_fn, self.device = step_fn, torch.device(device)
        self.shared = shared if shared is not None else CaptureState()
        self.key: tuple | None = None
        self.bufs: list[torch.Tensor] | None = None
        self.replay = None
        self.warm = 0
        self.failed: str | None = None

    def takes(self, key: tuple) -> bool:
        return self.failed is None and (self.key is None or self.key == key)

    def step(self, batch: Sequence[torch.Tensor], pattern: tuple, key: tuple) -> None:
        """One local step of the layout ``key`` (``takes(key)`` must hold) on the host ``batch``."""
        if self.bufs is None:
            self.key = key
            self.bufs = [to_device(t, self.device) for t in batch]
        else:  # into the captured buffers, through pinned memory (the copy does not wait)
            for buf, t in zip(self.bufs, batch):
                buf.copy_(t.pin_memory() if self.device.type == "cuda" else t, non_blocking=True)
        if self.replay is not None:
            self.replay()
            return
        if self.warm < self.warmup_steps:
            self._warm(lambda: self.step_fn(*self.bufs, pattern))
            self.warm += 1
            return
        try:
            self.replay = self._capture(lambda: self.step_fn(*self.bufs, pattern))
            StepGraph.stats["captured"] += 1
        except Exception as e:  # noqa: BLE001 - reported, and the round goes on eagerly
            import warnings

            self.failed = f"{type(e).__name__}: {e}"
            StepGraph.stats["failed"] += 1
            StepGraph.stats["last_failure"] = self.failed
            later = ""
            if not isinstance(e, torch.cuda.OutOfMemoryError):  # memory may be there next round
                self.shared.failed = self.failed
                later = ", and so do later rounds' (the capture would fail again)"
            warnings.warn(f"cuda_graphs: capturing the local step failed ({self.failed}); the round's "
                          f"remaining steps run eagerly{later}", RuntimeWarning, stacklevel=2)
            self.step_fn(*self.bufs, pattern)
            return
        self.replay()

    def _warm(self, fn) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self, fn):
        """``fn`` captured into a new graph, as ``torch.cuda.graph`` captures (a side stream, a
        private memory pool) but without the device's and the host's memory caches emptied first:
        every round captures, and each emptying makes the round's next allocations (pinned
        host buffers too) go back to cudaMalloc / cudaHostAlloc, which wait for the GPU."""
        sh = self.shared
        if sh.pool is None:
            sh.pool = torch.cuda.graph_pool_handle()
        if sh.stream is None:
            sh.stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)  # the warm-up's side stream and the batch copies done
        with torch.cuda.stream(sh.stream):
            began = ended = False
            try:
                graph.capture_begin(pool=sh.pool)
                began = True
                fn()
            except BaseException:
                if began:  # end the capture (the stream must leave capture mode), but raise the
                    # step's own error: capture_end's would only say the capture was invalidated
                    try:
                        graph.capture_end()
                        ended = True
                    except Exception:  # noqa: BLE001 - the step's error is the one to raise
                        pass
                self._after_failure(graph, ended)
                raise
            try:
                graph.capture_end()
            except BaseException:
                self._after_failure(graph, False)
                raise
        sh.graph = graph  # the pool's holder now (the previous graph, freed here, held it before)
        return graph.replay

    def _after_failure(self, graph, ended: bool) -> None:
        """What a failed capture leaves behind, cleared.

        Where ``capture_end`` did not complete (an invalidated capture: a host read in the step;
        or ``capture_begin`` failed), torch stopped before it (1) took the device's generator out
        of capture mode: every later random op on the device would raise (the fourth lend), and
        (2) closed its record that the pool is being captured into, whose filter points at
        ``graph``: a later capture into the pool fails ("already recording to mempool_id", the
        fourth lend), and every allocation of the process would go on consulting the filter.
        Both are undone here, and ``graph`` is kept alive for good (should the record stay
        open, its filter must not point at freed memory).  In every case the next capture takes
        a new pool: the failed graph's claim on this one ends when it dies (an out-of-memory
        capture, tried again next round, then frees its memory)."""
        sh = self.shared
        if not ended:
            release_rng_capture(self.device)
            end_capture_allocations(self.device, sh.pool)
            sh.abandoned.append(graph)
        sh.pool = sh.graph = None


def release_rng_capture(device: torch.device) -> None:
    """The device's default generator out of capture mode after a capture whose ``capture_end``
    did not complete.

    ``capture_begin`` puts the generator in capture mode and only a completed ``capture_end``
    takes it out; after a failure in between, every later random op on the device raises
    "Offset increment outside graph capture encountered unexpectedly" (the fourth lend: one failed
    capture failed every later benchmark of the process).  The generator gets a fresh copy of its
    own state (same seed and offset, not capturing), so random numbers go on where they were."""
    if torch.device(device).type != "cuda":
        return
    with contextlib.suppress(Exception):  # a torch without graph-safe generator states: nothing to do
        gen = torch.cuda.default_generators[_cuda_index(device)]
        gen.graphsafe_set_state(gen.clone_state())


def end_capture_allocations(device: torch.device, pool) -> None:
    """Close the caching allocator's record that ``pool`` is being captured into, which a
    ``capture_end`` that failed in ``cudaStreamEndCapture`` leaves open (torch's own
    ``use_mem_pool`` closes such records with the same call).  Nothing where it is closed already
    or the binding is missing."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if pool is None or end is None or torch.device(device).type != "cuda":
        return
    with contextlib.suppress(Exception):
        end(_cuda_index(device), pool)


def _cuda_index(device: torch.device) -> int:
    idx = torch.device(device).index
    return torch.cuda.current_device() if idx is None else idx


def _rows_of(dist: Distribution, j: int) -> Distribution:
    rows = dist.layout.rows(j)
    return Distribution([a[rows] for a in dist.A], [b[rows] for b in dist.B], AdapterLayout([dist.layout.ranks[j]]),
                        [dist.scalings[j]], [dist.params_down[j]])


def train_round(fm: FedModel, strategy: Strategy, state: GlobalState, tasks: Sequence[ClientTask], data: TokenData,
                config, round_idx: int, local_eval: bool = False, on_step=None) -> tuple[list[ClientUpdate], list[int]]:
    """Run one round of local training for ``tasks``; returns (updates, params_down per task).

    ``config`` supplies mode, lr, head_lr, weight_decay, max_grad_norm, batch_size, seed,
    client_eval_samples.  ``on_step(n)`` is called after each optimiser step with the
    number of client-steps it advanced (progress bars).
    """
    with use_backend(getattr(config, "backend", "auto")), round_rng(int(getattr(config, "seed", 0)), round_idx,
                                                                     fm.device), \
            deterministic_algorithms(bool(getattr(config, "deterministic", False))):
        return _train_round(fm, strategy, state, tasks, data, config, round_idx, local_eval, on_step)


@contextlib.contextmanager
def round_rng(seed: int, round_idx: int, device: torch.device):
    """The global torch generators (CPU and ``device``'s), seeded from ``(seed, round)`` for the
    round's local training and restored after it.  LoRA dropout is the one thing in a round that
    draws from them (everything else has its own seeded generator): its masks then depend on the
    seed and round alone, so a resumed or extended run, or a round on another machine (Flower),
    draws the masks an uninterrupted run draws."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence([seed, round_idx, 0x10CA1]).generate_state(1, np.uint64)[0]
                              % (2**63)))
        yield


def _train_round(fm, strategy, state, tasks, data, config, round_idx, local_eval, on_step):
    ids = [t.client_id for t in tasks]
    dist = strategy.distribute(state, ids, [t.rank for t in tasks], round_idx)
    if state.base_weights is not None:
        fm.set_base(state.base_weights, state.base_biases)
    if config.mode == "concurrent" and not strategy.full_finetune:
        ups = _train_group(fm, strategy, state, list(tasks), dist, data, config, round_idx, local_eval, on_step)
    else:
        ups = []
        for j, t in enumerate(tasks):
            if state.base_weights is not None and strategy.full_finetune and j > 0:
                fm.set_base(state.base_weights, state.base_biases)
            ups += _train_group(fm, strategy, state, [t], _rows_of(dist, j), data, config, round_idx,
                                local_eval, on_step)
        if strategy.full_finetune and state.base_weights is not None:
            fm.set_base(state.base_weights, state.base_biases)
    return ups, list(dist.params_down)


def _train_group(fm: FedModel, strategy: Strategy, state: GlobalState, tasks: list[ClientTask], dist: Distribution,
                 data: TokenData, cfg, round_idx: int, local_eval: bool, on_step) -> list[ClientUpdate]:
    K = len(tasks)
    layout = dist.layout
    dev, dt = fm.device, fm.dtype
    full = strategy.full_finetune
    fm.set_adapters(dist.A, dist.B, layout, dist.scalings)
    As = [layer.lora_A for layer in fm.layers]
    Bs = [layer.lora_B for layer in fm.layers]
    ctx = strategy.on_receive(As, Bs, layout) if not full else None

    head_W = state.head_W.to(device=dev, dtype=dt).unsqueeze(0).repeat(K, 1, 1).requires_grad_(True)
    head_b = state.head_b.to(device=dev, dtype=dt).unsqueeze(0).repeat(K, 1).requires_grad_(True)
    kidx = torch.arange(K, device=dev)
    params: list[torch.Tensor] = [head_W, head_b]
    owners: list[torch.Tensor] = [kidx, kidx]
    lrs: list[float] = [cfg.head_lr, cfg.head_lr]
    base_params: list[torch.Tensor] = []
    if full:
        for layer in fm.layers:
            for p in (layer.base_layer.weight, layer.base_layer.bias):
                if p is not None:
                    p.requires_grad_(True)
                    base_params.append(p)
                    params.append(p)
                    owners.append(torch.zeros(p.shape[0], dtype=torch.int64, device=dev))
                    lrs.append(cfg.lr)
    else:
        owner = layout.row_adapter(dev)
        for a, b in zip(As, Bs):
            params += [a, b]
            owners += [owner, owner]
            lrs += [cfg.lr, cfg.lr]
    opt = ClientAdamW(params, owners, lrs, K, weight_decay=cfg.weight_decay)

    samplers = [ClientSampler(t.train_idx, cfg.batch_size, cfg.seed, round_idx, t.client_id) for t in tasks]
    steps = [t.steps for t in tasks]
    # On a GPU nothing in a step waits for the device (transformers' own check of a padding
    # mask aside): the per-client losses add up on the device, the batch's trimmed length
    # comes from host-side lengths, host tensors go through pinned memory, and the ids, the
    # client mask and the sequence counts of each (active clients, batch sizes) are made once.
    loss_sum = torch.zeros(K, dtype=torch.float64, device=dev)
    lengths = data.lengths()
    # per (active clients, batch sizes): the sequences' client ids on the host (for the model:
    # its routing builds each trimmed length's token groups from them without reading the
    # device, and reuses them while this tensor is passed) and on the device (for indexing),
    # the client mask and the sequences per client
    per_pattern: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def local_step(input_ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, pattern: tuple,
                   unpadded: bool = False) -> None:
        """One concurrent step on device tensors: every op stays on the device (a CUDA graph
        can hold it, `StepGraph`).  ``unpadded``: no padding in the batch (`FedModel.features`)."""
        aid_h, aid, active, seqs = pattern
        # gradient checkpointing recomputes layers inside autograd.grad: keep the batch routed there
        with fm.mlm.route(aid_h) if fm.checkpointed else contextlib.nullcontext():
            if fm.causal:  # mean next-token loss over each client's own tokens
                ce, ntok, _ = fm.token_losses(input_ids, mask, aid_h, unpadded)
                counts = torch.zeros(K, dtype=ce.dtype, device=dev).index_add(0, aid, ntok.to(ce.dtype))
            else:  # mean loss over each client's own sequences
                feats = fm.features(input_ids, mask, aid_h, unpadded)
                logits = torch.einsum("nd,ncd->nc", feats, head_W[aid]) + head_b[aid]
                ce = F.cross_entropy(logits, y, reduction="none")
                counts = seqs.to(ce.dtype)
            per_client = torch.zeros(K, dtype=ce.dtype, device=dev).index_add(0, aid, ce) / counts.clamp_min(1)
            loss = per_client.sum()
            if not full:
                pen = strategy.local_penalty(As, Bs, layout)
                if pen is not None:
                    loss = loss + (pen * active.to(pen.dtype)).sum()
            grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        opt.step(grads, active, cfg.max_grad_norm)
        loss_sum.add_(per_client.detach().to(torch.float64))

    # cuda_graphs: batches padded to the data's full length (one shape a round), the round's
    # first step eager, the rest replayed from one captured step (`StepGraph`)
    graph = (StepGraph(local_step, dev, fm.graphs)
             if use_cuda_graphs(cfg, dev, max(steps)) and fm.graphs.failed is None else None)
    fm.lora_train(True)
    try:
        for step in range(max(steps)):
            active_list = [k for k in range(K) if step < steps[k]]
            batches = [samplers[k].next() for k in active_list]
            rows_np = np.concatenate(batches)
            lens = tuple(len(b) for b in batches)
            key = (tuple(active_list), lens)
            pattern = per_pattern.get(key)
            if pattern is None:
                active_h = torch.zeros(K, dtype=torch.bool)
                active_h[active_list] = True
                seqs = torch.zeros(K, dtype=torch.int64)
                seqs[active_list] = torch.tensor(lens, dtype=torch.int64)
                aid_h = torch.as_tensor(np.repeat(active_list, lens), dtype=torch.int64)
                pattern = (aid_h, to_device(aid_h, dev), to_device(active_h, dev), to_device(seqs, dev))
                per_pattern[key] = pattern
            if graph is not None:
                L = data.input_ids.shape[1]
            else:
                L = max(int(lengths[rows_np].max()), 1)  # trim shared padding: the masked tail changes nothing
            rows = torch.as_tensor(rows_np, dtype=torch.int64)
            batch = (data.input_ids[rows, :L], data.attention_mask[rows, :L], data.labels[rows])
            if graph is not None and graph.takes(key):
                graph.step(batch, pattern, key)  # the mask always passed: replays see other batches
            else:  # eager (or a layout the graph was not captured for: clients that finished early)
                local_step(*(to_device(t, dev) for t in batch), pattern, bool(lengths[rows_np].min() >= L))
            if on_step is not None:
                on_step(len(active_list))
    finally:
        fm.lora_train(False)
        for p in base_params:
            p.requires_grad_(False)
    loss_sum = loss_sum.cpu()  # the round's one read of the losses

    local_acc: list[float | None] = [None] * K
    local_n = [0] * K
    if local_eval and cfg.client_eval_samples > 0:
        local_acc, local_n = _local_eval(fm, tasks, data, head_W.detach(), head_b.detach(), cfg)

    new_ranks = strategy.post_local(ctx, As, Bs, layout) if not full else list(layout.ranks)
    updates = []
    for k, t in enumerate(tasks):
        rows = layout.rows(k)
        r_new = new_ranks[k]
        A_k = [a.detach()[rows][:r_new].clone() for a in As]
        B_k = [b.detach()[rows][:r_new].clone() for b in Bs]
        w = bias = None
        if full:
            w, bias = fm.base_weights()
        updates.append(ClientUpdate(
            client_id=t.client_id, rank=r_new, rank_received=layout.ranks[k], A=A_k, B=B_k,
            scaling=float(dist.scalings[k]), head_W=head_W.detach()[k].clone(), head_b=head_b.detach()[k].clone(),
            num_examples=int(len(t.train_idx)), weights=w, biases=bias,
            train_loss=float(loss_sum[k] / max(steps[k], 1)), local_acc=local_acc[k], local_n=local_n[k],
        ))
    return updates


@torch.no_grad()
def _local_eval(fm: FedModel, tasks, data: TokenData, head_W, head_b, cfg):
    """Each client's trained local model on (up to ``client_eval_samples`` of) its held-out set,
    all clients in one batched pass (adapter ids route each row to its client)."""
    K = len(tasks)
    rows, aid = [], []
    for k, t in enumerate(tasks):
        h = np.asarray(t.holdout_idx, dtype=np.int64)[: cfg.client_eval_samples]
        rows.append(h)
        aid.append(np.full(len(h), k, dtype=np.int64))
    rows_np, aid_np = np.concatenate(rows), np.concatenate(aid)
    dev = fm.device
    # counts (integers, exact in float64 in any order) add up on the device: one read at the end
    correct = torch.zeros(K, dtype=torch.float64, device=dev)
    tokens = torch.zeros(K, dtype=torch.float64, device=dev)
    n = np.bincount(aid_np, minlength=K)
    lengths = data.lengths()
    bs = cfg.eval_batch_size
    for s in range(0, len(rows_np), bs):
        r = torch.as_tensor(rows_np[s:s + bs])
        a_h = torch.as_tensor(aid_np[s:s + bs])  # host ids route the batch without a device read
        a = to_device(a_h, dev)
        L = max(int(lengths[rows_np[s:s + bs]].max()), 1)
        unpadded = bool(lengths[rows_np[s:s + bs]].min() >= L)  # no padding: the model needs no mask
        ids, m = to_device(data.input_ids[r, :L], dev), to_device(data.attention_mask[r, :L], dev)
        if fm.causal:  # next-token accuracy over each client's held-out tokens
            _, ntok, ok = fm.token_losses(ids, m, a_h, unpadded)
            correct.index_add_(0, a, ok.double())
            tokens.index_add_(0, a, ntok.double())
            continue
        feats = fm.features(ids, m, a_h, unpadded)
        logits = torch.einsum("nd,ncd->nc", feats, head_W[a]) + head_b[a]
        correct.index_add_(0, a, (logits.argmax(1) == to_device(data.labels[r], dev)).double())
    correct = correct.cpu().numpy()
    denom = tokens.cpu().numpy() if fm.causal else n
    acc = [float(c / d) if d else None for c, d in zip(correct, denom)]
    return acc, [int(m) for m in n]


@torch.no_grad()
def evaluate(fm: FedModel, state: GlobalState, data: TokenData, batch_size: int = 64) -> tuple[float, float]:
    """Global model's ``(accuracy, mean cross-entropy)`` on ``data``; for a causal LM
    ``(next-token accuracy, mean next-token cross-entropy)`` over all real tokens (perplexity
    is ``exp`` of the second)."""
    fm.load_global(state)
    W = state.head_W.to(device=fm.device, dtype=fm.dtype)
    b = state.head_b.to(device=fm.device, dtype=fm.dtype)
    n = len(data)
    dev = fm.device
    # the sums stay on the device (float64: the same additions in the same order as on the
    # host), read once at the end; a GPU never waits between batches
    correct_t, loss_t, tokens_t = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3))
    lengths = data.lengths()
    for s in range(0, n, batch_size):
        L = max(int(lengths[s:s + batch_size].max()), 1)
        unpadded = bool(lengths[s:s + batch_size].min() >= L)  # no padding: the model needs no mask
        ids = to_device(data.input_ids[s:s + batch_size, :L], dev)
        m = to_device(data.attention_mask[s:s + batch_size, :L], dev)
        zeros = torch.zeros(ids.shape[0], dtype=torch.int64)  # host ids: routed without a device read
        if fm.causal:
            ce, ntok, ok = fm.token_losses(ids, m, zeros, unpadded)
            loss_t += ce.double().sum()
            correct_t += ok.sum()
            tokens_t += ntok.sum()
            continue
        y = to_device(data.labels[s:s + batch_size], dev)
        feats = fm.features(ids, m, zeros, unpadded)
        logits = feats @ W.t() + b
        loss_t += F.cross_entropy(logits.double(), y, reduction="sum")
        correct_t += (logits.argmax(1) == y).sum()
    correct, loss, tokens = float(correct_t), float(loss_t), float(tokens_t)
    if fm.causal:
        return (correct / tokens, loss / tokens) if tokens else (math.nan, math.nan)
    return (correct / n, loss / n) if n else (math.nan, math.nan)

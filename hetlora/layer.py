"""`HetLoraLinear`: one frozen linear layer serving K LoRA adapters of different ranks.

The adapters are stored rank-major packed (DESIGN.md section 2): ``lora_A [R, d_in]``
and ``lora_B [R, d_out]``; adapter k owns rows ``layout.offsets[k]:offsets[k+1]``.
peft's ``lora_A.weight`` is ``A_k`` and peft's ``lora_B.weight`` is ``B_k^T``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from hetlora_kernels import AdapterLayout, TokenGroups, lora_delta, lora_linear
from hetlora_kernels.layout import to_device

SCALING_RULES = ("alpha/r", "rslora", "fixed")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight [d_in, d_out], y = x W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def base_dims(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"base_linear must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")


def scaling_value(alpha: float, rank: int, rule: str) -> float:
    """Scaling ``s`` of an adapter: ``alpha/r``, ``alpha/sqrt(r)`` (rsLoRA) or ``alpha`` (fixed)."""
    if rule == "alpha/r":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    if rule == "fixed":
        return float(alpha)
    raise ValueError(f"scaling_rule must be one of {SCALING_RULES}, got {rule!r}")


def alpha_of_scaling(scaling: float, rank: int, rule: str) -> float:
    """The ``alpha`` that `scaling_value` turns into ``scaling`` for this rank and rule."""
    if rule == "alpha/r":
        return scaling * rank
    if rule == "rslora":
        return scaling * math.sqrt(rank)
    if rule == "fixed":
        return float(scaling)
    raise ValueError(f"scaling_rule must be one of {SCALING_RULES}, got {rule!r}")


def per_adapter(value, K: int, name: str, kind=float) -> list:
    """Broadcast a scalar to K entries, or check a sequence has K."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        value = [value] * K
    if len(value) != K:
        raise ValueError(f"{name} must be a single value or one per adapter ({K}), got {len(value)}")
    out = []
    for i, v in enumerate(value):
        if kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}[{i}] must be a finite number, got {v!r}")
            out.append(float(v))
        else:
            out.append(v)
    return out


def _host_ids(ids: torch.Tensor) -> np.ndarray | None:
    """A copy of host (CPU) adapter ids' values, for `_same_host_ids`; None for device ids."""
    return ids.detach().numpy().copy() if ids.device.type == "cpu" else None


def _same_host_ids(saved: np.ndarray | None, ids: torch.Tensor) -> bool:
    """Whether host ids still hold ``saved``'s values (host memory: never a device read); device
    ids (``saved`` None) are trusted by their version counter alone."""
    return saved is None or np.array_equal(saved, ids.detach().numpy())


class Routing:
    """The current batch's sequence -> adapter ids, shared by every layer of a model.

    Layers see inputs ``[batch, ..., d]``; the tokens of sequence ``b`` belong to
    adapter ``adapter_ids[b]``.  `TokenGroups` are built once per distinct number of
    tokens per sequence (usually one per forward) and reused by every layer.

    A call's groups sit in lists that layers search by comparing sizes: a compiled model keeps its
    sizes symbolic, and hashing them as dict keys would compile one graph per batch shape.  The
    builds (which read the ids back to the host) run eagerly under torch.compile.
    """

    _SINGLE_KEEP = 16  # one-adapter groups kept across calls (they depend only on the token count)

    def __init__(self) -> None:
        self.adapter_ids: torch.Tensor | None = None
        self.num_adapters = 0
        self.expand = False
        self._groups: dict = {"rows": [], "single": []}  # this call's groups
        self._built: dict = {}  # (m, per_row, rows, device) -> groups of these ids, across calls (the memo)
        self._single: dict = {}  # (num_tokens, device) -> one-adapter groups
        # the last routing's (ids tensor, its version, K, expand, built groups, host copy of the
        # ids): a loop that passes the same unmodified ids tensor every step reuses its groups,
        # whose build reads the ids back to the host (a device synchronisation on a GPU)
        self._memo: tuple | None = None

    def set(self, adapter_ids: torch.Tensor | None, num_adapters: int, expand: bool = False) -> None:
        """``expand``: a layer input may hold each sequence's row ``m`` times in a row (what
        ``generate`` does for beams and ``num_return_sequences``); each copy keeps the adapter.

        The same ids tensor object, unmodified since (its in-place version counter unchanged,
        and for host ids the same values: writes through ``.numpy()`` or ``.data`` do not count
        versions), with the same K and ``expand`` reuses the previous calls' groups."""
        built: dict = {}
        if adapter_ids is not None:
            m = self._memo
            if (m is not None and m[0] is adapter_ids and m[1] == adapter_ids._version
                    and m[2:4] == (num_adapters, expand) and _same_host_ids(m[5], adapter_ids)):
                built = m[4]
            else:
                self._memo = (adapter_ids, adapter_ids._version, num_adapters, expand, built, _host_ids(adapter_ids))
        self.adapter_ids, self.num_adapters, self.expand = adapter_ids, num_adapters, expand
        self._built, self._groups = built, {"rows": [], "single": []}

    def save(self) -> tuple:
        """This routing's state, for `restore` (a nested routing gives the outer one back)."""
        return self.adapter_ids, self.num_adapters, self.expand, self._groups, self._built

    def restore(self, state: tuple) -> None:
        self.adapter_ids, self.num_adapters, self.expand, self._groups, self._built = state

    def single(self, num_tokens: int, device: torch.device) -> TokenGroups:
        """All ``num_tokens`` tokens on adapter 0 (one-adapter models)."""
        for g in self._groups["single"]:
            if g.num_tokens == num_tokens and g.device == device:
                return g
        return self._build_single(num_tokens, device)

    def groups_for(self, x: torch.Tensor) -> TokenGroups | None:
        ids = self.adapter_ids
        if ids is None:
            return None
        n = ids.shape[0]
        rows = x.shape[0] if x.dim() >= 2 else None
        # rows per sequence: 1, or m when generate repeats each sequence m times in a row
        m = 1 if rows == n else (rows // n if self.expand and rows and n and rows % n == 0 else 0)
        if not m:
            raise ValueError(
                f"adapter_ids has {n} entries (one per sequence) but a LoRA layer "
                f"received input of shape {tuple(x.shape)}"
            )
        per_row = x[0, ..., 0].numel()
        if m == 1:
            for g in self._groups["rows"]:
                if g.num_tokens == n * per_row and g.device == x.device:
                    return g
        else:
            g = self._groups.get((m, per_row, x.device))
            if g is not None:
                return g
        return self._build(m, per_row, rows, x.device)

    def prebuild(self, per_row: int, device: torch.device) -> None:
        """Build the groups of layer inputs ``[batch, per_row..., d]`` now (see `_build`)."""
        ids = self.adapter_ids
        if ids is not None and not any(g.num_tokens == ids.shape[0] * per_row and g.device == device
                                       for g in self._groups["rows"]):
            self._build(1, per_row, ids.shape[0], device)

    def prebuild_single(self, num_tokens: int, device: torch.device) -> None:
        if not any(g.num_tokens == num_tokens and g.device == device for g in self._groups["single"]):
            self._build_single(num_tokens, device)

    # The builds read the ids back to the host: under torch.compile they run eagerly (a graph
    # break where a layer meets a shape `MultiLoraModel` did not build before the graph).
    @torch.compiler.disable
    def _build_single(self, num_tokens: int, device: torch.device) -> TokenGroups:
        key = (num_tokens, device)
        g = self._single.get(key)
        if g is None:
            if len(self._single) >= self._SINGLE_KEEP:
                self._single.clear()
            g = self._single[key] = TokenGroups.from_lengths([num_tokens]).to(device)  # on the host: no device read
        self._groups["single"].append(g)
        return g

    @torch.compiler.disable
    def _build(self, m: int, per_row: int, rows: int, device: torch.device) -> TokenGroups:
        """Groups of layer inputs ``[rows, per_row..., d]``, each sequence's rows ``m`` times in a row."""
        key = (m, per_row, rows, device)
        g = self._built.get(key)
        if g is None:
            if len(self._built) >= 64:  # one ids tensor reused for ever new shapes: keep the memo bounded
                self._built.clear()
            ids = self.adapter_ids
            rep = m * per_row
            if ids.device.type == "cpu" and device.type != "cpu":
                # host ids for a GPU batch: build on the host (no read of device memory), then
                # copy without waiting for the GPU
                tok = ids.repeat_interleave(rep) if rep != 1 else ids
                g = TokenGroups.from_adapter_ids(tok, self.num_adapters).to(device)
            else:
                tok = ids.to(device).repeat_interleave(rep) if rep != 1 else ids.to(device)
                g = TokenGroups.from_adapter_ids(tok, self.num_adapters)
            self._built[key] = g
        if m == 1:
            self._groups["rows"].append(g)
        else:
            self._groups[(m, per_row, device)] = g
        return g


class HetLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus K LoRA adapters of mixed ranks.

    Args:
        base_linear: the layer to adapt; its parameters are frozen.
        ranks: K positive ints.
        alpha: LoRA alpha, one float or one per adapter.
        dropout: LoRA dropout probability on the adapter input (training only).
        scaling_rule: ``"alpha/r"`` (peft's default), ``"rslora"`` (``alpha/sqrt(r)``) or
            ``"fixed"`` (``s = alpha`` whatever the rank); one string or one per adapter.
        init_lora_weights: peft's init (A Kaiming-uniform, B zero) when True, else both zero.

    Attributes:
        lora_A: ``[R, d_in]`` and lora_B: ``[R, d_out]`` packed rank-major parameters.
        layout: `AdapterLayout`.  scaling: ``[K]`` float32 buffer.
    """

    def __init__(
        self,
        base_linear: nn.Module,
        ranks: Sequence[int] | AdapterLayout,
        alpha: float | Sequence[float] = 8.0,
        dropout: float = 0.0,
        *,
        scaling_rule: str | Sequence[str] = "alpha/r",
        init_lora_weights: bool = True,
    ) -> None:
        super().__init__()
        d_in, d_out = base_dims(base_linear)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.base_layer = base_linear
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.fan_in_fan_out = _is_conv1d(base_linear)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        layout = AdapterLayout(ranks)
        w = base_linear.weight
        self.lora_A = nn.Parameter(torch.zeros(layout.total_rank, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(layout.total_rank, d_out, dtype=w.dtype, device=w.device))
        self.register_buffer("scaling", torch.zeros(layout.num_adapters, dtype=torch.float32, device=w.device))
        # the ranks travel with a state dict: the packed weights alone would load into a model of the
        # same total rank split otherwise ((2, 3) into (3, 2)), silently another model
        self.register_buffer("lora_ranks", torch.zeros(layout.num_adapters, dtype=torch.int64, device=w.device))
        self.layout = layout
        self.alphas = per_adapter(alpha, layout.num_adapters, "alpha")
        rules = per_adapter(scaling_rule, layout.num_adapters, "scaling_rule", kind=str)
        for i, r in enumerate(rules):
            if r not in SCALING_RULES:
                raise ValueError(f"scaling_rule[{i}] must be one of {SCALING_RULES}, got {r!r}")
        self.scaling_rules = rules
        self._refresh_scaling()
        self.routing: Routing | None = None  # set by MultiLoraModel
        if init_lora_weights:
            for k in range(layout.num_adapters):
                self.reset_adapter(k)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def num_adapters(self) -> int:
        return self.layout.num_adapters

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.layout.ranks

    def _refresh_scaling(self) -> None:
        vals = [scaling_value(a, r, rule) for a, r, rule in zip(self.alphas, self.layout.ranks, self.scaling_rules)]
        # pinned and non-blocking: set_adapters runs for every layer at every round's start, and a
        # plain copy to a GPU would wait there for all the work queued before it
        self.scaling = to_device(torch.tensor(vals, dtype=torch.float32), self.lora_A.device)
        self.lora_ranks = to_device(torch.tensor(self.layout.ranks, dtype=torch.int64), self.lora_A.device)
        self._set_host_scaling(vals)

    def _set_host_scaling(self, vals: list[float]) -> None:
        # forward's scalings: Python floats eagerly (no device read), and under torch.compile the
        # same values as a host tensor, which the graph takes as data (floats would be constants
        # it specialises on: a recompile for every new alpha)
        self._scaling_host = vals
        self._scaling_cpu = torch.tensor(vals, dtype=torch.float64)

    def _apply(self, fn, recurse: bool = True):
        # `.to(bfloat16)` would round the scalings buffer too (16/3 -> 5.34375): a state dict saved
        # from it would carry other alphas into the model that loads it.  The buffer stays float32.
        out = super()._apply(fn, recurse)
        if self.scaling.dtype != torch.float32:
            self.scaling = torch.tensor(self._scaling_host, dtype=torch.float32, device=self.scaling.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # forward reads the scalings' host copy (no device read per call) and export_peft the
        # alphas: a loaded `scaling` buffer that differs from this layer's (a model saved with
        # other alphas) must reach both, or the loaded model would silently compute another one
        key = prefix + "lora_ranks"
        if key in state_dict:
            saved = state_dict[key]
            saved = tuple(int(r) for r in saved.tolist()) if isinstance(saved, torch.Tensor) else saved
            if saved != tuple(self.layout.ranks):
                raise ValueError(f"{prefix.rstrip('.') or 'the layer'}: the state dict holds adapters of ranks "
                                 f"{list(saved)}, this layer ranks {list(self.layout.ranks)}: build the model with "
                                 "the saved ranks")
        else:  # a state dict saved before the ranks were kept: nothing to check it against
            state_dict[key] = self.lora_ranks
        before = self.scaling.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if (prefix + "scaling") in state_dict and self.scaling.shape == before.shape \
                and not torch.equal(self.scaling, before):
            vals = [float(v) for v in self.scaling.tolist()]
            self.alphas = [alpha_of_scaling(v, r, rule) for v, r, rule in zip(vals, self.layout.ranks,
                                                                                  self.scaling_rules)]
            self._set_host_scaling(vals)

    def _check_slot(self, k: object) -> int:
        # a negative index would address a slot from the end, as a list's does: refused instead
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_adapters:
            raise ValueError(f"k must be an adapter index in [0, {self.num_adapters - 1}], got {k!r}")
        return k

    @torch.no_grad()
    def reset_adapter(self, k: int) -> None:
        """peft's initialisation of adapter k: A Kaiming-uniform(a=sqrt(5)), B zero."""
        rows = self.layout.rows(self._check_slot(k))
        a = torch.empty(rows.stop - rows.start, self.in_features, dtype=torch.float32, device=self.lora_A.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[rows] = a.to(self.lora_A.dtype)
        self.lora_B[rows] = 0

    def get_adapter(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter k's ``(A_k [r_k, d_in], B_k [r_k, d_out])`` (detached clones)."""
        rows = self.layout.rows(self._check_slot(k))
        return self.lora_A.detach()[rows].clone(), self.lora_B.detach()[rows].clone()

    @torch.no_grad()
    def delta_weight(self, k: int) -> torch.Tensor:
        """Adapter k's whole update ``ΔW_k = s_k · B_kᵀ A_k``: ``[d_out, d_in]`` (``nn.Linear``'s
        orientation, also over a ``Conv1D``), detached, in float32 (float64 for float64 factors)
        whatever the factors' dtype, so that merging rounds once, into the weight's dtype."""
        self._check_slot(k)
        acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        rows = self.layout.rows(k)
        A, B = self.lora_A.detach()[rows].to(acc), self.lora_B.detach()[rows].to(acc)
        return (B.t() @ A) * self._scaling_host[k]

    @torch.no_grad()
    def merge_into_base(self, k: int) -> nn.Module:
        """Add ``ΔW_k`` (`delta_weight`) to the base layer's weight in place and return the base
        layer.  The sum is taken in float32 (float64 for a float64 weight) and rounded once to
        the weight's dtype.  This layer's own outputs change with it (its base now holds ΔW_k):
        it is meant for `MultiLoraModel.merge_and_unload`, which then drops this layer."""
        delta = self.delta_weight(k)
        w = self.base_layer.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = delta.t() if self.fan_in_fan_out else delta
        w.copy_((w.to(acc) + delta.to(device=w.device, dtype=acc)).to(w.dtype))
        return self.base_layer

    @torch.no_grad()
    def set_adapters(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        ranks: Sequence[int] | AdapterLayout,
        alphas: float | Sequence[float] | None = None,
        scaling_rules: str | Sequence[str] | None = None,
    ) -> None:
        """Replace all adapters by packed ``A [R, d_in]``, ``B [R, d_out]`` of ``ranks``.

        The parameters are new tensors: optimisers holding the old ones must be rebuilt.
        """
        layout = AdapterLayout(ranks)
        K = layout.num_adapters
        if A.shape != (layout.total_rank, self.in_features):
            raise ValueError(f"A must be [{layout.total_rank}, {self.in_features}], got {tuple(A.shape)}")
        if B.shape != (layout.total_rank, self.out_features):
            raise ValueError(f"B must be [{layout.total_rank}, {self.out_features}], got {tuple(B.shape)}")
        if alphas is None:
            if K != self.num_adapters:
                raise ValueError("alphas must be given when the number of adapters changes")
            alphas = self.alphas
        if scaling_rules is None:
            scaling_rules = self.scaling_rules if K == self.num_adapters else self.scaling_rules[0]
        # every check before the first write: a refused call leaves the layer as it was
        alphas = per_adapter(alphas, K, "alphas")
        scaling_rules = per_adapter(scaling_rules, K, "scaling_rules", kind=str)
        for i, rule in enumerate(scaling_rules):
            if rule not in SCALING_RULES:
                raise ValueError(f"scaling_rules[{i}] must be one of {SCALING_RULES}, got {rule!r}")
        dev, dt = self.lora_A.device, self.lora_A.dtype
        self.lora_A = nn.Parameter(A.detach().to(device=dev, dtype=dt).clone())
        self.lora_B = nn.Parameter(B.detach().to(device=dev, dtype=dt).clone())
        self.layout = layout
        self.alphas = alphas
        self.scaling_rules = scaling_rules
        self._refresh_scaling()

    @torch.no_grad()
    def add_adapter(self, rank: int, alpha: float, scaling_rule: str, init_lora_weights: bool = True) -> int:
        """Append adapter slot ``K`` of ``rank`` (peft's init, or zeros); returns ``K``.

        The parameters are new tensors: optimisers holding the old ones must be rebuilt."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if scaling_rule not in SCALING_RULES:
            raise ValueError(f"scaling_rule must be one of {SCALING_RULES}, got {scaling_rule!r}")
        k = self.num_adapters
        A = torch.cat([self.lora_A.detach(), self.lora_A.new_zeros(rank, self.in_features)])
        B = torch.cat([self.lora_B.detach(), self.lora_B.new_zeros(rank, self.out_features)])
        self.set_adapters(A, B, [*self.layout.ranks, rank], [*self.alphas, alpha], [*self.scaling_rules, scaling_rule])
        if init_lora_weights:
            self.reset_adapter(k)
        return k

    @torch.no_grad()
    def remove_adapter(self, k: int) -> None:
        """Drop adapter slot ``k``; the slots after it move down by one.  New parameter tensors,
        as `add_adapter`."""
        self._check_slot(k)
        if self.num_adapters == 1:
            raise ValueError("cannot remove the only adapter of a layer")
        rows = self.layout.rows(k)
        keep = [i for i in range(self.layout.total_rank) if not rows.start <= i < rows.stop]
        idx = torch.tensor(keep, dtype=torch.int64, device=self.lora_A.device)
        drop = lambda xs: [x for i, x in enumerate(xs) if i != k]  # noqa: E731
        self.set_adapters(self.lora_A.detach()[idx], self.lora_B.detach()[idx], drop(self.layout.ranks),
                          drop(self.alphas), drop(self.scaling_rules))

    @torch.no_grad()
    def resize(self, ranks: Sequence[int]) -> None:
        """Change adapter ranks in place: truncate trailing components or append zero ones."""
        new = AdapterLayout(ranks)
        if new.num_adapters != self.num_adapters:
            raise ValueError(f"ranks must have {self.num_adapters} entries, got {new.num_adapters}")
        A = self.lora_A.new_zeros(new.total_rank, self.in_features)
        B = self.lora_B.new_zeros(new.total_rank, self.out_features)
        for k in range(self.num_adapters):
            n = min(new.ranks[k], self.layout.ranks[k])
            src, dst = self.layout.offsets[k], new.offsets[k]
            A[dst : dst + n] = self.lora_A[src : src + n]
            B[dst : dst + n] = self.lora_B[src : src + n]
        self.set_adapters(A, B, new)

    @torch.no_grad()
    def load_adapter(
        self, k: int, A_k: torch.Tensor, B_k: torch.Tensor, alpha: float | None = None, scaling_rule: str | None = None
    ) -> None:
        """Put ``A_k [r, d_in]``, ``B_k [r, d_out]`` into slot k (its rank becomes r).  Everything is
        checked before the first write: a refused call leaves the layer as it was."""
        self._check_slot(k)
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                                  or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
        if scaling_rule is not None and scaling_rule not in SCALING_RULES:
            raise ValueError(f"scaling_rule must be one of {SCALING_RULES}, got {scaling_rule!r}")
        if A_k.dim() != 2 or A_k.shape[1] != self.in_features:
            raise ValueError(f"A_k must be [r, {self.in_features}], got {tuple(A_k.shape)}")
        if B_k.dim() != 2 or B_k.shape != (A_k.shape[0], self.out_features):
            raise ValueError(f"B_k must be [{A_k.shape[0]}, {self.out_features}], got {tuple(B_k.shape)}")
        ranks = list(self.layout.ranks)
        ranks[k] = A_k.shape[0]
        self.resize(ranks)
        rows = self.layout.rows(k)
        self.lora_A[rows] = A_k.to(self.lora_A)
        self.lora_B[rows] = B_k.to(self.lora_B)
        if alpha is not None:
            self.alphas[k] = float(alpha)
        if scaling_rule is not None:
            self.scaling_rules[k] = scaling_rule
        self._refresh_scaling()

    # -- forward --------------------------------------------------------------------------------
    # eager under torch.compile: the build reads the ids back, and traced, a list's values would be
    # constants of the graph (one graph per mix of adapters)
    @torch.compiler.disable
    def _own_groups(self, x: torch.Tensor, adapter_ids) -> TokenGroups:
        r = Routing()
        r.set(torch.as_tensor(adapter_ids, device=x.device), self.num_adapters)
        return r.groups_for(x)

    def _groups(self, x: torch.Tensor, adapter_ids, groups) -> TokenGroups | None:
        if groups is not None:
            return groups
        if adapter_ids is not None:
            return self._own_groups(x, adapter_ids)
        if self.routing is not None and self.routing.adapter_ids is not None:
            return self.routing.groups_for(x)
        if self.num_adapters == 1:
            n = x.numel() // self.in_features if self.in_features else 0
            if self.routing is not None:
                return self.routing.single(n, x.device)
            return TokenGroups.from_lengths([n]).to(x.device)
        hint = ""
        if torch._C._current_graph_task_id() != -1:
            hint = ("; this call comes from a backward pass, after the forward that routed it had returned "
                    "(gradient checkpointing recomputes layers there): run forward and backward inside "
                    "`with model.route(adapter_ids):`")
        raise ValueError(
            f"adapter_ids is required: this layer holds {self.num_adapters} adapters "
            f"(pass adapter_ids= per sequence, or groups=){hint}"
        )

    def forward(
        self,
        x: torch.Tensor,
        adapter_ids: torch.Tensor | Sequence[int] | None = None,
        groups: TokenGroups | None = None,
    ) -> torch.Tensor:
        """``x: [batch, ..., d_in] -> [batch, ..., d_out]``.

        Args:
            adapter_ids: ``[batch]`` adapter of each row of x (``-1``: base only); or
            groups: a `TokenGroups` over the flattened ``batch * ...`` tokens.
            Neither: the owning model's routing, or adapter 0 when K == 1.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in d_in={self.in_features}, got shape {tuple(x.shape)}")
        g = self._groups(x, adapter_ids, groups)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if g.num_tokens != x2.shape[0]:
            raise ValueError(f"groups cover {g.num_tokens} tokens but x holds {x2.shape[0]}")
        xa = x2.to(self.lora_A.dtype)
        if torch.compiler.is_compiling():
            scaling = self._scaling_cpu
        else:
            scaling = self._scaling_host if self.num_adapters > 1 else self._scaling_host[0]
        if self._plain_linear() and isinstance(self.lora_dropout, nn.Identity) and xa is x2:
            w = self.base_layer.weight
            if w.dtype == x2.dtype:
                y = lora_linear(x2, w, self.base_layer.bias, self.lora_A, self.lora_B, self.layout, g, scaling)
                return y.reshape(*lead, self.out_features)
        base = self.base_layer(x)
        delta = lora_delta(self.lora_dropout(xa), self.lora_A, self.lora_B, self.layout, g, scaling)
        return base + delta.to(base.dtype).reshape(*lead, self.out_features)

    def _plain_linear(self) -> bool:
        """Whether the fused path (base GEMM and LoRA in one op, the wrapped module not called)
        computes what calling it would: an ``nn.Linear`` with its own forward and no hooks on it
        (a forward hook may change or record the output; accelerate's offloading is such a hook)."""
        b = self.base_layer
        return (type(b).forward is nn.Linear.forward and "forward" not in b.__dict__ and not b._forward_hooks
                and not b._forward_pre_hooks and not _global_forward_hooks and not _global_forward_pre_hooks)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, ranks={list(self.layout.ranks)}, "
            f"alphas={self.alphas}, scaling_rules={self.scaling_rules}, dropout={self.dropout_p}"
        )

"""Packed mixed-rank adapter layout and per-batch token grouping.

`AdapterLayout` describes how K adapters of ranks ``r_k`` share one rank-major
packed pair ``A [R, d_in]``, ``B [R, d_out]`` (``R = sum r_k``; adapter k owns rows
``offsets[k]:offsets[k+1]``).  `TokenGroups` is the token -> adapter mapping of
one batch: it is built once (one stable sort) and shared by every layer.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field

import torch

__all__ = ["AdapterLayout", "TokenGroups"]


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()
                and not value.is_complex() and value.dtype != torch.bool):
            return int(value.item())
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return int(value)


class AdapterLayout:
    """Ranks of K adapters packed rank-major into one ``[R, d]`` tensor pair.

    Args:
        ranks: K positive ints, adapter k's rank ``r_k``.

    Attributes:
        ranks: tuple of K ints.
        offsets: tuple of K+1 ints; adapter k owns rows ``offsets[k]:offsets[k+1]``.
        num_adapters: K.  total_rank: R.  max_rank: ``max r_k``.
    """

    __slots__ = ("ranks", "offsets", "num_adapters", "total_rank", "max_rank", "_cache")

    def __init__(self, ranks: Sequence[int] | torch.Tensor | AdapterLayout):
        if isinstance(ranks, AdapterLayout):
            ranks = ranks.ranks
        if isinstance(ranks, torch.Tensor):
            if ranks.dim() != 1 or ranks.is_floating_point():
                raise TypeError("ranks must be a 1-D integer tensor or a sequence of ints")
            ranks = ranks.tolist()
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise TypeError(f"ranks must be a sequence of ints, got {type(ranks).__name__}")
        if len(ranks) == 0:
            raise ValueError("ranks must name at least one adapter, got an empty sequence")
        rs = tuple(_as_int(r, f"ranks[{i}]") for i, r in enumerate(ranks))
        bad = [(i, r) for i, r in enumerate(rs) if r <= 0]
        if bad:
            i, r = bad[0]
            raise ValueError(f"ranks must be positive, got ranks[{i}] = {r}")
        offs = [0]
        for r in rs:
            offs.append(offs[-1] + r)
        # immutable: kernels trust these fields, so they are set once here and never again
        init = object.__setattr__
        init(self, "ranks", rs)
        init(self, "offsets", tuple(offs))
        init(self, "num_adapters", len(rs))
        init(self, "total_rank", offs[-1])
        init(self, "max_rank", max(rs))
        init(self, "_cache", {})

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"AdapterLayout is immutable (tried to set {name!r}); build a new AdapterLayout")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"AdapterLayout is immutable (tried to delete {name!r})")

    # copy, deepcopy and pickle (a model that holds layouts: copy.deepcopy, torch.save) rebuild
    # from the ranks, through __init__'s checks, instead of setting the frozen fields one by one
    def __reduce__(self):
        return (AdapterLayout, (self.ranks,))

    def __copy__(self) -> AdapterLayout:
        return self  # immutable: a copy would be the same

    def __deepcopy__(self, memo: dict) -> AdapterLayout:
        return self

    # -- derived index tensors, cached per device -------------------------------------------
    def _cached(self, key: str, device: torch.device | str | None, build) -> torch.Tensor:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        k = (key, dev)
        t = self._cache.get(k)
        if t is None:
            t = to_device(build(), dev)
            self._cache[k] = t
        return t

    def ranks_tensor(self, device=None) -> torch.Tensor:
        """``[K]`` int64 ranks on ``device``."""
        return self._cached("ranks", device, lambda: torch.tensor(self.ranks, dtype=torch.int64))

    def offsets_tensor(self, device=None) -> torch.Tensor:
        """``[K+1]`` int64 row offsets on ``device``."""
        return self._cached("offsets", device, lambda: torch.tensor(self.offsets, dtype=torch.int64))

    def row_adapter(self, device=None) -> torch.Tensor:
        """``[R]`` int64: the adapter that owns each packed row."""
        return self._cached(
            "row_adapter",
            device,
            lambda: torch.repeat_interleave(torch.arange(self.num_adapters), torch.tensor(self.ranks)),
        )

    def row_component(self, device=None) -> torch.Tensor:
        """``[R]`` int64: each packed row's component index ``j`` within its adapter."""

        def build():
            offs = torch.tensor(self.offsets[:-1])
            return torch.arange(self.total_rank) - torch.repeat_interleave(offs, torch.tensor(self.ranks))

        return self._cached("row_component", device, build)

    def rank_classes(self, device=None) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
        """Per distinct rank ``r`` (ascending): ``(r, adapters [n] int64, rows [n * r] int64)``, the
        packed rows of those ``n`` adapters in adapter order, so that ``A[rows].view(n, r, -1)`` is
        their factors as one batch.  Cached per device."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = ("rank_classes", dev)
        out = self._cache.get(key)
        if out is None:
            by_rank: dict[int, list[int]] = {}
            for k, r in enumerate(self.ranks):
                by_rank.setdefault(r, []).append(k)

            def ints(v: list[int]) -> torch.Tensor:
                return to_device(torch.tensor(v, dtype=torch.int64), dev)

            out = tuple(
                (r, ints(ks), ints([self.offsets[k] + j for k in ks for j in range(r)]))
                for r, ks in sorted(by_rank.items())
            )
            self._cache[key] = out
        return out

    def rows(self, k: int) -> slice:
        """Packed rows of adapter ``k``."""
        if not -self.num_adapters <= k < self.num_adapters:
            raise IndexError(f"adapter index {k} out of range for {self.num_adapters} adapters")
        k %= self.num_adapters
        return slice(self.offsets[k], self.offsets[k + 1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdapterLayout) and other.ranks == self.ranks

    def __hash__(self) -> int:
        return hash(self.ranks)

    def __len__(self) -> int:
        return self.num_adapters

    def __repr__(self) -> str:
        return f"AdapterLayout(ranks={list(self.ranks)})"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``.  A host tensor bound for a GPU goes through pinned memory with
    ``non_blocking``: a plain copy from pageable memory makes the host wait until the GPU has
    finished everything queued before it (the caching host allocator keeps the pinned block
    until the copy is done)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(eq=False, frozen=True)
class TokenGroups:
    """Token -> adapter mapping of one batch, sorted once and shared by every layer.

    Attributes:
        adapter_ids: ``[T]`` int64, adapter of each token (``-1``: base output only).
        num_adapters: K.
        order: ``[T]`` int64 stable argsort of ``adapter_ids``; the ``-1`` tokens come first.
        starts: ``[K+1]`` int64; tokens of adapter k are ``order[starts[k]:starts[k+1]]``.
        counts: ``[K]`` int64 tokens per adapter.
        counts_list / starts_list: the same on the host (read once at build time so that
            no layer has to synchronise with the device again).
        is_sorted: ``order`` is the identity (tokens already grouped, no ``-1``), so
            implementations may skip the gather/scatter.
        host_meta: ``[2K+2]`` int64 on the CPU, ``starts_list + counts_list + (is_sorted,)``:
            the host facts as a tensor, so that a compiled graph carries them as data
            (`hetlora_kernels.custom_ops`) instead of specialising on their values.
    """

    adapter_ids: torch.Tensor
    num_adapters: int
    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor
    counts_list: tuple[int, ...]
    starts_list: tuple[int, ...]
    is_sorted: bool
    # not init fields: `dataclasses.replace` would carry them over, and a replaced batch would then
    # share the old one's routing cache and skip the validation
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    _trusted: InitVar[bool] = False
    host_meta: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self, _trusted: bool) -> None:
        # The classmethods build consistent groups; a TokenGroups assembled by hand is
        # checked in full once here (kernels index memory through these fields).
        if not _trusted:
            _validate_groups(self)
        meta = torch.tensor((*self.starts_list, *self.counts_list, int(self.is_sorted)), dtype=torch.int64)
        object.__setattr__(self, "host_meta", meta)
        # the custom ops find these groups (and the kernel schedules cached on them) from it; the
        # entry lives as long as the groups, which hold the tensor, so its id cannot be reused
        _BY_HOST_META[id(meta)] = self

    @property
    def num_tokens(self) -> int:
        return int(self.adapter_ids.shape[0])

    @property
    def num_routed(self) -> int:
        """Tokens that belong to some adapter (id != -1)."""
        return self.starts_list[-1] - self.starts_list[0]

    @property
    def num_active(self) -> int:
        """Adapters that own at least one token."""
        n = self._cache.get("num_active")
        if n is None:
            n = self._cache["num_active"] = sum(1 for c in self.counts_list if c)
        return n

    @property
    def device(self) -> torch.device:
        return self.adapter_ids.device

    @classmethod
    def from_adapter_ids(cls, adapter_ids: torch.Tensor | Sequence[int], num_adapters: int) -> TokenGroups:
        """Build the groups of a batch.

        Args:
            adapter_ids: ``[T]`` integers in ``[-1, num_adapters)``, any order.
            num_adapters: K, the number of adapters of the layout the groups will serve.
        """
        num_adapters = _as_int(num_adapters, "num_adapters")
        if num_adapters <= 0:
            raise ValueError(f"num_adapters must be positive, got {num_adapters}")
        if not isinstance(adapter_ids, torch.Tensor):
            try:
                # no dtype= here: it would silently truncate floats (0.5 -> 0) instead of refusing them
                adapter_ids = torch.as_tensor(adapter_ids)
                if adapter_ids.numel() == 0 and adapter_ids.dtype.is_floating_point:
                    adapter_ids = adapter_ids.to(torch.int64)  # [] has no element type
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"adapter_ids must be a 1-D integer tensor: {e}") from None
            if adapter_ids.dim() == 0 or (adapter_ids.numel() == 0 and adapter_ids.dim() != 1):
                adapter_ids = adapter_ids.reshape(-1)
        if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
            raise TypeError(f"adapter_ids must be an integer tensor, got dtype {adapter_ids.dtype}")
        if adapter_ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D [T], got shape {tuple(adapter_ids.shape)}")
        ids = adapter_ids.to(torch.int64)
        T = ids.shape[0]
        K = num_adapters
        # counts of ids -1..K-1 in one bincount, shifted so -1 lands in bin 0 (clamped so that a
        # bad id cannot fault the bincount: it is refused below, before anything uses it)
        binc = torch.bincount((ids + 1).clamp(0, K), minlength=K + 1)
        counts = binc[1:]
        starts = torch.cumsum(binc, 0)  # starts[k] = #tokens with id < k
        # everything the host needs in one transfer (on a GPU: one synchronisation per batch)
        if T:
            lo, hi = torch.aminmax(ids)
            flag = (ids[1:] >= ids[:-1]).all() if T > 1 else torch.ones((), dtype=torch.bool, device=ids.device)
            host = torch.cat([starts, counts, torch.stack([lo, hi, flag.to(torch.int64)])]).tolist()
            lo, hi, ordered = host[-3:]
            if lo < -1 or hi >= K:
                bad = lo if lo < -1 else hi
                raise ValueError(f"adapter_ids must lie in [-1, {K - 1}] (num_adapters={K}), found {bad}")
        else:
            host, ordered = torch.cat([starts, counts]).tolist() + [0, 0, 1], True
        starts_list = tuple(host[: K + 1])
        counts_list = tuple(host[K + 1: 2 * K + 1])
        order = torch.sort(ids, stable=True).indices
        is_sorted = starts_list[0] == 0 and bool(ordered)
        return cls(ids, K, order, starts, counts, counts_list, starts_list, is_sorted, _trusted=True)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor | Sequence[int]) -> TokenGroups:
        """Groups for a batch whose tokens are already contiguous per adapter.

        Args:
            lengths: ``[K]`` non-negative ints; the first ``lengths[0]`` tokens belong to
                adapter 0, the next ``lengths[1]`` to adapter 1, and so on.
        """
        if isinstance(lengths, torch.Tensor):
            if (lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex()
                    or lengths.dtype == torch.bool):
                raise TypeError(f"lengths must be a 1-D integer tensor or a sequence of ints, got {lengths.dtype}"
                                f" of shape {tuple(lengths.shape)}")
            device = lengths.device
            lens = lengths.tolist()
        else:
            device = torch.device("cpu")
            if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
                raise TypeError(f"lengths must be a sequence of ints, got {type(lengths).__name__}")
            lens = [_as_int(n, f"lengths[{i}]") for i, n in enumerate(lengths)]
        if len(lens) == 0:
            raise ValueError("lengths must name at least one adapter")
        for i, n in enumerate(lens):
            if n < 0:
                raise ValueError(f"lengths must be non-negative, got lengths[{i}] = {n}")
        K = len(lens)
        counts = torch.tensor(lens, dtype=torch.int64, device=device)
        ids = torch.repeat_interleave(torch.arange(K, device=device), counts)
        starts = torch.zeros(K + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=starts[1:])
        order = torch.arange(ids.shape[0], device=device)
        return cls(ids, K, order, starts, counts, tuple(lens), tuple(starts.tolist()), True, _trusted=True)

    def routed_order(self) -> torch.Tensor:
        """``[T_routed]`` token indices of every routed token, grouped by adapter."""
        t = self._cache.get("routed")
        if t is None:
            t = self.order[self.starts_list[0] :]
            self._cache["routed"] = t
        return t

    def to(self, device: torch.device | str) -> TokenGroups:
        """The same groups on ``device`` (host to GPU without waiting for the GPU: `to_device`)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return TokenGroups(
            to_device(self.adapter_ids, device),
            self.num_adapters,
            to_device(self.order, device),
            to_device(self.starts, device),
            to_device(self.counts, device),
            self.counts_list,
            self.starts_list,
            self.is_sorted,
            _trusted=True,
        )

    def __repr__(self) -> str:
        return (
            f"TokenGroups(num_tokens={self.num_tokens}, num_adapters={self.num_adapters}, "
            f"counts={list(self.counts_list)})"
        )


_BY_HOST_META: weakref.WeakValueDictionary[int, TokenGroups] = weakref.WeakValueDictionary()


def groups_of(host_meta: torch.Tensor) -> TokenGroups | None:
    """The live `TokenGroups` whose ``host_meta`` is this very tensor, else None."""
    g = _BY_HOST_META.get(id(host_meta))
    return g if g is not None and g.host_meta is host_meta else None


def _validate_groups(g: TokenGroups) -> None:
    """Full consistency check of a hand-assembled `TokenGroups`; ``ValueError``/``TypeError``
    naming the field.  Costs O(T) device work and one synchronisation."""

    def int_tensor(t: object, name: str, n: int | None) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"groups.{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 1 or (n is not None and t.shape[0] != n):
            raise ValueError(f"groups.{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
        return t

    ids = int_tensor(g.adapter_ids, "adapter_ids", None)
    K = _as_int(g.num_adapters, "groups.num_adapters")
    if K <= 0:
        raise ValueError(f"groups.num_adapters must be positive, got {K}")
    T = ids.shape[0]
    order = int_tensor(g.order, "order", T)
    starts = int_tensor(g.starts, "starts", K + 1)
    counts = int_tensor(g.counts, "counts", K)
    for name, t in (("order", order), ("starts", starts), ("counts", counts)):
        if t.device != ids.device:
            raise ValueError(f"groups.{name} is on {t.device} but groups.adapter_ids is on {ids.device}")
    sl, cl = tuple(g.starts_list), tuple(g.counts_list)
    if len(sl) != K + 1 or len(cl) != K:
        raise ValueError(f"groups.starts_list must hold K+1={K + 1} and counts_list K={K} entries")
    if sl[0] < 0 or sl[-1] != T or any(b < a for a, b in zip(sl, sl[1:])):
        raise ValueError(f"groups.starts_list must rise from >= 0 to T={T}, got {list(sl)}")
    if any(c != b - a for c, a, b in zip(cl, sl, sl[1:])):
        raise ValueError("groups.counts_list disagrees with groups.starts_list")
    if starts.tolist() != list(sl) or counts.tolist() != list(cl):
        raise ValueError("groups.starts / groups.counts disagree with starts_list / counts_list")
    if T:
        if not torch.equal(torch.sort(order).values, torch.arange(T, device=order.device)):
            raise ValueError(f"groups.order must be a permutation of range(T={T})")
        expect = torch.cat(
            [
                torch.full((sl[0],), -1, dtype=torch.int64, device=ids.device),
                torch.repeat_interleave(torch.arange(K, device=ids.device), counts),
            ]
        )
        if not torch.equal(ids[order], expect):
            raise ValueError("groups.adapter_ids disagree with groups.order / starts")
    if g.is_sorted and (sl[0] != 0 or (T and not torch.equal(order, torch.arange(T, device=order.device)))):
        raise ValueError("groups.is_sorted is True but the tokens are not grouped in order without -1 ids")

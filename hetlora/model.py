"""`MultiLoraModel`: inject `HetLoraLinear` into any transformers model, peft-style.

Every targeted layer shares one adapter layout (one rank per adapter, the same in
every layer) and one `Routing`, so a forward pass builds its `TokenGroups` once and
all layers reuse them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from hetlora_kernels import AdapterLayout

from .layer import HetLoraLinear, Routing, _is_conv1d, per_adapter


def match_module_names(model: nn.Module, spec: str | Sequence[str], what: str) -> list[str]:
    """Module names selected as peft selects them: a regex (full match) or a list of
    names, each matching a module whose name equals it or ends with ``"." + name``."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(spec, str):
        try:
            pat = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{what} is not a valid regular expression: {e}") from None
        hits = [n for n in names if pat.fullmatch(n)]
    else:
        keys = list(spec)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"{what} must be a regex string or a non-empty list of module names, got {spec!r}")
        hits = [n for n in names if any(n == k or n.endswith("." + k) for k in keys)]
    return hits


def _under_torch_compile() -> bool:
    """Whether Dynamo is watching this call's frames (a ``torch.compile``'d caller), from an
    eager frame; False when torch does not say."""
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback

        return get_eval_frame_callback() not in (None, False)
    except (ImportError, AttributeError):
        return False


def _within(name: str, root: str) -> bool:
    """Whether module ``name`` is ``root`` or lies inside it."""
    return name == root or name.startswith(root + ".")


class MultiLoraModel(nn.Module):
    """A transformers model whose target linear layers carry K mixed-rank LoRA adapters.

    Args:
        model: any ``transformers`` (or plain torch) model; its parameters are frozen.
        target_modules: peft-style: list of names (``["query", "value"]``) or a regex.
        ranks: K positive ints.
        alpha: LoRA alpha, one float or one per adapter.
        dropout: LoRA dropout on the adapter input.
        scaling_rule: ``"alpha/r"`` (default), ``"rslora"`` or ``"fixed"``; or one per adapter.
        modules_to_save: module names (peft-style) kept trainable and shared by all
            adapters, e.g. ``["classifier"]``; exported with each adapter.

    ``forward(*args, adapter_ids=ids, **kwargs)``: ``ids [batch]`` names each sequence's
    adapter (``-1``: base model only); an int applies one adapter to all sequences.

    Every adapted layer must see the batch's sequences as its leading dimension: a target layer
    that a model also runs on something else (DeBERTa-v2's relative-position embeddings go through
    ``query_proj`` as one ``[1, 2k, d]`` tensor) is refused at batch > 1 with an error naming
    ``adapter_ids``.  Attributes the wrapper lacks (``config``, ``device``, ``generation_config``)
    are the wrapped model's, as with peft's ``PeftModel``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: str | Sequence[str],
        ranks: Sequence[int],
        alpha: float | Sequence[float] = 8.0,
        dropout: float = 0.0,
        *,
        scaling_rule: str | Sequence[str] = "alpha/r",
        modules_to_save: Sequence[str] | None = None,
        init_lora_weights: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        layout = AdapterLayout(ranks)
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.routing = Routing()
        self.dropout = dropout
        self.scaling_rule = scaling_rule
        alphas = per_adapter(alpha, layout.num_adapters, "alpha")
        hits = match_module_names(model, target_modules, "target_modules")
        self.lora_module_names: list[str] = []
        for name in hits:
            mod = model.get_submodule(name)
            if isinstance(mod, HetLoraLinear):
                raise ValueError(f"target_modules matched {name!r}, which already holds LoRA adapters")
            if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
                # peft adapts an Embedding and refuses a container; skipping it would leave the user
                # believing the module adapted
                raise ValueError(f"target_modules={target_modules!r} matched {name!r} ({type(mod).__name__}): "
                                 "hetlora adapts nn.Linear and Conv1D layers only; name those")
            layer = HetLoraLinear(
                mod, layout, alphas, dropout, scaling_rule=scaling_rule, init_lora_weights=init_lora_weights
            )
            layer.routing = self.routing
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.lora_module_names.append(name)
        if not self.lora_module_names:
            sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)][:8]
            raise ValueError(
                f"target_modules={target_modules!r} matched no nn.Linear/Conv1D in the model; linear layers "
                f"include {sample}"
            )
        self.modules_to_save: list[str] = []
        if modules_to_save:
            hits = match_module_names(model, list(modules_to_save), "modules_to_save")
            top = [h for h in hits if not any(h.startswith(o + ".") for o in hits)]
            if not top:
                raise ValueError(f"modules_to_save={list(modules_to_save)!r} matched no module")
            inside = {id(p) for name in top for p in model.get_submodule(name).parameters()}
            for name in top:
                adapted = [n for n in self.lora_module_names if _within(n, name)]
                if adapted:  # its base weight would train, and the export would not load in peft
                    raise ValueError(f"modules_to_save: {name!r} holds the adapted layer(s) {adapted}; "
                                     "a module is either adapted or saved whole, not both")
            for pname, p in model.named_parameters(remove_duplicate=False):
                owner = pname.rpartition(".")[0]
                if id(p) in inside and not any(_within(owner, t) for t in top):
                    # a tied weight (GPT-2's lm_head is its input embedding): training it would
                    # change the module outside too, which the export leaves out
                    raise ValueError(f"modules_to_save: {pname!r} is tied to a parameter of {top}; a module "
                                     "whose weights are shared with the rest of the model cannot be saved apart")
            for name in top:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
            self.modules_to_save = top

    # -- structure ------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, HetLoraLinear]]:
        """``(module name, layer)`` of every adapted layer, in model order."""
        self._check_live()
        for name in self.lora_module_names:
            yield name, self.model.get_submodule(name)

    def __getattr__(self, name: str):
        # like peft's PeftModel: what the wrapper lacks (config, device, dtype, generation_config, ...) is the
        # wrapped model's; saving it whole would write the packed adapters into a transformers checkpoint
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_unloaded") or name.startswith("__"):
                raise
        if name in ("save_pretrained", "push_to_hub"):
            raise AttributeError(f"MultiLoraModel.{name}: save one adapter with export_peft(k, path), or a plain "
                                 f"model with merge_and_unload(k).{name}(...)")
        self._check_live()
        return getattr(self.model, name)

    def _check_live(self) -> None:
        if getattr(self, "_unloaded", False):
            raise RuntimeError("this MultiLoraModel was unloaded (merge_and_unload / unload): its adapters are gone; "
                               "use the model those calls returned")

    def _first(self) -> HetLoraLinear:
        self._check_live()
        return self.model.get_submodule(self.lora_module_names[0])

    @property
    def layout(self) -> AdapterLayout:
        return self._first().layout

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.layout.ranks

    @property
    def num_adapters(self) -> int:
        return self.layout.num_adapters

    @property
    def alphas(self) -> list[float]:
        return list(self._first().alphas)

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for _, layer in self.lora_layers():
            yield layer.lora_A
            yield layer.lora_B

    def set_ranks(self, ranks: Sequence[int]) -> None:
        """Truncate or zero-pad every adapter to ``ranks`` in every layer."""
        for _, layer in self.lora_layers():
            layer.resize(ranks)

    def add_adapter(self, rank: int, alpha: float = 8.0, scaling_rule: str | None = None) -> int:
        """Append a new adapter of ``rank`` to every adapted layer (peft's init: A Kaiming-uniform,
        B zero, so it starts as the base model); returns its index ``K``.  ``scaling_rule``
        defaults to the model's (a model built with one rule per adapter: required).  LoRA
        parameters are new tensors: rebuild optimisers."""
        rule = self.scaling_rule if scaling_rule is None else scaling_rule
        if not isinstance(rule, str):
            raise ValueError("scaling_rule is required: this model was built with one rule per adapter "
                             f"({list(rule)!r}), so there is no model-wide default")
        ks = {layer.add_adapter(rank, alpha, rule) for _, layer in self.lora_layers()}
        return ks.pop()

    def remove_adapter(self, k: int) -> None:
        """Drop adapter ``k`` from every adapted layer; adapters after it move down by one (so
        ``adapter_ids`` that name them must too).  LoRA parameters are new tensors."""
        from .peft_io import _check_slot

        k = _check_slot(self, k)
        if self.num_adapters == 1:
            raise ValueError("cannot remove the model's only adapter")
        for _, layer in self.lora_layers():
            layer.remove_adapter(k)

    def add_peft(self, path: str | Path, strict: bool = False) -> int:
        """Load a peft LoRA adapter directory into a new slot (`add_adapter` + `import_peft`: layers
        the file leaves out get a zero adapter unless ``strict``); returns its index.  A file
        `import_peft` refuses leaves the model as it was."""
        from .peft_io import _adapter_config, read_peft_adapter

        cfg, _ = read_peft_adapter(path)
        r, alpha, rule = _adapter_config(cfg, path)
        k = self.add_adapter(r, alpha, rule)
        try:
            self.import_peft(k, path, strict)
        except Exception:
            self.remove_adapter(k)
            raise
        return k

    def adapter_state(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter k: module name -> ``(A_k [r_k, d_in], B_k [r_k, d_out])`` clones."""
        from .peft_io import _check_slot

        k = _check_slot(self, k)
        return {name: layer.get_adapter(k) for name, layer in self.lora_layers()}

    # -- back to a plain model ------------------------------------------------------------------------
    def merge_and_unload(self, k: int | None) -> nn.Module:
        """The wrapped model with every adapted layer replaced by its base layer, adapter ``k``'s
        ``ΔW_k = s_k B_kᵀ A_k`` added to each base weight (in float32, rounded once to the
        weight's dtype); ``k=None`` puts the base layers back untouched (`unload`).

        In place, as peft's ``merge_and_unload``: the returned module is ``self.model``, and this
        MultiLoraModel refuses any further use.  The base parameters stay frozen (as the
        constructor left them); ``modules_to_save`` stay as trained.  A weight tied to another
        parameter (e.g. an LM head sharing the embeddings) is refused before anything is
        written: merging into it would change the other module too.
        """
        from .peft_io import _check_slot

        self._check_live()
        if k is not None:
            k = _check_slot(self, k)
            owners: dict[int, list[str]] = {}
            for pname, p in self.model.named_parameters(remove_duplicate=False):
                if p.device.type != "meta" and p.numel():
                    owners.setdefault(p.untyped_storage().data_ptr(), []).append(pname)
            for name, layer in self.lora_layers():
                w = layer.base_layer.weight
                shared = [n for n in owners.get(w.untyped_storage().data_ptr(), [])
                          if n != f"{name}.base_layer.weight"] if w.device.type != "meta" else []
                if shared:
                    raise ValueError(f"cannot merge adapter {k} into {name}: its weight is tied to {shared}, which "
                                     f"would change too; merge by hand into an untied copy, or serve the adapter "
                                     f"unmerged")
        for name, layer in list(self.lora_layers()):
            base = layer.merge_into_base(k) if k is not None else layer.base_layer
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, base)
        self.lora_module_names = []
        self._unloaded = True
        return self.model

    def unload(self) -> nn.Module:
        """The wrapped model with its original layers back, adapters dropped
        (``merge_and_unload(None)``; in place, see there)."""
        return self.merge_and_unload(None)

    # -- forward --------------------------------------------------------------------------------
    def _normalise_ids(self, adapter_ids, batch_hint: int | None) -> torch.Tensor | None:
        K = self.num_adapters
        if adapter_ids is None:
            if K == 1:
                return None  # each layer then applies adapter 0 to every token
            raise ValueError(f"adapter_ids is required: the model holds {K} adapters")
        if isinstance(adapter_ids, int) and not isinstance(adapter_ids, bool):
            if batch_hint is None:
                raise ValueError("adapter_ids given as an int needs input_ids (or a tensor input) to size the batch")
            if not -1 <= adapter_ids < K:
                raise ValueError(f"adapter_ids must lie in [-1, {K - 1}], got {adapter_ids}")
            return torch.full((batch_hint,), adapter_ids, dtype=torch.int64)
        if isinstance(adapter_ids, (str, bytes, float, bool)):
            raise TypeError(f"adapter_ids must be an int or a 1-D integer tensor/sequence, got {adapter_ids!r}")
        try:
            ids = torch.as_tensor(adapter_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"adapter_ids must be an int or a 1-D integer tensor/sequence ({e})") from None
        if ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):  # uint8 cannot hold -1
            raise TypeError(f"adapter_ids must hold signed integers (-1 = base model), got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"adapter_ids must be 1-D [batch], got shape {tuple(ids.shape)}")
        if batch_hint is not None and ids.shape[0] != batch_hint:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but the batch has {batch_hint} sequences")
        return ids

    @torch.compiler.disable  # never traced: it reads the ids back to the host
    def _route(self, adapter_ids, args: tuple, kwargs: dict, expand: bool = False, compiled: bool = False) -> None:
        """Route this call's sequences to their adapters (the batch sized by input_ids or inputs_embeds, else
        by the first tensor argument: a broadcastable [1, L] position_ids passed first must not size it).
        Without ``adapter_ids`` inside a `route` block, the block's ids.

        Builds here the token groups of the layers that see ``[batch, length, d]`` inputs, and with
        ``compiled`` also ``[batch, d]`` ones (a pooler's): a compiled model then finds them built
        and traces its layers in one graph."""
        self._check_live()
        lead = [a for a in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
                if isinstance(a, torch.Tensor)]
        first = lead[0] if lead else next((a for a in kwargs.values() if isinstance(a, torch.Tensor)), None)
        batch = first.shape[0] if first is not None and first.dim() > 0 else None
        if adapter_ids is None and self.routing.adapter_ids is not None:
            adapter_ids = self.routing.adapter_ids  # a `route` block's
        self.routing.set(self._normalise_ids(adapter_ids, batch), self.num_adapters, expand)
        if expand:
            return
        ids, emb = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            batch, length, device = ids.shape[0], ids.shape[1], ids.device
        elif isinstance(emb, torch.Tensor) and emb.dim() == 3:
            batch, length, device = emb.shape[0], emb.shape[1], emb.device
        else:
            return
        if self.routing.adapter_ids is None:  # one adapter, every token on it
            self.routing.prebuild_single(batch * length, device)
            if compiled:
                self.routing.prebuild_single(batch, device)
            return
        self.routing.prebuild(length, device)
        if compiled:
            self.routing.prebuild(1, device)  # a pooler's [batch, d]: one more build, not a graph break

    @contextlib.contextmanager
    def _routed(self, adapter_ids, args: tuple, kwargs: dict, expand: bool = False,
                compiled: bool = False) -> Iterator[None]:
        before = self.routing.save()
        self._route(adapter_ids, args, kwargs, expand, compiled)
        try:
            yield
        finally:
            self._restore(before)

    @torch.compiler.disable
    def _restore(self, state: tuple) -> None:
        self.routing.restore(state)

    @contextlib.contextmanager
    def route(self, adapter_ids, batch_size: int | None = None) -> Iterator[None]:
        """Route every call in the block to ``adapter_ids [batch]``: forward calls without
        ``adapter_ids``, calls of the wrapped model or of single layers, and the layer calls a
        backward pass makes under gradient checkpointing (which recomputes layers after the
        forward has returned, so run forward and backward inside the block).  Blocks nest.
        ``batch_size`` sizes an int ``adapter_ids``."""
        before = self.routing.save()
        self.routing.set(self._normalise_ids(adapter_ids, batch_size), self.num_adapters)
        try:
            yield
        finally:
            self.routing.restore(before)

    # Eager under torch.compile, but only this frame (recursive=False): the wrapped model's forward
    # is compiled as a frame of its own.  The routing reads the ids back to the host, and the
    # routing must be given back even when the compiled model raises (a traced finally clause is a
    # side effect Dynamo drops when its graph raises).
    @torch.compiler.disable(recursive=False)
    def forward(self, *args, adapter_ids=None, **kwargs):
        before = self.routing.save()
        self._route(adapter_ids, args, kwargs, compiled=_under_torch_compile())
        try:
            return self.model(*args, **kwargs)
        finally:
            self._restore(before)

    def generate(self, *args, adapter_ids=None, **kwargs):
        """The wrapped model's ``generate(...)`` with ``adapter_ids [batch]`` (or an int) naming
        each prompt's adapter (``-1``: base model only).  Beams and ``num_return_sequences``
        repeat each prompt in consecutive rows; every copy keeps its prompt's adapter."""
        gen = getattr(self.model, "generate", None)
        if gen is None:
            raise AttributeError(f"the wrapped {type(self.model).__name__} has no generate(): load a model "
                                 f"with a language-model head (AutoModelForCausalLM, ...)")
        with self._routed(adapter_ids, args, kwargs, expand=True):
            return gen(*args, **kwargs)

    # -- peft interop -----------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, model: nn.Module, paths: Sequence[str | Path], **kwargs) -> MultiLoraModel:
        """Serve several peft LoRA adapter directories at once: adapter ``k`` is ``paths[k]``
        (rank, alpha, rsLoRA flag from its files); the adapted layers are the union of theirs
        (`hetlora.peft_io.from_peft`)."""
        from .peft_io import from_peft

        return from_peft(model, paths, **kwargs)

    def export_peft(self, k: int, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write adapter k as a peft adapter directory (adapter_config.json + safetensors)."""
        from .peft_io import export_peft

        return export_peft(self, k, path, base_model_name_or_path)

    def import_peft(self, k: int, path: str | Path, strict: bool = False) -> None:
        """Load a peft LoRA adapter directory (weights, rank, alpha) into slot k
        (`hetlora.peft_io.import_peft`: what it cannot hold is refused, never dropped)."""
        from .peft_io import import_peft

        import_peft(self, k, path, strict)

"""Adapters to and from peft's on-disk LoRA format.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (``[r, d_in]`` = our ``A_k``) and
``...lora_B.weight`` (``[d_out, r]`` = our ``B_k^T``), plus the full weights of
``modules_to_save`` under ``base_model.model.<module>.<param>``.  Only safetensors is
read: a pickled ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .layer import scaling_value

if TYPE_CHECKING:
    from .model import MultiLoraModel

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _task_type(model: torch.nn.Module, modules_to_save: Sequence[str]) -> str | None:
    name = type(model).__name__
    # peft's classification wrappers add the head to modules_to_save and then require its
    # weights in the file: with the head frozen and left out (no modules_to_save), only the
    # task-free PeftModel loads the directory, and it computes the same thing
    # (the same when modules_to_save leaves the head out: peft would still want the head's weights)
    heads = ("classifier", "score")  # peft's classifier_module_names
    if name.endswith(("ForSequenceClassification", "ForTokenClassification")) and not any(
            m.rpartition(".")[2] in heads for m in modules_to_save):
        return None
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def _check_slot(mlm: MultiLoraModel, k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int adapter index, got {type(k).__name__}")
    if not 0 <= k < mlm.num_adapters:
        raise ValueError(f"k must lie in [0, {mlm.num_adapters - 1}], got {k}")
    return k


def export_peft(mlm: MultiLoraModel, k: int, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``k`` of ``mlm`` to directory ``path`` in peft's format; returns the path.

    peft has no "fixed" scaling: such an adapter is written with ``lora_alpha = s * r``
    so that peft's ``alpha / r`` gives the same ``s``.
    """
    from peft import LoraConfig

    k = _check_slot(mlm, k)
    layers = list(mlm.lora_layers())
    first = layers[0][1]
    r = first.layout.ranks[k]
    rule, alpha = first.scaling_rules[k], first.alphas[k]
    lora_alpha = scaling_value(alpha, r, "fixed") * r if rule == "fixed" else alpha
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(mlm.model, "config", None), "_name_or_path", None) or None
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=[n for n, _ in layers],
        lora_dropout=float(mlm.dropout),
        use_rslora=(rule == "rslora"),
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        modules_to_save=list(mlm.modules_to_save) or None,
        task_type=_task_type(mlm.model, mlm.modules_to_save),
        base_model_name_or_path=base_model_name_or_path,
    )
    cfg_dict = cfg.to_dict()
    for key, val in cfg_dict.items():
        if isinstance(val, set):
            cfg_dict[key] = sorted(val)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        A_k, B_k = layer.get_adapter(k)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A_k.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B_k.t().contiguous()
    for name in mlm.modules_to_save:
        for pname, p in mlm.model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{pname}"] = p.detach().clone().contiguous()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # over an earlier export: its config goes first, so that no moment pairs the new weights with the
    # old config (other alphas, ranks or targets), which peft would load without a word; a run that
    # stops in between leaves a directory peft refuses (no config), not a wrong one
    (out / CONFIG_NAME).unlink(missing_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg_dict, indent=2, sort_keys=True)))
    return out


def read_peft_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, tensors with the base_model.model. prefix removed)`` of a peft directory."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"path {str(d)!r} is not a peft adapter directory")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: not a peft adapter directory")
    w_path = d / WEIGHTS_NAME
    if not w_path.is_file():
        if (d / "adapter_model.bin").exists():
            raise ValueError(
                f"{d} holds only adapter_model.bin (a pickle); hetlora never unpickles files. "
                "Re-save the adapter with safe_serialization=True"
            )
        raise FileNotFoundError(f"{w_path} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    tensors = load_file(str(w_path))
    stripped = {}
    for key, t in tensors.items():
        stripped[key[len(PREFIX) :] if key.startswith(PREFIX) else key] = t
    return cfg, stripped


# adapter_config.json fields of peft LoRA variants that compute something other than W x + s B^T A x on
# every token over the unchanged base model: (field, is it in use, why hetlora cannot serve it)
_VARIANTS = (
    ("use_dora", bool, "DoRA adapters (use_dora=true) rescale the merged weight by a magnitude vector"),
    ("alora_invocation_tokens", lambda v: v is not None,
     "aLoRA (alora_invocation_tokens) applies the adapter only from its invocation tokens on, hetlora to every "
     "token of a sequence"),
    ("lora_bias", bool, "lora_bias=true gives lora_B a bias, which hetlora's adapters do not hold"),
    ("bias", lambda v: v not in (None, "none"),
     "bias != 'none' trains the base layers' biases, which every adapter served here would share"),
    ("layer_replication", bool, "layer_replication changes the base model's layers"),
    ("trainable_token_indices", bool, "trainable_token_indices trains embedding rows every adapter would share"),
    ("target_parameters", bool, "target_parameters puts LoRA on parameters, not on linear layers"),
    ("megatron_config", bool, "Megatron parallel linear layers are not linear layers hetlora can wrap"),
    ("use_qalora", bool, "QALoRA pools the input of quantised layers"),
    ("use_bdlora", bool, "BD-LoRA splits the factors into blocks across devices"),
    ("kasa_config", lambda v: v is not None, "KaSA truncates the base weight's singular values"),
    ("monteclora_config", lambda v: v is not None, "MonteCLoRA samples its factors from learned distributions"),
    ("velora_config", lambda v: v is not None, "VeLoRA compresses the activations of the LoRA path"),
    ("lora_ga_config", lambda v: v is not None,
     "LoRA-GA subtracts its initial product from the base weight, as PiSSA does"),
)
# initialisations after which peft rewrites the base weights when it loads the adapter (the adapter was
# trained against that residual of W, not against W)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _adapter_config(cfg: dict, path: str | Path) -> tuple[int, float, str]:
    """``(rank, alpha, scaling rule)`` of a peft adapter_config.json, or a ValueError naming what
    hetlora cannot hold (another peft type, a LoRA variant, per-layer ranks or alphas)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters can be imported")
    for key, used, why in _VARIANTS:
        if used(cfg.get(key)):
            raise ValueError(f"{path}: {key}={cfg.get(key)!r}: {why}; hetlora serves plain LoRA adapters only")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{path}: init_lora_weights={init!r}: peft rewrites the base weights when it loads this adapter (it "
            f"was trained against a residual of W), while hetlora serves adapters over the unchanged base. Save "
            f"it as a plain LoRA adapter with peft's save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...) and load that")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: adapter_config.json has r={r!r}, expected a positive int")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{path}: adapter_config.json has lora_alpha={alpha!r}, expected a finite positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        ref = r if key == "rank_pattern" else alpha
        if any(v != ref for v in pattern.values()):
            raise ValueError(
                f"{path}: {key} gives layers different values; hetlora holds one rank and alpha per adapter"
            )
    return r, alpha, "rslora" if cfg.get("use_rslora") else "alpha/r"


def _foreign_tensor(path, key: str) -> ValueError:
    """The error for a tensor of a peft file that is neither a LoRA pair nor a module to save here."""
    if "lora_magnitude_vector" in key:
        why = "a DoRA magnitude vector"
    elif "lora_embedding_" in key:
        why = "LoRA on an embedding layer, which hetlora does not hold"
    elif key.endswith(".lora_B.bias"):
        why = "a bias of lora_B (lora_bias=true), which hetlora's adapters do not hold"
    elif ".base_layer." in key:
        why = ("a copy of a base layer's weights that peft saves beside adapters of embedding or output layers "
               "(save_embedding_layers); re-save the adapter with save_embedding_layers=False")
    elif key.endswith(".bias"):
        why = "a trained bias (bias != 'none'), which every adapter served here would share"
    else:
        why = "not a lora_A/lora_B weight of a linear layer"
    return ValueError(f"{path}: tensor {key!r} is {why}; hetlora refuses the adapter rather than drop it")


def _checked_pair(path, name: str, A: torch.Tensor | None, Bt: torch.Tensor | None, r: int, d_in: int,
                  d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A [r, d_in], lora_B [d_out, r])`` of module ``name``, or a ValueError saying what is wrong."""
    if A is None or Bt is None:
        raise ValueError(f"{path}: module {name!r} lacks lora_A or lora_B")
    if A.shape != (r, d_in) or Bt.shape != (d_out, r):
        raise ValueError(
            f"{path}: module {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(Bt.shape)}; "
            f"expected ({r}, {d_in}) and ({d_out}, {r})"
        )
    return A, Bt


def import_peft(mlm: MultiLoraModel, k: int, path: str | Path, strict: bool = False) -> None:
    """Load a peft LoRA adapter (weights, rank, alpha, rsLoRA flag) into slot ``k``.

    A layer this model adapts that the file leaves out gets a zero adapter (the adapter leaves it
    alone, as in peft), unless ``strict``, which refuses such a file.  Whatever the model cannot
    hold is always refused, never dropped: a layer the model does not adapt, a tensor that is no
    LoRA pair (DoRA, LoRA biases, embedding LoRA, trained biases) and is not one of the model's
    ``modules_to_save``, and the LoRA variants `_adapter_config` names.  Nothing is written
    unless the whole file checks out.

    The ``modules_to_save`` the file carries (a classifier head, say) replace the model's, which
    every slot shares: the other slots' outputs change with them (a warning says so when the
    model serves more than one adapter).
    """
    k = _check_slot(mlm, k)
    cfg, tensors = read_peft_adapter(path)
    r, alpha, rule = _adapter_config(cfg, path)

    lora: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if key.endswith(tail):
                lora.setdefault(key[: -len(tail)], {})[part] = t
                break
        else:
            other[key] = t
    ours = dict(mlm.lora_layers())
    unknown = [n for n in lora if n not in ours]
    if unknown:
        raise ValueError(
            f"{path}: adapts layers this model does not adapt ({unknown[:5]}): build the model with those "
            f"target modules, or serve the adapters together with MultiLoraModel.from_peft (which adapts the "
            f"union of their layers)")
    missing = [n for n in ours if n not in lora]
    if strict and missing:
        raise ValueError(f"{path}: leaves out layers this model adapts ({missing[:5]}); without strict they "
                         f"get a zero adapter")
    staged = {}
    for name, layer in ours.items():
        if name in lora:
            parts = lora[name]
            A_k, Bt = _checked_pair(path, name, parts.get("lora_A"), parts.get("lora_B"), r,
                                    layer.in_features, layer.out_features)
            staged[name] = (A_k, Bt.t())
        else:
            staged[name] = (torch.zeros(r, layer.in_features), torch.zeros(r, layer.out_features))
    saved_mods = {}
    for key, t in other.items():
        owner = next((m for m in mlm.modules_to_save if key.startswith(m + ".")), None)
        if owner is None:
            raise _foreign_tensor(path, key)
        saved_mods.setdefault(owner, {})[key[len(owner) + 1 :]] = t
    for owner, sd in saved_mods.items():  # checked before anything is written
        want = set(mlm.model.get_submodule(owner).state_dict())
        if set(sd) != want:
            raise ValueError(f"{path}: the saved {owner!r} has {sorted(sd)}, the model's {sorted(want)}")
    # everything checked: now write (nothing half-loaded on a bad file)
    for name, (A_k, B_k) in staged.items():
        ours[name].load_adapter(k, A_k, B_k, alpha=alpha, scaling_rule=rule)
    for owner, sd in saved_mods.items():
        mlm.model.get_submodule(owner).load_state_dict(sd)
    if saved_mods and mlm.num_adapters > 1:
        warnings.warn(f"{path}: its {sorted(saved_mods)} replaced the model's, which all {mlm.num_adapters} "
                      f"adapters share: the other slots' outputs changed too", UserWarning, stacklevel=2)


def _lora_modules(tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(modules with a LoRA pair, keys of every other tensor)`` of a stripped peft state dict."""
    modules, other = [], []
    for key in tensors:
        for tail in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(tail):
                name = key[: -len(tail)]
                if name not in modules:
                    modules.append(name)
                break
        else:
            other.append(key)
    return modules, other


def _linear_dims(mod: torch.nn.Module, name: str, path) -> tuple[int, int]:
    """``(d_in, d_out)`` of an nn.Linear or a transformers Conv1D (weight ``[d_in, d_out]``)."""
    from .layer import _is_conv1d

    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features
    if _is_conv1d(mod):
        return tuple(mod.weight.shape)
    raise ValueError(f"{path}: adapts {name!r}, a {type(mod).__name__} here, not a linear layer")


def from_peft(model: torch.nn.Module, paths, **kwargs) -> MultiLoraModel:
    """A `MultiLoraModel` over ``model`` serving the peft LoRA adapters in ``paths``: adapter
    ``k`` is ``paths[k]``, with its rank, alpha and rsLoRA flag.

    The adapted layers are the union of the adapters' LoRA modules; where an adapter leaves a
    layer alone, its slot there holds zeros of its rank, so each adapter's outputs are
    peft's.  Adapters that carry ``modules_to_save`` (a trained classifier head, ...) are
    refused: one shared module cannot hold each adapter's copy (use `import_peft` into a
    model built with ``modules_to_save`` for a single such adapter).  ``kwargs`` go to
    `MultiLoraModel` (``dropout``); nothing is loaded unless every adapter checks out.
    """
    from .model import MultiLoraModel

    if isinstance(paths, (str, Path)) or not hasattr(paths, "__iter__"):
        raise TypeError(f"paths must be a list of peft adapter directories, got {type(paths).__name__}")
    paths = list(paths)
    if not paths:
        raise ValueError("paths must name at least one peft adapter directory")
    for key in ("target_modules", "ranks", "alpha", "scaling_rule", "modules_to_save"):
        if key in kwargs:
            raise TypeError(f"from_peft() sets {key} from the adapters' files; it cannot be passed")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = dict(model.named_modules())
    targets: list[str] = []
    ranks, alphas = [], []
    for path in paths:
        cfg, tensors = read_peft_adapter(path)
        r, alpha, _ = _adapter_config(cfg, path)  # a LoRA variant is named before its extra tensors are
        modules, other = _lora_modules(tensors)
        saves = cfg.get("modules_to_save") or []
        for key in other:
            if any(key.startswith(f"{m}.") or f".{m}." in key for m in saves):
                raise ValueError(
                    f"{path}: carries trained modules_to_save {saves} ({key!r}), modules every adapter here would "
                    "share; load such an adapter alone, with import_peft into a MultiLoraModel built with "
                    "modules_to_save")
            raise _foreign_tensor(path, key)
        if not modules:
            raise ValueError(f"{path}: holds no lora_A/lora_B weights")
        absent = [m for m in modules if m not in names]
        if absent:
            raise ValueError(
                f"{path}: adapts modules this model lacks ({absent[:3]}); was it trained on another base model?"
            )
        for m in modules:  # checked against the base layers now: nothing is injected before all pass
            _checked_pair(path, m, tensors.get(m + ".lora_A.weight"), tensors.get(m + ".lora_B.weight"), r,
                          *_linear_dims(names[m], m, path))
        ranks.append(r)
        alphas.append(alpha)
        targets += [m for m in modules if m not in targets]
    order = {n: i for i, n in enumerate(names)}
    targets.sort(key=order.__getitem__)  # model order, as peft injects
    mlm = MultiLoraModel(model, targets, ranks, alpha=alphas, init_lora_weights=False, **kwargs)
    for k, path in enumerate(paths):
        import_peft(mlm, k, path, strict=False)
    return mlm

"""The autotuning specs of the Triton kernels, checked without a GPU.

Under the interpreter the kernels run untuned (one fixed config each, from the launchers'
``interpret_meta``), so a wrong autotuning spec would first show on a GPU, and some would
not show at all: Triton ignores a ``key`` that names no kernel argument (every shape would
reuse the first shape's config).  This checks each spec against its kernel's signature, the
pruning functions on small and large widths, and every launch site: on a GPU it must pass
none of the tuned meta-parameters itself (Triton refuses conflicting ones), and under the
interpreter exactly those.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from hetlora_kernels.triton import expand, fused, schedule, shrink, wgrad

MODULES = (shrink, expand, fused, wgrad)


def _kernels():
    out = []
    for mod in MODULES:
        for name, obj in vars(mod).items():
            fn = obj if hasattr(obj, "autotune_spec") else getattr(obj, "fn", None)
            spec = getattr(fn, "autotune_spec", None)
            if spec is not None:
                out.append(pytest.param(mod, name, fn, spec, id=name))
    return out


KERNELS = _kernels()


def _params(fn) -> dict[str, inspect.Parameter]:
    py = getattr(fn, "fn", fn)  # the Python function inside a JITFunction / InterpretedFunction
    return dict(inspect.signature(py).parameters)


def test_every_lora_kernel_is_autotuned():
    assert {p.values[1] for p in KERNELS} == {
        "_shrink_kernel", "_expand_kernel", "_fused_fwd_kernel", "_wgrad_kernel", "_wgrad_pair_kernel"
    }


@pytest.mark.parametrize("mod, name, fn, spec", KERNELS)
def test_spec_names_real_arguments(mod, name, fn, spec):
    params = _params(fn)
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    assert spec["key"] and set(spec["key"]) <= set(params), f"{name}: key {spec['key']} vs {list(params)}"
    assert set(spec.get("restore_value", [])) <= set(params) - constexprs
    tuned = set().union(*(c.kwargs.keys() for c in spec["configs"]))
    assert tuned and tuned <= constexprs, f"{name}: tuned {tuned} are not constexpr arguments"
    assert all(c.kwargs.keys() == tuned for c in spec["configs"]), "every config sets the same parameters"
    assert len({(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in spec["configs"]}) == len(
        spec["configs"]
    ), "duplicate configs"


@pytest.mark.parametrize("mod, name, fn, spec", KERNELS)
@pytest.mark.parametrize("width", [1, 40, 64, 100, 1024, 5000])
def test_pruning_keeps_a_fitting_config(mod, name, fn, spec, width):
    prune = spec.get("prune_configs_by", {}).get("early_config_prune")
    assert prune is not None, f"{name}: every LoRA kernel prunes configs wider than its matrix"
    named = {n: width for n in _params(fn)}
    kept = prune(spec["configs"], named)
    assert kept and all(c in spec["configs"] for c in kept)
    if width >= 256:
        assert len(kept) == len(spec["configs"]), "a wide matrix keeps every config"


def _launch_sites(mod) -> list[tuple[str, list[str], set[str]]]:
    """(kernel, keyword names passed explicitly, names inside **interpret_meta(...)) per launch."""
    tree = ast.parse(Path(inspect.getfile(mod)).read_text())

    def meta_names(call: ast.expr) -> set[str]:
        is_meta = isinstance(call, ast.Call) and getattr(call.func, "id", "") == "interpret_meta"
        return {kw.arg for kw in call.keywords} if is_meta else set()

    # `meta = interpret_meta(...)` then `kernel[grid](..., **meta)`
    named = {
        t.id: meta_names(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and meta_names(node.value)
    }
    sites = []
    for node in ast.walk(tree):
        # `kernel[grid](...)` or `launch(kernel, grid)(...)` (`hetlora_kernels.triton.launch`)
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
              and getattr(node.func.func, "id", "") == "launch" and node.func.args):
            target = node.func.args[0]
        if target is not None:
            if isinstance(target, ast.Name) and target.id.startswith("_") and target.id.endswith("_kernel"):
                explicit = [k.arg for k in node.keywords if k.arg is not None]
                meta = set()
                for k in node.keywords:
                    if k.arg is None:
                        meta |= named.get(k.value.id, set()) if isinstance(k.value, ast.Name) else meta_names(k.value)
                sites.append((target.id, explicit, meta))
    return sites


@pytest.mark.parametrize("mod, name, fn, spec", KERNELS)
def test_launches_leave_the_tuned_parameters_to_the_autotuner(mod, name, fn, spec):
    tuned = set().union(*(c.kwargs.keys() for c in spec["configs"]))
    sites = [s for s in _launch_sites(mod) if s[0] == name]
    assert sites, f"no launch of {name} found in {mod.__name__}"
    for _, explicit, meta in sites:
        assert not tuned & set(explicit), f"{name} is launched with tuned {tuned & set(explicit)} on the GPU too"
        assert meta == tuned, f"{name}: the interpreter gets {meta}, the autotuner tunes {tuned}"


@pytest.mark.parametrize("mod, name, fn, spec", KERNELS)
@pytest.mark.parametrize("value, single", [(None, False), ("1", False), ("0", True), ("off", True)])
def test_autotuning_can_be_switched_off_for_tests(mod, name, fn, spec, value, single, monkeypatch):
    """HETLORA_TRITON_AUTOTUNE=0: one config (Triton then times nothing) and no pruning of it."""
    if value is None:
        monkeypatch.delenv("HETLORA_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("HETLORA_TRITON_AUTOTUNE", value)
    options = {k: v for k, v in spec.items() if k not in ("configs", "key")}
    configs, kept = schedule.tuning(spec["configs"], options)
    if single:
        assert configs == spec["configs"][:1] and "prune_configs_by" not in kept
        assert kept == {k: v for k, v in options.items() if k != "prune_configs_by"}
    else:
        assert configs == spec["configs"] and kept == options

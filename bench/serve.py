"""Serving many adapters at once: greedy generation for a batch of requests, each naming its own
LoRA adapter (mixed ranks), tokens per second.

Methods, on the same base weights, adapters and requests:

* ``hetlora``: one `hetlora.MultiLoraModel` holding all K adapters; one ``generate`` call for
  the whole batch (``adapter_ids`` per request; the LoRA part of every layer one mixed-rank op).
* ``peft-mixed``: peft's mixed-adapter batch, the K adapters loaded into one ``PeftModel`` and
  one ``generate(..., adapter_names=...)`` call.
* ``peft-loop``: what one writes without either: for each adapter, ``set_adapter`` and one
  ``generate`` over its requests.
* ``base``: the base model alone, the same batch (the floor: no adapter work at all).

Every method decodes greedily; ``same_tokens`` is the fraction of generated tokens equal to
``peft-loop``'s (1.0: the same text; a tie between two logits may flip a token in low precision),
and ``base``'s row says what fraction of them the adapters changed (0 would make the comparison
vacuous).  In bf16/fp16 the methods round at different points (peft rounds the LoRA output to the
input dtype, then scales it and adds it to the base output in that dtype; hetlora scales and adds
in float32 and rounds once), so ``peft-loop`` is no exact reference there: each row
then also gets ``same_tokens_fp32``, its agreement with ``peft-loop`` run once in float32 (untimed),
which says which low-precision method stays closer to the exact answer.
Adapters have ranks cycling through {4, 8, 16, 32, 64} and random non-zero B (peft's zero init
would make every adapter the base model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import common as C

RANK_CYCLE = (4, 8, 16, 32, 64)
TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Config:
    model: str
    adapters: int
    requests: int
    prompt: int
    new_tokens: int


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"configs": [Config("tiny-llama", 3, 6, 8, 4)], "reps": 1},
    "cpu": {"configs": [Config("llama-100m", 4, 16, 32, 32), Config("llama-100m", 16, 16, 32, 32)], "reps": 3},
    # sized for gpu_all.sh's 45 s stage (peft-loop at 32 adapters is ~25 generate calls a repetition)
    "gpu": {"configs": [Config("llama-100m", 8, 32, 64, 16), Config("llama-100m", 32, 32, 64, 16),
                        Config("llama-1b", 8, 32, 64, 16)], "reps": 2},
}
METHODS = ("hetlora", "peft-mixed", "peft-loop", "base")
METHOD_NOTE = ("hetlora: one MultiLoraModel.generate for the whole batch (adapter_ids per request); peft-mixed: "
               "peft's generate(adapter_names=...) over the K adapters in one PeftModel; peft-loop: per adapter, "
               "set_adapter and one generate over its requests; base: the base model alone. Greedy decoding; "
               "requests name their adapters in random order; ranks cycle through {4,8,16,32,64}, LoRA on "
               "q_proj/v_proj; random-weight Llama models. same tokens: the fraction of generated tokens "
               "equal to peft-loop's (for base: the fraction the adapters changed); same as fp32 (bf16/fp16 "
               "runs): the fraction equal to peft-loop's run once in float32 on the same weights, untimed "
               "(in bf16 peft rounds the LoRA output, then scales it and adds it to the base output in bf16; "
               "hetlora scales and adds in float32 and rounds once)")


def _causal_lm(name: str, device: torch.device, dtype: torch.dtype, init_dtype: torch.dtype | None = None):
    """A random-weight Llama causal LM (`bench.e2e`'s shapes), the same weights on every call
    (made in ``init_dtype``, default ``dtype``, then cast: the float32 reference holds the
    low-precision run's weights exactly)."""
    from transformers import LlamaForCausalLM

    from bench.e2e import _llama_config

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(init_dtype or dtype)
    try:
        with torch.device(device):
            m = LlamaForCausalLM(_llama_config(name))
    finally:
        torch.set_default_dtype(old)
    return m.to(dtype).eval()


def adapter_ranks(K: int) -> list[int]:
    return [RANK_CYCLE[k % len(RANK_CYCLE)] for k in range(K)]


def _adapters(cfg: Config, device: torch.device, dtype: torch.dtype, workdir: Path) -> list[Path]:
    """K peft adapter directories (mixed ranks, random non-zero B), written by a MultiLoraModel."""
    from hetlora import MultiLoraModel

    m = MultiLoraModel(_causal_lm(cfg.model, device, dtype), TARGETS, adapter_ranks(cfg.adapters), alpha=16.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in m.lora_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return [m.export_peft(k, workdir / f"adapter{k}") for k in range(cfg.adapters)]


def _requests(cfg: Config, vocab: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """``(prompts [requests, prompt], adapter of each request)``: adapters interleaved, as
    requests arrive, not grouped."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (cfg.requests, cfg.prompt), generator=g).to(device)
    which = [int(i) for i in torch.randint(0, cfg.adapters, (cfg.requests,), generator=g)]
    return ids, which


def _generate_fn(method: str, cfg: Config, paths: list[Path], device: torch.device, dtype: torch.dtype,
                 prompts: torch.Tensor, which: list[int], init_dtype: torch.dtype | None = None):
    """A callable generating the batch's new tokens ``[requests, new_tokens]`` by ``method``
    (base weights made in ``init_dtype``, run in ``dtype``)."""
    kw = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False,
              attention_mask=torch.ones_like(prompts), pad_token_id=0)
    P = prompts.shape[1]
    if method == "base":
        model = _causal_lm(cfg.model, device, dtype)
        return lambda: model.generate(prompts, **kw)[:, P:]
    if method == "hetlora":
        from hetlora import MultiLoraModel

        model = MultiLoraModel.from_peft(_causal_lm(cfg.model, device, dtype), paths).to(device=device, dtype=dtype)
        aid = torch.tensor(which)  # host ids: the token groups are built without reading the device
        return lambda: model.generate(prompts, adapter_ids=aid, **kw)[:, P:]
    from peft import PeftModel

    model = PeftModel.from_pretrained(_causal_lm(cfg.model, device, dtype, init_dtype), str(paths[0]),
                                      adapter_name="a0")
    for k, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{k}")
    model = model.to(device=device, dtype=dtype).eval()
    if method == "peft-mixed":
        names = [f"a{k}" for k in which]
        return lambda: model.generate(input_ids=prompts, adapter_names=names, **kw)[:, P:]
    rows = {k: [i for i, w in enumerate(which) if w == k] for k in sorted(set(which))}

    def loop() -> torch.Tensor:
        out = torch.empty(len(which), cfg.new_tokens, dtype=torch.long, device=device)
        for k, idx in rows.items():
            model.set_adapter(f"a{k}")
            sel = torch.tensor(idx, device=device)
            mask = kw["attention_mask"][sel]
            out[sel] = model.generate(input_ids=prompts[sel], **{**kw, "attention_mask": mask})[:, P:]
        return out

    return loop


def bench_config(cfg: Config, device: torch.device, dtype: torch.dtype, reps: int,
                 deadline: float | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tokens: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _adapters(cfg, device, dtype, Path(tmp))
        from bench.e2e import _llama_config

        prompts, which = _requests(cfg, _llama_config(cfg.model).vocab_size, device)

        def reference() -> torch.Tensor | None:
            """Untimed: the float32 answer the low-precision rows are compared with (peft one adapter
            at a time on the same weights); once the adapter methods ran, before ``base``, whatever
            the budget says (a few seconds; the next lend's check of NOTES item 24 needs it)."""
            if dtype == torch.float32 or not tokens:
                return None
            try:
                with torch.inference_mode():
                    return _generate_fn("peft-loop", cfg, paths, device, torch.float32, prompts, which,
                                        init_dtype=dtype)()
            except Exception as e:  # noqa: BLE001 - a side measurement; the timed rows stand
                print(f"  {cfg.model} K={cfg.adapters}: no float32 reference ({type(e).__name__}: {e})", flush=True)
                return None
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        ref32 = None
        for method in METHODS:  # "base" last: the reference runs once, after the adapter methods
            if method == "base":
                ref32 = reference()
            row: dict[str, Any] = {"model": cfg.model, "adapters": cfg.adapters, "requests": cfg.requests,
                                   "prompt": cfg.prompt, "new_tokens": cfg.new_tokens, "method": method,
                                   "dtype": C.dtype_name(dtype), "ranks": adapter_ranks(cfg.adapters)}
            if deadline is not None and time.perf_counter() > deadline:
                row.update(status="skipped", reason="the time budget ran out before this method started")
                rows.append(row)
                continue
            try:
                fn = _generate_fn(method, cfg, paths, device, dtype, prompts, which)
                with torch.inference_mode():
                    tokens[method] = fn()  # warm-up (and the tokens compared below)
                    times = []
                    for _ in range(reps):
                        C.sync(device)
                        t0 = time.perf_counter()
                        fn()
                        C.sync(device)
                        times.append(time.perf_counter() - t0)
                s = statistics.median(times)
                row.update(status="ok", batch_s=s, min_batch_s=min(times), reps=reps,
                           tokens_per_s=cfg.requests * cfg.new_tokens / s)
                if method == "hetlora":
                    import hetlora_kernels as hk
                    from hetlora_kernels.dispatch import LoraWork, resolve

                    work = LoraWork(routed=cfg.requests, active=cfg.adapters, grouped=False, dtype=dtype)
                    row["backend"] = resolve("lora_linear", device, work)[0] if hk.get_backend() == "auto" \
                        else hk.get_backend()
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="oom", reason=str(e).splitlines()[0][:200])
            except Exception as e:
                first = str(e).splitlines()[0][:200] if str(e) else ""
                row.update(status="error", reason=f"{type(e).__name__}: {first}")
            finally:
                fn = None  # noqa: F841
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {cfg.model} K={cfg.adapters} {cfg.requests} requests {method}: {row.get('status')} "
                  f"{C.fmt(row.get('tokens_per_s'))} tokens/s{' ' + row['reason'] if row.get('reason') else ''}",
                  flush=True)
    ref = tokens.get("peft-loop")
    loop_row = next((r for r in rows if r["method"] == "peft-loop" and r.get("status") == "ok"), None)
    for r in rows:
        t = tokens.get(r["method"])
        if ref is not None and t is not None:
            same = float((t == ref).float().mean())
            if r["method"] == "base":
                r["changed_by_adapters"] = 1.0 - same
            else:
                r["same_tokens"] = same
        if ref32 is not None and t is not None and r["method"] != "base":
            r["same_tokens_fp32"] = float((t == ref32).float().mean())
        if loop_row and r.get("status") == "ok":
            r["speedup_vs_peft_loop"] = r["tokens_per_s"] / loop_row["tokens_per_s"]
    return rows


def table_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    hdr = ["model", "adapters", "requests", "prompt+new", "method", "backend", "batch s", "tokens/s",
           "vs peft-loop", "same tokens"]
    fp32 = any("same_tokens_fp32" in r for r in res["rows"])
    if fp32:
        hdr.append("same as fp32")
    body = []
    for r in res["rows"]:
        ok = r.get("status") == "ok"
        same = (C.fmt(r.get("same_tokens"), ".3f") if "same_tokens" in r else
                f"changed {r['changed_by_adapters']:.3f}" if "changed_by_adapters" in r else "–")
        body.append([r["model"], r["adapters"], r["requests"], f"{r['prompt']}+{r['new_tokens']}", r["method"],
                     r.get("backend") or "–", C.fmt(r.get("batch_s")) if ok else r.get("status"),
                     C.fmt(r.get("tokens_per_s")),
                     (C.fmt(r.get("speedup_vs_peft_loop"), ".2f") + "×") if r.get("speedup_vs_peft_loop") else "–",
                     same] + ([C.fmt(r.get("same_tokens_fp32"), ".3f") if "same_tokens_fp32" in r else "–"]
                              if fp32 else []))
    return hdr, body


def markdown(res: dict[str, Any]) -> str:
    parts = [C.header_md(res["machine"], "hetlora serving: many adapters in one batch, greedy generation"),
             f"Preset `{res['preset']}`. {res['method_note']}.", C.md_table(*table_rows(res))]
    errs = [r for r in res["rows"] if r.get("status") not in ("ok", None)]
    if errs:
        parts.append("Not measured:\n" + "\n".join(f"- {r['model']} K={r['adapters']} {r['method']}: "
                                                   f"{r.get('status')} — {r.get('reason')}" for r in errs))
    return "\n\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> Path:
    device, preset_name = C.resolve_run(args)
    pre = PRESETS[preset_name]
    configs = list(pre["configs"])
    if args.models:
        configs = [c for c in configs if c.model in args.models.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = C.out_dir(args.out, device)
    info = C.machine_info(device)
    budget = args.budget_s
    t_start = time.perf_counter()
    res: dict[str, Any] = {"kind": "serve", "preset": preset_name, "machine": info, "rows": [], "truncated": False,
                           "method_note": METHOD_NOTE}
    print(f"[bench serve] {info['device_name']}: preset {preset_name}, {len(configs)} configs, out {out}", flush=True)
    for cfg in configs:
        if budget is not None and time.perf_counter() - t_start > budget:
            res["truncated"] = True
            break
        res["rows"].extend(bench_config(cfg, device, dtype, pre["reps"],
                                        deadline=None if budget is None else t_start + budget))
        C.save_results(res, out, "serve", markdown)
    C.finish_info(info)
    res["wall_s"] = time.perf_counter() - t_start
    C.save_results(res, out, "serve", markdown)
    print(f"[bench serve] done in {res['wall_s']:.1f} s -> {out}", flush=True)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    C.add_preset_args(p, PRESETS, "configs (default: gpu on CUDA, else cpu)",
                      "a tiny random Llama, 1 repetition: proves the script runs")
    p.add_argument("--models", help="comma-separated subset of the preset's models")
    p.add_argument("--budget-s", type=float, help="skip the remaining configs and methods after this many seconds")

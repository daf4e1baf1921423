"""``torch.autocast``: the LoRA ops do what autocast does to ``F.linear`` (float32 inputs cast to
its dtype, the op run in it), on every backend; a model trains under it."""

from __future__ import annotations

import pytest
import torch

import hetlora_kernels as hk
from hetlora_kernels import AdapterLayout, TokenGroups, lora_delta, lora_linear

from .helpers import cpu_backend_params, random_case, rel_err

RANKS = [3, 1, 5]


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("op", ["lora_delta", "lora_linear"])
def test_the_ops_under_autocast_are_the_ops_on_cast_inputs(backend, op):
    hk.set_backend(backend)
    x, A, B, ids = random_case(RANKS, 11, 16, 12, seed=3)
    W, b = torch.randn(12, 16), torch.randn(12)
    lay, g = AdapterLayout(RANKS), TokenGroups.from_adapter_ids(ids, len(RANKS))
    leaves = [t.requires_grad_() for t in (x, A, B, W, b)]

    def run(x, A, B, W, b):
        if op == "lora_delta":
            return lora_delta(x, A, B, lay, g, [0.5, 2.0, 1.0])
        return lora_linear(x, W, b, A, B, lay, g, [0.5, 2.0, 1.0])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(*leaves)
    want = run(*(t.bfloat16() for t in leaves))
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (x, A, B))


def test_a_model_trains_under_autocast():
    """A MultiLoraModel step under bf16 autocast: gradients close to the float32 step's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetlora import MultiLoraModel

    def grads(autocast: bool):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
        m = MultiLoraModel(LlamaForCausalLM(cfg), ["q_proj", "v_proj"], [2, 4, 3], alpha=4.0)
        with torch.no_grad():
            for p in m.lora_parameters():
                p.normal_(std=0.2)
        ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(input_ids=ids, adapter_ids=torch.tensor([2, 0, 1]), labels=ids).loss
        loss.backward()
        return [p.grad for p in m.lora_parameters()]

    for a, b in zip(grads(True), grads(False)):
        assert torch.isfinite(a).all() and rel_err(a, b) < 0.1

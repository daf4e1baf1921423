"""The simulator from Python: a short HetLoRA run on MiniLM + 20 Newsgroups, then its global model
scored again, merged into a plain model and used to label text.

Run: ``.venv/bin/python examples/simulate_demo.py`` (about a minute on two CPU cores).
"""

from hetlora.fl import FedConfig, Simulation
from hetlora.fl.merged import MergedClassifier

cfg = FedConfig(  # every field is also a `hetlora simulate` flag; FedConfig() alone is the default job
    strategy="hetlora", num_clients=10, clients_per_round=4, rounds=3, local_steps=6, eval_samples=128,
    tiers=[[0.5, 2], [0.5, 8]], r_max=8, out_dir="runs", run_name="api_demo", plots=False, progress=False,
    export_clients=0,
)
sim = Simulation(cfg, verbose=False)
hist = sim.run(overwrite=True)  # writes runs/api_demo/ (a rerun replaces it): config, metrics, checkpoints
for rec in hist.records:
    print(f"round {rec['round']}: accuracy {rec['eval_acc']:.3f}, ranks sent {rec['ranks_sent']}")

out = sim.export_merged("runs/api_demo/merged")  # adapter merged into MiniLM: a plain transformers model
clf = MergedClassifier.from_dir(out)
print("labels:", clf.predict(["the space shuttle launch slipped a day", "a new graphics card for my pc"]))

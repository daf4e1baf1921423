"""The ServerApp: hetlora's `FlowerStrategy` (HetLoRA by default) with its settings from the run config."""

from hetlora.flower import make_server_app

app = make_server_app()

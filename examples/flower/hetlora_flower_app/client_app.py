"""The ClientApp: trains with hetlora's own local-training code on the node's partition
(``node_config`` partition-id) at its rank (``node_config`` rank if the node declares one)."""

from hetlora.flower import make_client_app

app = make_client_app()

"""A Flower app around `hetlora.flower`: see ../README.md."""

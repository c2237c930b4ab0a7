"""Entry points; each runs as `python scripts/NAME.py`, `python -m scripts.NAME` or `accelerate launch -m scripts.NAME`
(the last two from the checkout)."""

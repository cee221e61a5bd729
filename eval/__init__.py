"""Evaluation entry points, run as `python -m eval.<name>`."""

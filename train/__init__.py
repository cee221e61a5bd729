"""Training entry points, run as `python -m train.<name>`."""

"""Key-value arithmetic (paper §4.1, Table 1) on the calm_jax.experiment skeleton.

    python -m train.kv_arithmetic [--preset default|tiny|paper] [--out runs/kv_arithmetic] [--fresh]

data.py is the task's data and tokenizer, task.py the Task the skeleton runs, presets.py
its scales; __main__.py the command line.
"""

import os

# Eight simulated CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# float32 means float32 on every backend: GPUs would otherwise run float32 matmuls in TF32
# (10 mantissa bits), outside the float32 bounds the tests state (tests/numerics.py).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

"""The pipeline of train.kv_arithmetic on a variant of the default preset, optionally reusing
trained base models (what produced logs/explore/; since then `python -m train.kv_arithmetic
--set FIELD=VALUE` does the same without the reuse).

    REUSE_MA=runs/x/m_A REUSE_MB=runs/y/m_B python results/kv_arithmetic/diagnostics/variant.py OUT \
        task.n_kv=500 task.max_value=99 train_C.steps=3000 'connections=((1,2),(1,3))'

REUSE_MA / REUSE_MB: HF directories of an m_A / m_B to copy into OUT (their training is skipped).
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
from train import kv_arithmetic as kva  # noqa: E402

out, overrides = sys.argv[1], sys.argv[2:]
print(kva.get_preset("default", overrides))
for name, env in (("m_A", "REUSE_MA"), ("m_B", "REUSE_MB")):
    if os.environ.get(env) and not os.path.exists(os.path.join(out, name)):
        os.makedirs(out, exist_ok=True)
        shutil.copytree(os.environ[env], os.path.join(out, name))
kva.run("default", out, overrides=overrides)

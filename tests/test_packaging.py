"""The repository installs (`pip install -e .` or a wheel), so the entry points run from any directory."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_entry_points_run_outside_the_repository(tmp_path):
    # A copy of what packaging reads, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for package in ("calm_jax", "train", "eval"):
        shutil.copytree(os.path.join(ROOT, package), src / package, ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: the venv's setuptools, so the test needs no network.
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--target", str(tmp_path / "site"), str(src)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}
    for module in ("train.compose", "eval.exact_match"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"usage: python -m {module}" in proc.stdout

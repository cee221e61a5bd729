"""The repository installs (`pip install -e .` or a wheel): calm_jax, and the entry points as console scripts.

In the repository the entry points are the top-level train/ and eval/ folders (`python -m train.X` from
its root). Installed, they are calm_jax_cli.train and calm_jax_cli.eval, so nothing named `train` or
`eval` (names any other project may use) lands in site-packages.
"""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Repository folder -> where it is installed.
INSTALLED_AS = {"calm_jax": "calm_jax", "train": "calm_jax_cli/train", "eval": "calm_jax_cli/eval"}
CONSOLE_SCRIPTS = {  # setup.cfg [options.entry_points]: calm-<name> is train.<name>, calm-eval-<name> eval.<name>
    "calm-compose": "train.compose",
    "calm-export": "train.export",
    "calm-plan": "train.plan",
    "calm-kv-arithmetic": "train.kv_arithmetic",
    "calm-eval-generate": "eval.generate",
    "calm-eval-exact-match": "eval.exact_match",
    "calm-eval-loglik": "eval.loglik",
    "calm-eval-pass-at-k": "eval.pass_at_k",
}
# One process for every entry point's --help (one JAX import, not eight): each script's module and main,
# loaded from the installed metadata; prints "name<TAB>file the module came from<TAB>exit code<TAB>usage".
_HELP_ALL = r"""
import contextlib, io, sys
from importlib.metadata import distribution
for ep in distribution("calm-jax").entry_points:
    if ep.group != "console_scripts":
        continue
    out = io.StringIO()
    main = ep.load()
    with contextlib.redirect_stdout(out):
        try:
            code = main(["--help"])
        except SystemExit as e:
            code = e.code
    usage = out.getvalue().split("\n", 1)[0]
    print(ep.name, sys.modules[main.__module__].__file__, code, usage, sep="\t")
"""


def _python_files(folder):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, f), folder)


def test_installed_entry_points_run_outside_the_repository(tmp_path):
    # A copy of what packaging reads, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for package in INSTALLED_AS:
        shutil.copytree(os.path.join(ROOT, package), src / package, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    # No build isolation: the venv's setuptools, so the test needs no network.
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--target", str(site), str(src)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    # Top level: calm_jax and calm_jax_cli (a namespace package), the metadata and the scripts; no train, no eval.
    top = {n for n in os.listdir(site) if not n.endswith(".dist-info")}
    assert top == {"calm_jax", "calm_jax_cli", "bin"}, top
    assert not (site / "calm_jax_cli" / "__init__.py").exists()
    # Every module of the repository's packages is installed (a new package missing from setup.cfg's
    # [options] packages fails here).
    for folder, installed in INSTALLED_AS.items():
        expected = set(_python_files(os.path.join(ROOT, folder)))
        assert set(_python_files(site / installed)) == expected, f"{folder}/ -> {installed}/: add the package to setup.cfg"

    assert set(os.listdir(site / "bin")) == set(CONSOLE_SCRIPTS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    run = dict(capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL], **run)
    assert proc.returncode == 0, proc.stderr
    helped = {}
    for line in proc.stdout.splitlines():
        name, path, code, usage = line.split("\t")
        helped[name] = (path, code, usage)
    assert set(helped) == set(CONSOLE_SCRIPTS)
    for name, module in CONSOLE_SCRIPTS.items():
        path, code, usage = helped[name]
        here = site / "calm_jax_cli" / module.replace(".", os.sep)
        assert path in (f"{here}.py", str(here / "__main__.py")), (name, path)
        assert code in ("0", "None") and usage.startswith("usage: "), (name, code, usage)
    # The scripts themselves, and `python -m` under the installed name.
    for cmd in ([str(site / "bin" / "calm-compose"), "--help"],
                [str(site / "bin" / "calm-eval-exact-match"), "--help"],
                [sys.executable, "-m", "calm_jax_cli.train.kv_arithmetic", "--help"]):
        proc = subprocess.run(cmd, **run)
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert proc.stdout.startswith("usage: "), (cmd, proc.stdout)
    proc = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                           "print([n for n in ('train', 'eval') if u.find_spec(n)])"], **run)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)

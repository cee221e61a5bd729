"""Training checkpoints: the trained parameters, optimizer state, step, RNG and data position.

Layout of a run directory:
  RUN_DIR/bases.json          which frozen models the run belongs to (configs + content hashes)
  RUN_DIR/composition.json    how Θ_C is wired (train.compose runs: connections, heads, options)
  RUN_DIR/checkpoints/<step>/ orbax checkpoints ("state": arrays, "meta": JSON)
The frozen models are never written; a checkpoint is only restored against base models
whose fingerprint matches bases.json (both JSON records: calm_jax.records). Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a save killed midway is never the latest.

An export (`export_composition`, `python -m train.export`) is Θ_C of one checkpoint alone,
to share: EXPORT_DIR/theta.safetensors, EXPORT_DIR/composition.json (the wiring, each base
model's fingerprint as bases.json holds it, the step, what it was trained on) and a README.md.
`load_theta`, `composition_step` and `check_wiring` take an export wherever they take
a run directory, with the same refusal of other base models.

Modules: fingerprints (base models' identity), runs (a run directory's orbax checkpoints), wiring
(composition.json), load (Θ_C of a run or an export), export_format, export, export_readme.
"""

from calm_jax.checkpoint.export import export_composition
from calm_jax.checkpoint.export_format import EXPORT_FORMAT, EXPORT_VERSION, THETA_FILE, theta_tensor_names
from calm_jax.checkpoint.fingerprints import (BaseModelMismatch, check_bases, composition_bases, content_hash,
                                              fingerprint)
from calm_jax.checkpoint.load import check_wiring, composition_step, composition_steps, load_theta
from calm_jax.checkpoint.runs import Checkpoints, abstract, read_bases
from calm_jax.checkpoint.wiring import save_composition_config
from calm_jax.loading import CheckpointError

__all__ = [
    "EXPORT_FORMAT", "EXPORT_VERSION", "THETA_FILE", "BaseModelMismatch", "CheckpointError", "Checkpoints", "abstract",
    "check_bases", "check_wiring", "composition_bases", "composition_step", "composition_steps", "content_hash",
    "export_composition", "fingerprint", "load_theta", "read_bases", "save_composition_config",
    "theta_tensor_names",
]

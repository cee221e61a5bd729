"""A CALM study on any task: the paper's experiment pipeline, written once.

An experiment supplies a `Task` (task.py: its data and tokenizer, D_C and eval sets, the
vanilla-m_A data, report text) and presets (spec.py: model sizes, training stages, seeds,
composition options); `study` runs it:

  spec     ModelSize, Stage, Seeds, Preset (changed by calm_jax.overrides: "train_C.steps=6000")
  task     the Task interface, Data, SweepPoint
  stages   training a base model, Θ_C, anything else on D_C; recipe checks on reuse
  study    run_table1, run_ablations (Table 5 rows), run_sweep, run_seeds
  report   table1 / ablations / sweep / seeds as JSON, Markdown and PNG
  workers  jobs in worker processes, one per CPU core
Evaluation is calm_jax.evaluation's generate-and-score, the path the eval scripts use.
The key-value experiment (train/kv_arithmetic/) is the example: a task module, presets and
a command line.
"""

import os
import shutil
import tempfile
import warnings

import pytest

# Eight simulated CPU devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# float32 means float32 on every backend: GPUs would otherwise run float32 matmuls in TF32
# (10 mantissa bits), outside the float32 bounds the tests state (tests/numerics.py).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One XLA compilation cache for the whole session, on disk: a program compiled once (a train
# step, a decode loop) is not compiled again by a later test, by another xdist worker, by a
# study's worker processes or by a command line a test starts (they all inherit the variable).
# The key-value study compiles the same Θ_C step for many of its ablation rows and again in
# each sweep worker, and every tiny-preset pipeline the same base-model steps; XLA's compile,
# not the 3 training steps, is most of their time. The cache returns the executable the compile
# would have made (the key is the program, the compile options, the devices and the versions),
# so no test sees a difference. A fresh directory per session, removed at its end: no run
# depends on an earlier one. JAX_COMPILATION_CACHE_DIR set beforehand is used as it is (kept
# across runs); set it empty to compile everything anew.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="calm-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE


def pytest_unconfigure(config):
    if _XLA_CACHE is not None and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)  # the process that made it (xdist's controller)


# --- the fast tier -------------------------------------------------------------------------------
# `pytest -m "not slow"` (make test-fast) is the edit-test loop: every module of calm_jax, in a few
# minutes. `slow` marks what it leaves out: the tests below, chosen by their measured time (setup,
# call and teardown; a module fixture's setup counts for every test that uses it). Seconds: the
# whole suite with -n 2 --dist loadfile and the compilation cache above, on a 2-core machine shared
# with other work (load ~4); a quiet machine takes about two thirds. Over ~8 s is slow; a few of 4-7 s
# are too, where the fast tier keeps a cheaper test of the same code, to hold it under 3 minutes. A
# test not named here is fast: a new one over ~8 s belongs here (or gets `pytest.mark.slow`). A
# name here that matches no test (renamed?) is reported as a warning, since that test turned fast.
SLOW = {
    # The key-value study at the tiny preset: the ablation fixture (12 rows, then a sweep in 2 worker
    # processes, 173 s) and everything that reads it.
    "test_kv_ablations.py": ("test_ablations_json_has_every_row_and_task", "test_ablations_markdown_and_plot",
                             "test_ablation_predictions_match_accuracy",
                             "test_base_models_shared_and_vanilla_m_A_uses_another_mapping", "test_sweep_outputs",
                             "test_sweep_eval_sets_exclude_base_training_data",
                             "test_calm_row_and_sweep_point_reuse_the_main_theta",
                             "test_held_in_split_covers_every_row_and_expression",
                             "test_failed_worker_job_names_the_job_and_its_log"),  # 5 s: 2 processes start JAX
    # Table 1 at the tiny preset (fixture 50 s) and what reads it; --seeds (13 s), base_seeds (10 s).
    "test_kv_pipeline.py": ("test_table1_json", "test_markdown_and_plot", "test_predictions_match_accuracy",
                            "test_dc_uses_only_held_in_keys", "test_base_models_saved_and_reused",
                            "test_reuse_refuses_another_recipe", "test_copy_rate_agrees_with_the_table",
                            "test_curve_scores_every_kept_checkpoint", "test_seeds_runs_table1_per_data_seed",
                            "test_base_seeds_trains_and_scores_one_model_per_seed"),
    "test_remat.py": ("test_remat_shrinks_a_1b_anchor_step_at_2048_positions",  # 66 s
                      "test_remat_trades_activations_for_recomputation_at_the_peer_shape",  # 36 s
                      "test_remat_and_loss_chunks_give_the_same_loss_and_gradients",  # 29 s
                      "test_chunked_loss_never_holds_the_logits"),  # 6 s
    "test_packing.py": ("test_packed_batch_gives_the_same_losses_and_theta_gradient",),  # 51 s
    "test_checkpoint.py": ("test_resume_after_sigkill_repeats_the_uninterrupted_losses",  # 51 s
                           "test_a_killed_save_never_becomes_the_latest",  # 14 s
                           "test_content_hash_is_deterministic_and_sees_every_weight",  # 11 s
                           "test_storage_dtype_does_not_change_identity_or_says_what_differs"),  # 11 s
    "test_resume_contract.py": ("test_resume_refuses_other_data_or_schedule_unless_asked_and_records_it",),  # 50 s
    "test_train_cli.py": ("test_cli_end_to_end",  # 47 s
                          "test_cli_skip_invalid_and_truncate_count_what_they_change",  # 11 s
                          "test_packed_training_resumes_exactly", "test_cli_defaults_fit_small_models_and_resume_says_so",
                          "test_cli_refuses_to_overwrite_or_to_resume_against_other_models"),  # 11-13 s each
    # The fast tier keeps the plan against a measured run with remat ([full-8], 20 s).
    "test_plan.py": ("test_cli_json_and_largest_batch", "test_plan_equals_measured_run[none-0]",  # 47 s, 46 s
                     "test_cli_errors_are_one_line"),  # 4 s for each of its command lines
    # Every test of its `dirs` fixture (10 s); the eval scripts stay in the fast tier through
    # test_bad_input.py and test_exact_match_scores_key_value_targets_as_generated.
    "test_eval_scripts.py": ("test_loglik_scores_a_composition", "test_exact_match_keeps_one_row_per_composition",
                             "test_trained_composition_from_run_dir",  # 45 s, 38 s, 35 s
                             "test_generate_composition_command_line", "test_exact_match_side_by_side_table",  # 19 s
                             "test_generate_plain_model_matches_library", "test_scripts_report_bad_input",
                             "test_eval_bad_input_is_reported_early_with_line_numbers"),  # 13 s with the fixture
    # Cached decoding against the full forward, 2-3 s a family: the fast tier keeps gemma2's
    # (sliding window and soft-capping); the other families' parity tests stay fast.
    "test_families.py": ("test_cached_decoding_equals_full_forward[gemma3_text]",
                         "test_cached_decoding_equals_full_forward[olmo2]",
                         "test_cached_decoding_equals_full_forward[phi3]",
                         "test_cached_decoding_equals_full_forward[phi3-long]"),
    "test_interrupt.py": ("test_ctrl_c_saves_the_step_reached_and_resume_redoes_none",  # 45 s
                          "test_a_worker_pool_passes_ctrl_c_on_and_keeps_finished_jobs"),  # 14 s
    "test_composition.py": ("test_float32_forward_and_cache_match_the_float64_reference",  # 43 s
                            "test_cached_iterative_equals_uncached", "test_gradients_reach_theta_only",  # 37 s, 31 s
                            "test_cross_rope_cached_equals_uncached", "test_options_forward_is_finite_and_differs",
                            "test_encoder_mode_keeps_augmenting_states_fixed",  # 27 s, 16 s, 12 s
                            "test_encoder_mode_loss_trains_what_encoder_decoding_computes",  # 8 s, and its fixture
                            "test_cross_rope_changes_scores_not_parameters"),  # 4-7 s; cross_rope's no-leakage test stays
    # The fast tier keeps the trained-composition fixture (27 s, train.compose and train.export) and the
    # two cheap tests of its export (under 1 s each).
    "test_export.py": ("test_export_holds_theta_alone_and_loads_bit_for_bit",  # 7 s
                       "test_eval_scripts_score_an_export_as_its_run_directory",  # 14 s
                       "test_load_composition_is_the_export_readme_and_the_eval_path",  # 14 s
                       "test_an_export_refuses_other_base_models",  # 9 s
                       "test_train_compose_init_from_an_export",  # 22 s
                       "test_export_is_readable_per_the_umask_and_its_readme_states_every_segment"),  # 20 s
    "test_vocab_padding.py": ("test_decoding_never_generates_a_padded_id",  # 27 s
                              "test_mixed_family_pair_cached_equals_uncached",  # 22 s
                              "test_training_theta_on_the_padded_pair",  # 11 s
                              "test_cli_accepts_the_padded_pair",  # 7 s
                              "test_scoring_normalises_over_the_tokenizer_ids"),  # 4-6 s
    # The fast tier keeps the composed cache against its uncached reference ([iterative], 19 s with its
    # fixtures); the encoder-mode twin and the composed padding check (16 s) are slow.
    "test_decoding.py": ("test_cached_greedy_equals_uncached_composed[encoder]", "test_padding_invariance[composed]"),
    "test_sharding.py": ("test_two_processes_equal_one",  # 22 s
                         "test_sharded_step_equals_one_device[data=4,model=2]"),  # 10 s; [data=8,model=1] stays
    "test_packaging.py": None,  # 24 s: installs the package
    "test_lora.py": ("test_one_step_trains_only_the_lora_factors",  # 17 s
                     "test_zero_b_gives_the_base_exactly[gpt2]"),  # 4 s; [llama] stays
    "test_op_profile.py": ("test_breakdown_of_a_decode_counts_its_ops",),  # 15 s
    "test_pass_at_k.py": ("test_cli_generates_n_samples_per_problem",),  # 10 s
    # The fast tier keeps Θ_C-only training (test_only_theta_...) and the trainer (test_plain_lm_...).
    "test_train_step.py": ("test_loss_decreases_only_with_the_augmenting_models_knowledge",  # 10 s
                           "test_resume_refuses_other_batch_settings",  # 7 s
                           "test_grad_accumulation_equals_one_big_batch",  # 4-6 s
                           "test_bf16_frozen_models_with_fp32_theta_and_optimizer"),  # 3-4 s
    "test_model.py": ("test_query_chunked_attention_is_the_same_function[1]",  # 11 s
                      "test_long_inputs_take_the_chunked_path",  # 10 s
                      "test_prefill_then_decode_equals_full_forward[llama_tied_headdim]"),  # 8 s
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast tier (pytest -m 'not slow', make test-fast): "
                                       "over ~8 s, or reads a fixture that is (tests/conftest.py SLOW)")


def _is_slow(item) -> bool:
    file = os.path.basename(str(item.path))
    if file not in SLOW:
        return False
    names = SLOW[file]
    return names is None or item.name in names or item.originalname in names


def pytest_collection_modifyitems(config, items):
    seen = {}
    for item in items:
        seen.setdefault(os.path.basename(str(item.path)), set()).update((item.name, item.originalname))
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    for file, names in SLOW.items():
        whole = not any(file in arg and "::" in arg for arg in config.args)  # not one test of it picked
        stale = sorted(set(names or ()) - seen.get(file, set())) if file in seen and whole else []
        if stale:
            warnings.warn(pytest.PytestWarning(f"tests/conftest.py SLOW names no test of {file}: {stale}"))

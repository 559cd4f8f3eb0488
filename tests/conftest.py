"""Suite mechanics shared by every test directory (see tests/README.md).

``make test`` runs the suite on pytest-xdist workers (``-n 2 --dist loadfile``): each test file runs whole
on one worker, so its module-scoped models and transformers oracles are built once.  Two workers on two
cores must not each start a thread pool per core, so a worker caps the threads of every framework to its
share of the cores.  The caps are environment variables that the frameworks read when they are first
imported, which is why this file imports no framework and sets them at import, before any test module.
Subprocesses (torchrun ranks, TF and JAX interpreters) inherit them.  Each worker also collects the files
longest first (``FILE_SECONDS`` below), so that both workers end together.
"""

from __future__ import annotations

import os


def _threads_per_worker() -> int | None:
    """Cores // workers under pytest-xdist (at least 1); None when pytest runs in one process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _cap_threads(n: int) -> None:
    # torch (OpenMP / MKL), numpy's BLAS, TensorFlow's intra-op pool; a value set by the caller wins.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(var, str(n))
    if n == 1:  # XLA:CPU runs its Eigen kernels on a pool of one thread per core unless told otherwise
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


_n = _threads_per_worker()
if _n is not None:
    _cap_threads(_n)


# --- scheduling: longest files first ------------------------------------------------------------------
#
# With ``--dist loadfile`` the run lasts as long as the busier worker, and a worker that picks up a long
# file last leaves the other idle.  xdist's default hands files out by their number of tests, which puts
# the one- and two-test files last, and those are the longest (the demo, the benchmarks' --smoke runs,
# fresh interpreters).  ``make test`` passes ``--no-loadscope-reorder``, so xdist hands files out in
# collection order, and the workers collect the longest files first (longest-processing-time first): the
# files that come last are short, and both workers end together.  The table is a file's seconds in a
# full ``pytest -n 2 --dist loadfile --durations=0`` run (setup + call + teardown of its tests, rounded);
# only the order it gives matters.  Measured: the fresh-clone run of session 14 (``CI=true make test``, 2873
# tests, 15 min 17 s).  Refresh after a quiet full run: ``python
# tests/file_seconds.py LOG`` prints the rows (tests/README.md).  A file not in it counts
# ``DEFAULT_FILE_SECONDS``.
FILE_SECONDS: dict[str, int] = {
    "test_export.py": 91,
    "test_ibert_tf.py": 88,
    "test_cross_backend.py": 79,
    "test_generation_cross_backend.py": 79,
    "test_ibert_flax.py": 68,
    "test_pooled_positions_flax.py": 62,
    "test_generation_flax.py": 60,
    "test_convert_transformers.py": 55,
    "test_keras_lifecycle_tf.py": 50,
    "test_pooled_positions_tf.py": 49,
    "test_ibert_cross_backend.py": 46,
    "test_ibert_int_dtypes_flax.py": 45,
    "test_electra_flax.py": 44,
    "test_generation_tf.py": 43,
    "test_sharding_flax.py": 42,
    "test_distributed_tf.py": 38,
    "test_mpt_flax.py": 38,
    "test_nezha_flax.py": 38,
    "test_packed_linear_flax.py": 36,
    "test_bench_generation_smoke.py": 32,
    "test_mpnet_flax.py": 32,
    "test_dtype_tf.py": 31,
    "test_bad_input_catalogue.py": 30,
    "test_bench_precision_smoke.py": 29,
    "test_bench_ibert_smoke_pt.py": 28,
    "test_pipelines.py": 27,
    "test_call_jit_flax.py": 26,
    "test_demo_runs.py": 26,
    "test_electra_tf.py": 26,
    "test_distributed_pt.py": 24,
    "test_dtype_flax.py": 23,
    "test_lora.py": 23,
    "test_auto_classes.py": 22,
    "test_compile_pt.py": 21,
    "test_ibert_int_dtypes_tf.py": 20,
    "test_ibert_quantized_weights_flax.py": 20,
    "test_xlm_roberta_xl_flax.py": 20,
    "test_bench_small_shapes_smoke.py": 19,
    "test_ibert_pt.py": 19,
    "test_convert_memory_smoke.py": 16,
    "test_finetune_flax.py": 15,
    "test_generation_pt.py": 15,
    "test_nezha_tf.py": 15,
    "test_bench_load_memory_smoke.py": 14,
    "test_bench_train_smoke.py": 14,
    "test_mpnet_tf.py": 14,
    "test_packed_linear_pt.py": 14,
    "test_packed_linear_tf.py": 14,
    "test_mpt_tf.py": 12,
    "test_dense_compiler_options_flax.py": 11,
    "test_bench_forward_smoke.py": 7,
    "test_core_imports.py": 7,
    "test_finetune_pt.py": 7,
    "test_xlm_roberta_xl_tf.py": 7,
    "test_core_class_registry.py": 6,
    "test_ibert_materialized_flax.py": 6,
    "test_verify_head_resolution.py": 6,
    "test_core_convert_formats.py": 5,
    "test_nezha_pt.py": 4,
    "test_electra_pt.py": 3,
    "test_finetune_tf.py": 3,
    "test_fit_from_text_tf.py": 3,
    "test_dropout_flax.py": 2,
    "test_mpnet_pt.py": 2,
    "test_pooled_positions_pt.py": 2,
    "test_xlm_roberta_xl_pt.py": 2,
    "test_core_family_specs.py": 1,
    "test_core_faults.py": 1,
    "test_core_head_resolution.py": 1,
    "test_core_tokenization.py": 1,
    "test_dtype_pt.py": 1,
    "test_ibert_int_dtypes_pt.py": 1,
    "test_mpt_pt.py": 1,
    "test_core_auto_classes.py": 0,
    "test_core_checkpoint.py": 0,
    "test_core_configs.py": 0,
    "test_core_dtypes.py": 0,
    "test_core_family_maths.py": 0,
    "test_core_generation.py": 0,
    "test_core_hardware.py": 0,
    "test_core_loading.py": 0,
    "test_core_outputs.py": 0,
    "test_core_packing.py": 0,
    "test_core_pooling.py": 0,
    "test_core_sharding.py": 0,
    "test_core_spec.py": 0,
}
#: a new file's weight until the table is refreshed: mid-table, so it neither leads nor trails the run
DEFAULT_FILE_SECONDS = 30


def _file_of(item) -> str:
    """The test file's name (file names are unique across the test folders)."""
    return os.path.basename(item.nodeid.split("::", 1)[0])


def pytest_collection_modifyitems(config, items) -> None:
    """On an xdist worker, order the files longest first (stable: a file's tests keep their order)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order does not change the run's length
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(_file_of(item), index)

    def key(pair):
        index, item = pair
        name = _file_of(item)
        return (-FILE_SECONDS.get(name, DEFAULT_FILE_SECONDS), first[name], index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]

"""Test setup: 8 simulated CPU devices, configured before JAX initializes.

Compiling dominates the suite's time, and XLA:CPU without its LLVM optimisations and fusion
emitters compiles several times faster while computing the same functions; every test compares
two computations made under the same flags (the CLI runs inherit them), so they stay meaningful.
Benchmarks and `make demo` run with XLA's defaults. The many CLI runs of one tiny config also
share JAX's persistent compilation cache (a temporary directory, removed at exit): a cached
executable is the very program a fresh compile would give.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    _cache = tempfile.mkdtemp(prefix="lorax_ft_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax

jax.config.update("jax_default_matmul_precision", "highest")

"""Test configuration: strict dtype promotion and 2 fake CPU devices, as equinox's tests."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache for this session only (fresh, like CI's): the demo, the service's
# restarts and the examples compile the same XLA programs many times over; reading them
# back cut the slowest tests by a fifth on 2 cores. Subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxreg-test-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


import pytest  # noqa: E402

# A script that test_multihost.py runs as a subprocess (it reads sys.argv at import), not a
# test module: --doctest-modules would import it.
collect_ignore = ["multihost_worker.py"]


@pytest.fixture(scope="session")
def client(server):  # server: ../conftest.py (shared with the doctests)
    import jaxreg as jr

    with jr.remote.ServiceClient(server.url) as c:
        yield c

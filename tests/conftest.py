"""Test configuration: strict dtype promotion and 2 fake CPU devices, as equinox's tests."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def client(server):  # server: ../conftest.py (shared with the doctests)
    import jaxreg as jr

    with jr.remote.ServiceClient(server.url) as c:
        yield c

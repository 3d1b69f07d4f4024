"""Fixtures shared by the tests and the doctests (``pytest`` runs both).

``server`` is one reference service (``jaxreg.service.start``) on a free 127.0.0.1 port
for the whole session, started when first needed. A docstring example that talks to a
training service reads ``service_url``: this service's URL, put into the namespace of
the doctests that use it.
"""

import doctest

import pytest


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One reference service for the whole session (compiled programs are shared).

    The tests create many models and delete few: allow more than the default 64.
    """
    from jaxreg.service import Limits, start

    srv = start(state_dir=tmp_path_factory.mktemp("states"), limits=Limits(max_models=1024))
    yield srv
    srv.stop()


def _uses(item, name: str) -> bool:
    test = getattr(item, "dtest", None)
    return isinstance(test, doctest.DocTest) and any(name in e.source for e in test.examples)


@pytest.fixture(autouse=True)
def _doctest_service_url(request, doctest_namespace):
    """Gives the doctests that read ``service_url`` the session's service (only those)."""
    if _uses(request.node, "service_url"):
        doctest_namespace["service_url"] = request.getfixturevalue("server").url


# jaxreg/cookbook.py imports tinker-cookbook (installed by `make`, see the cookbook extra).
try:
    import tinker_cookbook  # noqa: F401
except ImportError:
    collect_ignore = ["jaxreg/cookbook.py"]

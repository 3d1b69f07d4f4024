"""Doctest support (``pytest`` runs the examples in ``jaxreg``'s docstrings).

An example that talks to a training service reads ``service_url``: the URL of a real
reference service (``jaxreg.service.start``) on a free 127.0.0.1 port, started on the
first such example and stopped at the end of the session.
"""

import doctest

import pytest


@pytest.fixture(scope="session")
def doctest_service(tmp_path_factory):
    """The reference service the doctests that read ``service_url`` talk to."""
    from jaxreg.service import start

    server = start(state_dir=tmp_path_factory.mktemp("doctest-states"))
    yield server
    server.stop()


def _uses(item, name: str) -> bool:
    test = getattr(item, "dtest", None)
    return isinstance(test, doctest.DocTest) and any(name in e.source for e in test.examples)


@pytest.fixture(autouse=True)
def _doctest_service_url(request, doctest_namespace):
    """Puts ``service_url`` into the namespace of the doctests that use it (only those)."""
    if _uses(request.node, "service_url"):
        doctest_namespace["service_url"] = request.getfixturevalue("doctest_service").url

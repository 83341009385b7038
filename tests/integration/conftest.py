"""Everything in this folder starts a real local Ray cluster or runs the `lesa` CLI as a subprocess:
`make test-unit` leaves it out, `make test` runs it."""

import pytest


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)

"""The install tests (marked `install`) install bpffsd afresh from the package registries: a
Debian 12 root built with mmdebstrap, a client-only virtualenv. They take minutes, so they run
where CI is set (CI runs them) or BPFFSD_INSTALL_TESTS=1, and are skipped elsewhere:

    BPFFSD_INSTALL_TESTS=1 python3 -m pytest -q tests/install
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def install_tests_enabled() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("BPFFSD_INSTALL_TESTS"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # At collection, so that no session- or module-scoped fixture builds a root or a venv first.
    if install_tests_enabled():
        return
    skip = pytest.mark.skip(reason="installs from the registries for minutes: set "
                                   "BPFFSD_INSTALL_TESTS=1 (CI sets CI and runs them)")
    for item in items:  # this hook sees every item of the session: only ours
        if item.path.is_relative_to(HERE) and item.get_closest_marker("install"):
            item.add_marker(skip)

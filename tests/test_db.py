"""gateway.db: what importing it brings into a process."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import gateway.app, gateway.cli  # what `gateway serve` imports
import sqlite_utils.db
print(int("numpy" in sys.modules), int(sqlite_utils.db.np is None))
import numpy  # still importable by anything that needs it
print(int("numpy" in sys.modules))
"""


def test_the_gateway_loads_no_numpy_yet_leaves_it_importable() -> None:
    """sqlite-utils imports numpy where installed (mistral-common installs it): 12 MB and a
    BLAS thread pool in every gateway process, for numpy values the gateway never writes."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1", "1"]


def test_a_process_that_imported_numpy_first_keeps_it_for_sqlite_utils() -> None:
    probe = "import numpy, sqlite_utils.db as d, gateway.db; print(int(d.np is numpy))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]

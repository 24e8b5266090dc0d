"""The serving side imports and starts with torch unavailable."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import service
from tests.service_helpers import ROOT


def test_every_serving_module_imports_without_torch() -> None:
    modules = sorted(
        info.name
        for info in pkgutil.walk_packages(service.__path__, "service.")
        if not info.name.endswith("__main__")
    )
    assert {"service.server", "service.cli", "service.client", "service.client.cli"} <= set(modules)
    script = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert sys.modules['torch'] is None\n"
        "from service.cli import main\n"
        "sys.exit(main(['--help']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--max-batch-size" in done.stdout

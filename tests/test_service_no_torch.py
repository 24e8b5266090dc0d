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
    entry_points = {"service.server", "service.cli", "service.client", "service.client.cli"}
    assert entry_points | {"service.upgrade"} <= set(modules)
    # A finder that refuses torch, as a machine without it does: a None in sys.modules would also
    # refuse the import, but libraries that look for torch in sys.modules (scipy) then break
    # where a machine without torch does not.
    script = (
        "import importlib, importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.partition('.')[0] == 'torch':\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "        return None\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('torch was imported')\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules\n"
        "from service.cli import main\n"
        "sys.exit(main(['--help']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--max-batch-size" in done.stdout

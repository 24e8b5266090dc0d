"""The serving side imports and starts with torch unavailable; the client loads none of the
scoring numerics."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import service
from tests.service_helpers import ROOT


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by a fresh interpreter in the repository root."""
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_every_serving_module_imports_without_torch() -> None:
    modules = sorted(
        info.name
        for info in pkgutil.walk_packages(service.__path__, "service.")
        if not info.name.endswith("__main__")
    )
    entry_points = {"service.server", "service.cli", "service.client", "service.client.cli"}
    assert entry_points | {"service.upgrade", "service.recalibrate"} <= set(modules)
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
    done = run_python(script)
    assert done.returncode == 0, done.stderr
    assert "--max-batch-size" in done.stdout


def test_the_client_loads_none_of_the_scoring_numerics() -> None:
    # A batch job starts the command line once per folder: scipy alone took 0.4 s of its start.
    script = (
        "import sys\n"
        "import service.client, service.client.cli\n"
        "heavy = ('scipy', 'service.scoring', 'onnxruntime')\n"
        "loaded = sorted(m for m in heavy if m in sys.modules)\n"
        "sys.exit(f'loaded {loaded}' if loaded else 0)\n"
    )
    done = run_python(script)
    assert done.returncode == 0, done.stderr

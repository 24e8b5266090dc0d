"""Build hook: generate the gRPC stubs from protos/ before the Python files are collected."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _generate_stubs() -> None:
    path = Path(__file__).resolve().parent / "protos" / "generate.py"
    spec = importlib.util.spec_from_file_location("protos_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate()


class BuildPyWithStubs(build_py):
    """``build_py`` that first compiles the .proto contract into ``service/_proto``."""

    def run(self) -> None:
        _generate_stubs()
        # Packages were discovered before the stubs existed; look again so they are included.
        self.packages = sorted(set(self.packages or []) | {"service._proto"})
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})

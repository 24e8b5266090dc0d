"""Generate the Python gRPC stubs of ``protos/`` into ``service/_proto`` with grpcio-tools.

Run by the package build (``setup.py``) so that the stubs can never disagree with the .proto;
``python protos/generate.py`` regenerates them by hand after editing the contract.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "anomaly" / "v1"
PROTO_FILES = ("anomaly.proto",)
# Import path of the generated modules: ``service._proto``. protoc's virtual-path mapping makes
# the generated gRPC module import its message module from that package.
PACKAGE_PATH = "service/_proto"
OUT_DIR = ROOT / PACKAGE_PATH


def protoc_args(out_dir: Path) -> list[str]:
    """Arguments for ``grpc_tools.protoc.main`` that compile the contract into ``out_dir``."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    return [
        "grpc_tools.protoc",
        f"--proto_path={PACKAGE_PATH}={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"{PACKAGE_PATH}/{name}" for name in PROTO_FILES),
    ]


def generate(root_out: Path = ROOT) -> Path:
    """Compile the .proto files; return the package directory holding the stubs."""
    from grpc_tools import protoc

    package_dir = root_out / PACKAGE_PATH
    package_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main(protoc_args(root_out))
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} compiling {PROTO_DIR}")
    init = package_dir / "__init__.py"
    init.write_text('"""Generated from protos/ by protos/generate.py; do not edit."""\n')
    (package_dir / "py.typed").touch()
    return package_dir


if __name__ == "__main__":
    print(f"stubs written to {generate()}", file=sys.stderr)

"""Regenerates the committed Python code from ``aggregator.proto``: ``python -m lightning_fhe.proto.generate``.

The generated ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` are committed, so a clean clone imports them
without ``grpcio-tools``; ``tests/test_server_proto.py`` regenerates into a temporary folder and fails if they
drifted from the ``.proto``.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = PROTO_DIR.parent.parent  # the folder holding lightning_fhe/
PROTO = PROTO_DIR / "aggregator.proto"
GENERATED = ("aggregator_pb2.py", "aggregator_pb2.pyi", "aggregator_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) on the .proto; returns the generated files, under ``out_dir``."""
    from grpc_tools import protoc  # a development dependency only
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compiled relative to the folder above the package, so the generated imports read
    # "from lightning_fhe.proto import aggregator_pb2": absolute, and valid from a clean clone.
    relative = PROTO.relative_to(PACKAGE_ROOT)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PACKAGE_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(relative),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with status {code} on {PROTO}")
    produced = out_dir / relative.parent
    return [produced / name for name in GENERATED]


def main() -> int:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(f"wrote {PROTO_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The committed generated code matches aggregator.proto (regenerated into a temporary folder and compared)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_fhe.proto import generate

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the code")


def _versions_masked(text: str) -> str:
    """The generated code names the generator's versions; another grpcio-tools release changes only those."""
    text = re.sub(r"# Protobuf Python Version: .*", "", text)
    text = re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "", text)
    return re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "", text)


@pytest.mark.parametrize("name", generate.GENERATED)
def test_generated_code_is_up_to_date(tmp_path: Path, name: str):
    fresh = {path.name: path for path in generate.generate(tmp_path)}[name].read_text()
    committed = (generate.PROTO_DIR / name).read_text()
    assert _versions_masked(fresh) == _versions_masked(committed), (
        f"lightning_fhe/proto/{name} is out of date with aggregator.proto: run python -m lightning_fhe.proto.generate"
    )


def test_the_generated_code_imports_from_the_package():
    from lightning_fhe.proto import aggregator_pb2, aggregator_pb2_grpc

    assert aggregator_pb2.DESCRIPTOR.package == "lightning_fhe.v2"
    assert "lightning_fhe.v2.Aggregator" in aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].full_name
    assert hasattr(aggregator_pb2_grpc, "AggregatorStub")

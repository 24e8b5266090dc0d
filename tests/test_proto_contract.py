"""The generated stubs must match protos/ exactly; every message and field must be documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from service._proto import anomaly_pb2
from service.scoring import SCORE_NAMES

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "anomaly" / "v1" / "anomaly.proto"


def _compiled_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "contract.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path=service/_proto={PROTO.parent}",
            f"--descriptor_set_out={out}",
            "service/_proto/anomaly.proto",
        ],
        check=True,
        cwd=ROOT,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (compiled,) = files.file
    # protoc fills json_name in descriptor sets but not in the descriptors embedded in stubs.
    for message in compiled.message_type:
        _clear_json_names(message)
    return compiled


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    compiled = _compiled_descriptor(tmp_path)
    generated = descriptor_pb2.FileDescriptorProto.FromString(anomaly_pb2.DESCRIPTOR.serialized_pb)
    assert generated == compiled, (
        "service/_proto is stale: rerun `make proto` (or reinstall the package) after editing "
        "protos/anomaly/v1/anomaly.proto"
    )


def test_contract_has_the_rpcs_the_service_promises() -> None:
    service = anomaly_pb2.DESCRIPTOR.services_by_name["AnomalyDetector"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"ScoreBatch", "ScoreStream", "GetModelInfo"}
    stream = methods["ScoreStream"]
    assert stream.client_streaming and stream.server_streaming


def test_scores_have_a_field_and_a_p_value_per_score_name() -> None:
    fields = anomaly_pb2.Scores.DESCRIPTOR.fields_by_name
    for name in SCORE_NAMES:
        for field in (name, f"{name}_p_value"):
            assert field in fields, f"Scores lacks {field}"
            assert fields[field].type == FieldDescriptor.TYPE_DOUBLE, field
    for field in ("combined", "combined_p_value", "is_anomaly", "threshold", "anomaly_map"):
        assert field in fields


def test_model_info_describes_the_latent_grid_and_the_weights() -> None:
    info = anomaly_pb2.ModelInfo.DESCRIPTOR.fields_by_name
    assert info["latent_grid"].message_type.name == "LatentGrid"
    grid = set(anomaly_pb2.LatentGrid.DESCRIPTOR.fields_by_name)
    assert grid == {"channels", "rows", "columns"}
    weights = info["combined_weights"].message_type
    assert weights.GetOptions().map_entry
    assert weights.fields_by_name["value"].type == FieldDescriptor.TYPE_DOUBLE


def test_every_message_and_field_is_commented() -> None:
    lines = PROTO.read_text(encoding="utf-8").splitlines()
    declaration = re.compile(
        r"^\s*(message \w+|oneof \w+|(repeated )?[\w.]+ \w+ = \d+;|rpc \w+|service \w+)"
    )
    undocumented = [
        line.strip()
        for index, line in enumerate(lines)
        if declaration.match(line) and not lines[index - 1].strip().startswith("//")
    ]
    assert undocumented == []

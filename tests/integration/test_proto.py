"""The generated protobuf package: committed output is fresh, and it is wire-compatible with Envoy.

Compatibility is proven against xds-protos (Envoy's official generated code) in a subprocess
(tests/support/proto_peer.py): both register the same proto names, so they never share a process.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import json_format, message
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import UInt64Value
from support.xds_protos import peer_env

from ratelimit_svc.pb.envoy.config.core.v3 import base_pb2
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.pb.envoy.type.v3 import ratelimit_unit_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "ratelimit_svc" / "pb"
PEER = Path(__file__).resolve().parents[1] / "support" / "proto_peer.py"
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
# Envoy names WEEK only in RateLimitResponse.RateLimit.Unit; see proto/envoy/type/v3/ratelimit_unit.proto.
OUR_EXTRA_ENUM_VALUES = {"envoy.type.v3.RateLimitUnit": {"WEEK": 7}}

Descriptor = ratelimit_pb2.RateLimitDescriptor
Response = rls_pb2.RateLimitResponse


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _load(PEER)
genproto = _load(ROOT / "scripts" / "genproto.py")


# --- the committed output is what the script generates today -----------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), str(out)],
        check=True,
        capture_output=True,
    )
    fresh, committed = _tree(out), _tree(GENERATED)
    hint = "src/ratelimit_svc/pb is stale: run `make proto` and commit the result"
    assert sorted(fresh) == sorted(committed), hint
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"{hint} (differs: {stale})"


@pytest.mark.parametrize(
    ("current", "target", "expected"),
    [
        ("envoy.service.ratelimit.v3", "envoy.service.ratelimit.v3", "from . import m as a"),
        (
            "envoy.service.ratelimit.v3",
            "envoy.config.core.v3",
            "from ....config.core.v3 import m as a",
        ),
        (
            "envoy.extensions.common.ratelimit.v3",
            "envoy.type.v3",
            "from .....type.v3 import m as a",
        ),
        ("envoy.type.v3", "envoy.type.v3.sub", "from .sub import m as a"),
    ],
)
def test_relative_import(current: str, target: str, expected: str) -> None:
    assert genproto.relative_import(current, target, "m", "a") == expected


def test_generated_package_does_not_import_a_top_level_envoy() -> None:
    # Absolute `envoy.*` imports would load xds-protos (or fail) instead of our own modules.
    code = (
        "import sys\n"
        "from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc\n"
        "from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2\n"
        "print(sorted(m for m in sys.modules if m == 'envoy' or m.startswith('envoy.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "[]"


# --- wire compatibility with xds-protos ---------------------------------------------------------


def _request() -> rls_pb2.RateLimitRequest:
    with_override = Descriptor(
        entries=[
            Descriptor.Entry(key="remote_address", value="10.0.0.1"),
            Descriptor.Entry(key="path", value=""),
        ],
        limit=Descriptor.RateLimitOverride(requests_per_unit=42, unit=ratelimit_unit_pb2.WEEK),
        hits_addend=UInt64Value(value=0),  # present but zero: must survive as present
    )
    every_unit = [
        Descriptor(
            entries=[Descriptor.Entry(key="unit", value=name)],
            limit=Descriptor.RateLimitOverride(requests_per_unit=number + 1, unit=number),
        )
        for name, number in ratelimit_unit_pb2.RateLimitUnit.items()
    ]
    return rls_pb2.RateLimitRequest(
        domain="edge-proxy",
        descriptors=[
            with_override,
            Descriptor(
                entries=[Descriptor.Entry(key="k", value="v")], hits_addend=UInt64Value(value=5)
            ),
            Descriptor(
                entries=[Descriptor.Entry(key="big", value="é✓")],
                hits_addend=UInt64Value(value=2**40),
            ),
            *every_unit,
        ],
        hits_addend=3,
    )


def _response() -> rls_pb2.RateLimitResponse:
    metadata = Struct()
    metadata.update(
        {
            "domain": "edge-proxy",
            "descriptors": [
                {"entries": ["k=v", "path="], "hitsAddend": 5},
                {"limit": {"unit": "WEEK"}},
            ],
            "hitsAddend": 3,
            "metadata": {"team": {"name": "payments", "tier": 1.5, "on": True, "none": None}},
        }
    )
    over = Response.DescriptorStatus(
        code=Response.OVER_LIMIT,
        current_limit=Response.RateLimit(
            name="per_ip", requests_per_unit=10, unit=Response.RateLimit.MINUTE
        ),
        limit_remaining=0,
        duration_until_reset=Duration(seconds=58, nanos=500_000_000),
        quota=Response.Quota(
            requests=7, valid_until=Timestamp(seconds=1700000063, nanos=5), id="q-1"
        ),
    )
    per_unit = [
        Response.DescriptorStatus(
            code=Response.OK,
            current_limit=Response.RateLimit(
                name=name.lower(), requests_per_unit=number, unit=number
            ),
            limit_remaining=4294967295,
            duration_until_reset=Duration(seconds=number),
        )
        for name, number in Response.RateLimit.Unit.items()
    ]
    return Response(
        overall_code=Response.OVER_LIMIT,
        statuses=[over, Response.DescriptorStatus(code=Response.OK), *per_unit],
        response_headers_to_add=[
            base_pb2.HeaderValue(key="RateLimit-Limit", value="10"),
            base_pb2.HeaderValue(key="x-raw", raw_value=b"\x00\xffbin"),
        ],
        request_headers_to_add=[
            base_pb2.HeaderValue(key="x-ratelimited", value="yes", raw_value=b"yes")
        ],
        raw_body=b"\x00\xfftoo many requests",
        dynamic_metadata=metadata,
        quota=Response.Quota(requests=3, id="whole-set"),  # no expiration: the oneof stays unset
    )


CASES: dict[str, message.Message] = {
    "request": _request(),
    "response": _response(),
    "empty_request": rls_pb2.RateLimitRequest(),
    "empty_response": Response(),
    "descriptor_with_zero_hits": Descriptor(hits_addend=UInt64Value(value=0)),
    "quota_at_epoch": Response.Quota(valid_until=Timestamp()),
}


def _wire(msg: message.Message) -> bytes:
    return msg.SerializeToString(deterministic=True)


def _as_dict(msg: message.Message) -> dict[str, Any]:
    # Enums as numbers: the wire carries numbers, and xds-protos has no name for our extra WEEK.
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, use_integers_for_enums=True
    )


@pytest.fixture(scope="module")
def xds() -> dict[str, Any]:
    """One run of the peer: our messages parsed/rebuilt by xds-protos, and its descriptors."""
    job = {
        "messages": [
            {
                "name": name,
                "type": msg.DESCRIPTOR.full_name,
                "wire": base64.b64encode(_wire(msg)).decode("ascii"),
                "dict": _as_dict(msg),
            }
            for name, msg in CASES.items()
        ],
        "roots": [rls_pb2.RateLimitRequest.DESCRIPTOR.full_name, Response.DESCRIPTOR.full_name],
    }
    result = subprocess.run(
        [sys.executable, str(PEER)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
        env=peer_env(),
    )
    assert result.returncode == 0, f"xds-protos peer failed:\n{result.stderr}"
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_cases_set_every_field() -> None:
    # Guards the fixtures themselves: a field added to the protos must be exercised here too.
    def unset(msg: message.Message, seen: set[str]) -> None:
        for field in msg.DESCRIPTOR.fields:
            path = f"{msg.DESCRIPTOR.full_name}.{field.name}"
            if field.is_repeated:
                values = getattr(msg, field.name)
                if len(values):
                    seen.add(path)
                    if field.message_type is not None:
                        for value in values:
                            unset(value, seen)
            elif field.message_type is not None:
                if msg.HasField(field.name):
                    seen.add(path)
                    if not field.message_type.full_name.startswith("google.protobuf."):
                        unset(getattr(msg, field.name), seen)
            elif getattr(msg, field.name) != field.default_value:
                seen.add(path)

    seen: set[str] = set()
    unset(CASES["request"], seen)
    unset(CASES["response"], seen)
    expected = {
        f"{msg.full_name}.{field.name}"
        for msg in (
            rls_pb2.RateLimitRequest.DESCRIPTOR,
            Response.DESCRIPTOR,
            Response.RateLimit.DESCRIPTOR,
            Response.Quota.DESCRIPTOR,
            Response.DescriptorStatus.DESCRIPTOR,
            Descriptor.DESCRIPTOR,
            Descriptor.Entry.DESCRIPTOR,
            Descriptor.RateLimitOverride.DESCRIPTOR,
            base_pb2.HeaderValue.DESCRIPTOR,
        )
        for field in msg.fields
    }
    assert expected - seen == set()


@pytest.mark.parametrize("name", sorted(CASES))
def test_our_bytes_survive_xds_protos(name: str, xds: dict[str, Any]) -> None:
    ours = _wire(CASES[name])
    theirs = base64.b64decode(xds["messages"][name]["roundtrip"])
    assert theirs == ours


@pytest.mark.parametrize("name", sorted(CASES))
def test_xds_protos_bytes_survive_ours(name: str, xds: dict[str, Any]) -> None:
    rebuilt = xds["messages"][name]["rebuilt"]
    assert not rebuilt.startswith("error:"), f"xds-protos cannot build our message: {rebuilt}"
    theirs = base64.b64decode(rebuilt)
    assert theirs == _wire(CASES[name]), "xds-protos encodes the same message differently"
    parsed = type(CASES[name]).FromString(theirs)
    parsed.DiscardUnknownFields()  # a field only Envoy knows would otherwise pass through
    assert _wire(parsed) == theirs
    assert parsed == CASES[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_xds_protos_reads_the_same_values(name: str, xds: dict[str, Any]) -> None:
    # Bytes alone cannot tell a Duration from a Timestamp (or a string from bytes); proto JSON can.
    assert xds["messages"][name]["dict"] == _as_dict(CASES[name])


def test_descriptors_match_envoy(xds: dict[str, Any]) -> None:
    ours = peer.describe([rls_pb2.RateLimitRequest.DESCRIPTOR, Response.DESCRIPTOR])
    theirs = xds["descriptors"]
    assert sorted(ours) == sorted(theirs)
    for name, ours_entry in ours.items():
        if "enum" in ours_entry:
            ours_values, their_values = ours_entry["enum"], theirs[name]["enum"]
            extra = {k: v for k, v in ours_values.items() if k not in their_values}
            assert extra == OUR_EXTRA_ENUM_VALUES.get(name, {}), name
            assert {k: ours_values.get(k) for k in their_values} == their_values, name
            continue
        for number, field in ours_entry["fields"].items():
            assert theirs[name]["fields"].get(number) == field, f"{name} field {number}"


def test_we_define_every_envoy_field(xds: dict[str, Any]) -> None:
    ours = peer.describe([rls_pb2.RateLimitRequest.DESCRIPTOR, Response.DESCRIPTOR])
    missing = {
        f"{name}.{field['name']} = {number}"
        for name, entry in xds["descriptors"].items()
        for number, field in entry.get("fields", {}).items()
        if number not in ours.get(name, {}).get("fields", {})
    }
    assert missing == set(), "xds-protos has fields our protos lack: add them under proto/"


def test_method_path_matches_envoy(xds: dict[str, Any]) -> None:
    assert peer.method_paths(rls_pb2.DESCRIPTOR) == [METHOD]
    assert xds["methods"] == [METHOD]


def test_generated_stub_calls_envoys_method_path() -> None:
    calls: list[str] = []

    class RecordingChannel:
        def unary_unary(self, method: str, *args: object, **kwargs: object) -> object:
            calls.append(method)
            return object()

    rls_pb2_grpc.RateLimitServiceStub(RecordingChannel())
    assert calls == [METHOD]

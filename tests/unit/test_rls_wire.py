"""The hand-written wire format of ShouldRateLimit's messages (rls_wire.py, docs/performance.md
(What the hot path avoids)) against the generated protobuf code: the same request read, the same
response bytes written, and None (the generated code takes over) for what the fast path leaves."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_svc.config.rules import Rule, Unit
from ratelimit_svc.limiter.limiter import Decision, Status
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit_svc.rls_wire import ResponseEncoder, decode_request
from ratelimit_svc.service import (
    MalformedRequest,
    parse_request,
    request_from_proto,
    response_to_proto,
)

text = st.text(max_size=12) | st.text(min_size=40, max_size=60)  # lengths of 1 and 2 bytes
uint32 = st.integers(0, 2**32 - 1)


@st.composite
def requests(draw: st.DrawFn) -> rls_pb2.RateLimitRequest:
    message = rls_pb2.RateLimitRequest(domain=draw(text), hits_addend=draw(uint32))
    for _ in range(draw(st.integers(0, 4))):
        descriptor = message.descriptors.add()
        for key, value in draw(st.lists(st.tuples(text, text), max_size=4)):
            descriptor.entries.add(key=key, value=value)
        if draw(st.booleans()):
            descriptor.limit.requests_per_unit = draw(uint32)
            unit: Any = draw(st.integers(0, 9))  # 8 and 9: units protobuf keeps as numbers
            descriptor.limit.unit = unit
        if draw(st.booleans()):
            descriptor.hits_addend.value = draw(st.integers(0, 2**64 - 1))
    return message


@given(requests())
@settings(max_examples=300)
def test_a_request_reads_as_the_generated_code_reads_it(message: rls_pb2.RateLimitRequest) -> None:
    data = message.SerializeToString()
    assert decode_request(data) == request_from_proto(rls_pb2.RateLimitRequest.FromString(data))


@given(requests(), st.data())
@settings(max_examples=300)
def test_damaged_bytes_read_the_same_or_go_to_the_generated_code(
    message: rls_pb2.RateLimitRequest, data: st.DataObject
) -> None:
    wire = bytearray(message.SerializeToString() or b"\x0a\x00")
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    damaged = bytes(wire[:cut])
    fast = decode_request(damaged)
    if fast is None:
        return  # the generated code answers it, as it did before the fast path
    parsed = parse_request(damaged)
    assert not isinstance(parsed, MalformedRequest)
    assert fast == request_from_proto(parsed)


def test_what_the_fast_path_leaves_to_the_generated_code() -> None:
    entry = b"\x0a\x06\x0a\x01k\x12\x01v"  # entries (1): key "k", value "v"
    limit = b"\x12\x02\x08\x05"  # limit (2): requests_per_unit 5
    cases = {
        "an unknown field": b"\x0a\x01d" + b"\x20\x01",
        "a singular message twice (merged by protobuf)": b"\x12\x10" + entry + limit + limit,
        "a length past the end": b"\x0a\x05d",
        "a string that is not UTF-8": b"\x0a\x01\xff",
        "a uint32 beyond 32 bits (truncated by protobuf)": b"\x18\x80\x80\x80\x80\x10",
    }
    for why, data in cases.items():
        assert decode_request(data) is None, why


def test_the_common_request_is_read() -> None:
    message = rls_pb2.RateLimitRequest(domain="bench")
    message.descriptors.add().entries.add(key="k1", value="v")
    request = decode_request(message.SerializeToString())
    assert request is not None
    assert request.domain == "bench"
    assert [d.entries for d in request.descriptors] == [(("k1", "v"),)]


rules = st.builds(
    lambda requests_per_unit, unit, name, stats_key: Rule(requests_per_unit, unit, stats_key, name),
    requests_per_unit=uint32,
    stats_key=st.text(),
    unit=st.sampled_from(list(Unit)),
    name=st.sampled_from(["", "named", "ünï"]),
)
statuses = st.builds(
    Status,
    code=st.sampled_from(list(Code)),
    rule=st.none() | rules,
    remaining=uint32,
    reset_seconds=st.integers(0, 200) | st.integers(0, 2**40),
)


@given(st.sampled_from(list(Code)), st.lists(statuses, max_size=5))
@settings(max_examples=300)
def test_a_response_is_written_as_the_generated_code_writes_it(
    overall: Code, written: list[Status]
) -> None:
    decision = Decision(overall, tuple(written))
    encoder = ResponseEncoder()
    expected = response_to_proto(decision).SerializeToString()
    assert encoder.encode(decision) == expected
    assert encoder.encode(decision) == expected  # the kept limit bytes, the second time


def test_headers_metadata_and_values_out_of_range_go_to_the_generated_code() -> None:
    rule = Rule(10, Unit.SECOND, stats_key="d.k")
    encoder = ResponseEncoder()
    assert encoder.encode(Decision(Code.OK, (Status(Code.OK, rule, 3, 1),), (("a", "b"),))) is None
    assert encoder.encode(Decision(Code.OK, (), dynamic_metadata={})) is None
    assert encoder.encode(Decision(Code.OK, (Status(Code.OK, rule, -1, 1),))) is None
    assert encoder.encode(Decision(Code.OK, (Status(Code.OK, rule, 3, -1),))) is None
    assert encoder.encode(Decision(Code.OK, (Status(Code.OK, rule, 3, 1),))) is not None

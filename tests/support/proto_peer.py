"""The xds-protos side of tests/test_proto.py, run as a separate process.

xds-protos (Envoy's official generated code) and our generated package register the same proto
file and message names in protobuf's default pool, so they can never be imported into one process.
test_proto.py runs this file with `sys.executable`, writes a JSON job to its stdin and reads the
answer from stdout. `describe` is plain descriptor code with no protobuf imports of its own, so
the test also imports this module to describe our messages the same way; only `main` touches
xds-protos.

Job:    {"messages": [{"name", "type", "wire" (base64), "dict" (proto JSON: field names, enums as numbers)}],
         "roots": [message full names]}
Answer: {"messages": {name: {"roundtrip", "rebuilt" (base64 or "error: ..."), "dict"}},
         "descriptors": describe(roots), "methods": ["/service/Method", ...]}
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any


def describe(roots: list[Any]) -> dict[str, Any]:
    """Fields (name, number, type, label, type name, oneof) and enum values of every message
    reachable from the roots, keyed by full name. Well-known google.protobuf types are named
    but not expanded: both sides share the one protobuf runtime for those."""
    out: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        message = pending.pop()
        if message.full_name in out or message.full_name.startswith("google.protobuf."):
            continue
        fields: dict[str, Any] = {}
        for field in message.fields:
            type_name = ""
            if field.message_type is not None:
                type_name = field.message_type.full_name
                pending.append(field.message_type)
            elif field.enum_type is not None:
                type_name = field.enum_type.full_name
                out[type_name] = {
                    "enum": {value.name: value.number for value in field.enum_type.values}
                }
            oneof = field.containing_oneof
            fields[str(field.number)] = {
                "name": field.name,
                "type": field.type,
                "label": "repeated" if field.is_repeated else "singular",
                "type_name": type_name,
                "oneof": oneof.name if oneof is not None else "",
            }
        out[message.full_name] = {"fields": fields}
    return out


def method_paths(file_descriptor: Any) -> list[str]:
    return sorted(
        f"/{service.full_name}/{method.name}"
        for service in file_descriptor.services_by_name.values()
        for method in service.methods
    )


def main() -> None:
    from envoy.config.core.v3 import base_pb2  # noqa: F401  (registers HeaderValue)
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2  # noqa: F401
    from envoy.service.ratelimit.v3 import rls_pb2
    from google.protobuf import descriptor_pool, json_format, message_factory

    job = json.load(sys.stdin)
    pool = descriptor_pool.Default()

    def message_class(full_name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))

    answers: dict[str, Any] = {}
    for item in job["messages"]:
        cls = message_class(item["type"])
        parsed = cls.FromString(base64.b64decode(item["wire"]))
        # Unknown fields would be carried through a round trip unchanged and hide a field we
        # define that Envoy does not; dropping them makes such a field change the bytes.
        parsed.DiscardUnknownFields()
        try:
            rebuilt = encode(
                json_format.ParseDict(item["dict"], cls()).SerializeToString(deterministic=True)
            )
        except json_format.ParseError as error:  # a type mismatch; reported, not fatal
            rebuilt = f"error: {error}"
        answers[item["name"]] = {
            "roundtrip": encode(parsed.SerializeToString(deterministic=True)),
            "rebuilt": rebuilt,
            "dict": json_format.MessageToDict(
                parsed, preserving_proto_field_name=True, use_integers_for_enums=True
            ),
        }

    roots = [pool.FindMessageTypeByName(name) for name in job["roots"]]
    json.dump(
        {
            "messages": answers,
            "descriptors": describe(roots),
            "methods": method_paths(rls_pb2.DESCRIPTOR),
        },
        sys.stdout,
    )


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


if __name__ == "__main__":
    main()

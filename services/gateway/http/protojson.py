"""stt.v1 messages as REST JSON, and their JSON Schemas for the OpenAPI document.

One mapping for every message, derived from the proto descriptors (so REST and gRPC cannot drift):
field names as in the proto; enum values in lower case without their prefix
(`JOB_STATUS_RUNNING` -> "running"); Timestamps as RFC 3339 strings or null when unset; 64-bit
integers as JSON numbers; every field present (defaults included).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name
_INTS = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def _prefix(enum: Any) -> str:
    names = [v.name for v in enum.values]
    first = names[0]
    return first[: first.rfind("_UNSPECIFIED") + 1] if first.endswith("_UNSPECIFIED") else ""


def enum_name(enum: Any, number: int) -> str:
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(_prefix(enum)).lower()


def enum_number(enum: Any, name: str) -> int | None:
    """ "high", "HIGH" or "PRIORITY_HIGH" -> its number; None if unknown."""
    key = name.strip().upper()
    value = enum.values_by_name.get(key) or enum.values_by_name.get(_prefix(enum) + key)
    return value.number if value is not None else None


def enum_names(enum: Any) -> list[str]:
    return [enum_name(enum, v.number) for v in enum.values]


def _value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == _TIMESTAMP:
            ts: timestamp_pb2.Timestamp = value
            return ts.ToJsonString() if (ts.seconds or ts.nanos) else None
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        import base64

        return base64.b64encode(value).decode()
    if field.type in _FLOATS:
        return round(float(value), 6)
    return value


def to_json(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    field: Any
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if _is_repeated(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                vf = field.message_type.fields_by_name["value"]
                out[field.name] = {k: _value(vf, v) for k, v in value.items()}
            else:
                out[field.name] = [_value(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name != _TIMESTAMP:
            out[field.name] = to_json(value) if msg.HasField(field.name) else None
        else:
            out[field.name] = _value(field, value)
    return out


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


# -- JSON Schema ------------------------------------------------------------------------------------


def _field_schema(field: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == _TIMESTAMP:
            item: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
        else:
            item = {"$ref": f"#/components/schemas/{schema_name(field.message_type)}"}
            add_schema(field.message_type, defs)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        item = {"type": "string", "enum": enum_names(field.enum_type)}
    elif field.type in _INTS:
        item = {"type": "integer"}
    elif field.type in _FLOATS:
        item = {"type": "number"}
    elif field.type == FieldDescriptor.TYPE_BOOL:
        item = {"type": "boolean"}
    elif field.type == FieldDescriptor.TYPE_BYTES:
        item = {"type": "string", "format": "byte"}
    else:
        item = {"type": "string"}
    if _is_repeated(field):
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vf = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": _field_schema(vf, defs)}
        return {"type": "array", "items": item}
    return item


def schema_name(desc: Any) -> str:
    return desc.name


def add_schema(desc: Any, defs: dict[str, Any]) -> str:
    """Add the JSON Schema of `desc` (and of the messages it uses) to `defs`; return its name."""
    name = schema_name(desc)
    if name in defs:
        return name
    defs[name] = {}  # placeholder against recursion
    defs[name] = {
        "type": "object",
        "title": name,
        "description": f"stt.v1 {desc.full_name.rsplit('.', 1)[-1]} (see protos/stt/v1; enums in lower "
        "case without their prefix)",
        "properties": {f.name: _field_schema(f, defs) for f in desc.fields},
    }
    return name

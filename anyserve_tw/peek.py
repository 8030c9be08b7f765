"""Read what the ingress routes on from a ModelInferRequest, without decoding it.

The ingress never parses tensors (MLServer's main process became its own
bottleneck doing so).  This walks only the top-level protobuf fields, skipping
each length-delimited one by its length, and returns ``model_name`` (field 1),
``model_version`` (field 2) and ``id`` (field 3).  Cost is a few steps per
top-level field, whatever the tensor sizes; nothing is copied but those strings.
"""
from anyserve_tw.errors import invalid_argument

_WANTED = (1, 2, 3)


def _varint(data, pos):
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def peek_request(data):
    """Return ``(model_name, model_version, request_id)`` of serialized
    ``inference.ModelInferRequest`` bytes; raise INVALID_ARGUMENT if the bytes
    are not a well-formed protobuf message at the top level."""
    found = ["", "", ""]
    size = len(data)
    pos = 0
    try:
        while pos < size:
            tag, pos = _varint(data, pos)
            field, wire_type = tag >> 3, tag & 7
            if field == 0:
                raise ValueError("field number 0")
            if wire_type == 2:
                length, pos = _varint(data, pos)
                end = pos + length
                if end > size:
                    raise ValueError("field %d runs past the end" % field)
                if field in _WANTED:
                    found[field - 1] = bytes(data[pos:end]).decode("utf-8")
                pos = end
            elif wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            else:
                raise ValueError("unsupported wire type %d" % wire_type)
        if pos != size:
            raise ValueError("truncated field")
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise invalid_argument("malformed ModelInferRequest: %s" % (e,)) from None
    return found[0], found[1], found[2]

"""Protobuf wire-format shortcuts for the request path.

The ingress never parses tensors (MLServer's main process became its own
bottleneck doing so): :func:`peek_request` walks only the top-level fields of
a ModelInferRequest, skipping each length-delimited one by its length, and
returns the model name, version and request id.  Its cost is a few steps per
top-level field, whatever the tensor sizes.

The worker uses the same walk to split ``raw_input_contents`` off as
zero-copy, read-only views (:func:`split_raw_inputs`), and adds
``raw_output_contents`` to a response without copying them through protobuf:
:func:`raw_output_parts` lists the pieces for a scatter-gather send,
:func:`append_raw_outputs` joins them.
"""
from anyserve_tw.wire.errors import invalid_argument

LENGTH_DELIMITED = 2

# ModelInferRequest / ModelInferResponse field numbers (proto/anyserve/inference.proto).
MODEL_NAME = 1
MODEL_VERSION = 2
REQUEST_ID = 3
RAW_INPUT_CONTENTS = 7
RAW_OUTPUT_CONTENTS = 6


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


def encode_varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def iter_fields(data):
    """Yield ``(field, wire_type, field_start, value_start, value_end)`` for each
    top-level field; raises ValueError/IndexError on malformed bytes."""
    size = len(data)
    pos = 0
    while pos < size:
        start = pos
        tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire_type == LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            value_start, pos = pos, pos + length
        elif wire_type == 0:
            value_start = pos
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            value_start, pos = pos, pos + 8
        elif wire_type == 5:
            value_start, pos = pos, pos + 4
        else:
            raise ValueError("unsupported wire type %d" % wire_type)
        if pos > size:
            raise ValueError("field %d runs past the end" % field)
        yield field, wire_type, start, value_start, pos


def _malformed(error):
    return invalid_argument("malformed ModelInferRequest: %s" % (error,))


def peek_request(data):
    """Return ``(model_name, model_version, request_id)`` of serialized
    ``inference.ModelInferRequest`` bytes; raise INVALID_ARGUMENT if the bytes
    are not a well-formed protobuf message at the top level."""
    found = ["", "", ""]
    try:
        for field, wire_type, _, start, end in iter_fields(data):
            if field <= REQUEST_ID and wire_type == LENGTH_DELIMITED:
                found[field - 1] = bytes(data[start:end]).decode("utf-8")
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise _malformed(e) from None
    return found[0], found[1], found[2]


def split_raw_inputs(payload):
    """Split request bytes into (everything but the raw inputs, [raw input views]).

    The first part is small (names, shapes, parameters) and cheap to parse; the
    raw inputs stay where they are in ``payload``, as memoryviews, read-only
    even over a mutable buffer: handlers see them through numpy.
    """
    view = memoryview(payload).toreadonly()
    rest = []
    raw = []
    try:
        for field, wire_type, field_start, start, end in iter_fields(view):
            if field == RAW_INPUT_CONTENTS and wire_type == LENGTH_DELIMITED:
                raw.append(view[start:end])
            else:
                rest.append(view[field_start:end])
    except (IndexError, ValueError) as e:
        raise _malformed(e) from None
    return b"".join(rest), raw


def _nbytes(buffer):
    return len(buffer) if type(buffer) is bytes else memoryview(buffer).nbytes


def raw_output_parts(response_bytes, buffers):
    """``[response_bytes, key, buffer, key, buffer, ...]``: serialized response
    bytes followed by one ``raw_output_contents`` entry per buffer, each key
    being the field's tag and length.  The buffers are not copied; a list of
    parts is what the frame sender takes.

    Protobuf allows a message's fields in any order, so appending field 6 after
    the rest equals setting it, minus two copies of every output tensor.
    """
    tag = encode_varint(RAW_OUTPUT_CONTENTS << 3 | LENGTH_DELIMITED)
    parts = [response_bytes]
    for buffer in buffers:
        size = _nbytes(buffer)
        parts.append(tag + encode_varint(size))
        if size:
            parts.append(buffer)
    return parts


def append_raw_outputs(response_bytes, buffers):
    """Serialized response bytes with ``raw_output_contents`` entries appended,
    as one ``bytes`` (:func:`raw_output_parts` joined)."""
    return b"".join(raw_output_parts(response_bytes, buffers))

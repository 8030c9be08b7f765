"""Protobuf wire-format shortcuts for the request path.

The ingress never parses tensors (MLServer's main process became its own
bottleneck doing so): :func:`peek_request` walks only the top-level fields of
a ModelInferRequest, skipping each length-delimited one by its length, and
returns the model name, version and request id.  Its cost is a few steps per
top-level field, whatever the tensor sizes.

The worker uses the same walk to split ``raw_input_contents`` off as
zero-copy, read-only views (:func:`split_raw_inputs`), and adds
``raw_output_contents`` to a response without copying them through protobuf:
:func:`raw_output_parts` lists the pieces for a scatter-gather send.
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


def malformed(error):
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
        raise malformed(e) from None
    return found[0], found[1], found[2]


_RAW_INPUT_TAG = RAW_INPUT_CONTENTS << 3 | LENGTH_DELIMITED


def split_raw_inputs(payload):
    """``(rest, raw)`` of any bytes-like request: the bytes of every field
    but the raw inputs, and a view of each raw input where it lies.

    ``rest`` is small (names, shapes, parameters) and cheap to parse; fields
    before the first raw input (all of them, as protobuf serializes) come out
    as one slice, without a copy.  The views are read-only even over a
    mutable buffer: handlers see them through numpy.  INVALID_ARGUMENT for
    bytes that are not a well-formed message at the top level.
    """
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    view = view.toreadonly()
    try:
        return _split(view)
    except (IndexError, ValueError) as e:
        raise malformed(e) from None


def _split(view):
    """:func:`split_raw_inputs` on a byte view; the walk of :func:`iter_fields`
    inlined, with one-byte tags and lengths read without a call."""
    size = len(view)
    pos = run = 0  # run: start of the fields kept since the last raw input
    rest = []
    raw = []
    while pos < size:
        start = pos
        tag = view[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _varint(view, start)
        if tag < 8:
            raise ValueError("field number 0")
        wire_type = tag & 7
        if wire_type == LENGTH_DELIMITED:
            length = view[pos]
            pos += 1
            if length >= 0x80:
                length, pos = _varint(view, pos - 1)
            end = pos + length
        elif wire_type == 0:
            _, end = _varint(view, pos)
        elif wire_type == 1:
            end = pos + 8
        elif wire_type == 5:
            end = pos + 4
        else:
            raise ValueError("unsupported wire type %d" % wire_type)
        if end > size:
            raise ValueError("field %d runs past the end" % (tag >> 3))
        if tag == _RAW_INPUT_TAG:
            if run < start:
                rest.append(view[run:start])
            raw.append(view[pos:end])
            run = end
        pos = end
    if not raw:
        return view, raw
    if run < size:
        rest.append(view[run:size])
    return (rest[0] if len(rest) == 1 else b"".join(rest)), raw


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


#: ``ModelStreamInferResponse``'s ``infer_response`` field.
STREAM_INFER_RESPONSE = 2


def stream_response(response_bytes):
    """A ``ModelStreamInferResponse`` carrying serialized ``ModelInferResponse``
    bytes, built around them without parsing them."""
    return (encode_varint(STREAM_INFER_RESPONSE << 3 | LENGTH_DELIMITED)
            + encode_varint(len(response_bytes)) + response_bytes)

"""A request's bytes parsed once, for both routing and decoding.

One walk over the top-level fields leaves each ``raw_input_contents`` where
it is in the frame (a read-only view, so tensors are not copied and a
bytearray frame cannot be written through them); protobuf parses the rest
once, and routing reads the model name and version from that parse.
"""
from google.protobuf.message import DecodeError

from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import invalid_argument
from anyserve_tw.wire.protowire import LENGTH_DELIMITED, RAW_INPUT_CONTENTS

_RAW_TAG = RAW_INPUT_CONTENTS << 3 | LENGTH_DELIMITED
_parse = protos.inference.ModelInferRequest.FromString


class ParsedRequest:
    """The parsed message (without raw inputs) and the raw input views."""

    __slots__ = ("message", "raw")

    def __init__(self, message, raw):
        self.message = message
        self.raw = raw

    @property
    def name(self):
        return self.message.model_name

    @property
    def version(self):
        return self.message.model_version


def _malformed(error):
    return invalid_argument("malformed ModelInferRequest: %s" % (error,))


def _varint(view, pos):
    """(value, position after it); IndexError past the end."""
    result = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def split_raw_inputs(view):
    """``(rest, raw)``: the bytes of every other field, and a view of each raw
    input.  Fields before the first raw input (all of them, as protobuf
    serializes) come out as one slice, without a copy."""
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
        if tag == _RAW_TAG:
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


def parse_request(payload):
    """A :class:`ParsedRequest` of any bytes-like payload; INVALID_ARGUMENT
    if it is not a ModelInferRequest."""
    if isinstance(payload, ParsedRequest):
        return payload
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    view = view.toreadonly()
    try:
        rest, raw = split_raw_inputs(view)
        message = _parse(rest)
    except (IndexError, ValueError, DecodeError) as e:
        raise _malformed(e) from None
    return ParsedRequest(message, raw)

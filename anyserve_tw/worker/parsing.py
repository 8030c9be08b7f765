"""A request's bytes parsed once, for both routing and decoding.

One walk over the top-level fields leaves each ``raw_input_contents`` where
it is in the frame (a read-only view, so tensors are not copied and a
bytearray frame cannot be written through them); protobuf parses the rest
once, and routing reads the model name and version from that parse.
"""
from google.protobuf.message import DecodeError

from anyserve_tw.wire import protos
from anyserve_tw.wire.protowire import malformed, split_raw_inputs

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


def parse_request(payload):
    """A :class:`ParsedRequest` of any bytes-like payload; INVALID_ARGUMENT
    if it is not a ModelInferRequest."""
    if isinstance(payload, ParsedRequest):
        return payload
    rest, raw = split_raw_inputs(payload)
    try:
        message = _parse(rest)
    except DecodeError as e:
        raise malformed(e) from None
    return ParsedRequest(message, raw)

"""The payloads of the frame kinds that carry more than protobuf bytes.

See :mod:`anyserve_tw.wire.framing` for the kinds.  Both processes use these
helpers, so the layouts live in one place.
"""
import json
import struct
from collections import namedtuple

_TIMING = struct.Struct("!QQQQI")


class Timing(namedtuple("Timing", "queue_ns input_ns infer_ns output_ns batch_size")):
    """A worker's own times for one request, in nanoseconds (Triton's
    statistics): waiting for a thread or batch, decoding inputs, the
    handler, encoding outputs; and how many requests its execution served."""

    def pack(self):
        return _TIMING.pack(*self)

    @classmethod
    def unpack(cls, payload):
        return cls._make(_TIMING.unpack(payload))


_HTTP = struct.Struct("!HHI")

#: ``json_length`` meaning "the whole body is JSON" (no binary tensors).
WHOLE_BODY = 0xFFFFFFFF


def http_request_parts(name, version, body, json_length=None):
    """The HTTP_REQUEST payload, as parts the frame sender joins: model name
    and version (from the URL) ahead of the request body as the client sent
    it.  ``json_length`` is the ``Inference-Header-Content-Length`` header:
    the body's JSON part, binary tensors after it; None: all JSON."""
    name_bytes = name.encode("utf-8")
    version_bytes = version.encode("utf-8")
    head = _HTTP.pack(len(name_bytes), len(version_bytes),
                      WHOLE_BODY if json_length is None else json_length)
    return [head + name_bytes + version_bytes, body]


class HttpRequest(namedtuple("HttpRequest", "name version json binary")):
    """An HTTP_REQUEST read back: name, version, the JSON part and the binary
    part of the body (memoryviews, not copies)."""


def read_http_request(payload):
    """Split an HTTP_REQUEST payload; ValueError when it is malformed (a
    binary-data header longer than the body)."""
    view = memoryview(payload)
    if len(view) < _HTTP.size:
        raise ValueError("HTTP request frame of %d bytes is too short" % len(view))
    name_length, version_length, json_length = _HTTP.unpack_from(view)
    start = _HTTP.size + name_length + version_length
    if start > len(view):
        raise ValueError("HTTP request frame is truncated")
    name = bytes(view[_HTTP.size:_HTTP.size + name_length]).decode("utf-8")
    version = bytes(view[_HTTP.size + name_length:start]).decode("utf-8")
    body = view[start:]
    if json_length == WHOLE_BODY:
        return HttpRequest(name, version, body, body[len(body):])
    if json_length > len(body):
        raise ValueError(
            "Inference-Header-Content-Length %d exceeds the body's %d bytes" % (json_length, len(body))
        )
    return HttpRequest(name, version, body[:json_length], body[json_length:])


class Region(namedtuple("Region", "key offset byte_size")):
    """A registered system shared-memory region: its POSIX name (``key``,
    e.g. ``/input0``), and the window of it the client lent us."""


def encode_shm_table(regions):
    """SHM_TABLE payload for ``{name: Region}``."""
    return json.dumps({name: list(region) for name, region in regions.items()},
                      sort_keys=True).encode("utf-8")


def decode_shm_table(payload):
    """``{name: Region}`` from a SHM_TABLE payload (empty: no region)."""
    if not len(payload):
        return {}
    table = json.loads(bytes(payload).decode("utf-8"))
    return {name: Region(str(key), int(offset), int(size)) for name, (key, offset, size) in table.items()}

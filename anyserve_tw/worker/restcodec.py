"""KServe v2 REST inference bodies, turned into the protobuf messages the
rest of the worker serves, and back.

The ingress forwards a REST inference body untouched (an HTTP_REQUEST
frame); here its JSON becomes a ``ModelInferRequest`` with every tensor in
``raw_input_contents``, so validation, shared memory and classification work
as for gRPC, and the response becomes Triton's JSON, followed by the outputs
the client wanted binary.  What Triton's HTTP server accepts is accepted
here, with its rules:

- an input has exactly one of ``data`` (a flat or nested JSON list; BYTES
  elements are strings, sent on as UTF-8), ``parameters.binary_data_size``
  (its bytes follow the JSON, in input order; all of them must be used), or
  ``parameters.shared_memory_region`` (then it has no raw content, as with
  tritonclient's gRPC requests);
- numbers must suit the datatype: integers in range for integer types,
  ``true``/``false`` for BOOL, any number for floating types.  Unlike
  Triton, FP16 is accepted and returned as JSON numbers too;
- an output is binary when it asks ``parameters.binary_data: true``; one not
  requested by name is binary when the request's ``binary_data_output`` is;
  an output in shared memory gets no data at all; ``classification`` and the
  shared-memory parameters reach the model as the gRPC parameters of the same
  names (``binary_data``, ``binary_data_output`` and ``binary_data_size`` do
  not: they only shape the HTTP body).

A BYTES output asked for as JSON whose elements are not all valid UTF-8 is
sent binary instead (``binary_data_size``, as tritonclient reads either
way): Triton writes such bytes into its JSON as they are, which no JSON
parser accepts.
"""
import json
from collections import namedtuple

import grpc
import numpy as np

from anyserve_tw.wire import protos, protowire
from anyserve_tw.wire.errors import InferenceError, invalid_argument
from anyserve_tw.wire.payloads import read_http_request
from anyserve_tw.worker import tensors
from anyserve_tw.worker.parsing import ParsedRequest

_v2 = protos.inference

_RAW_INPUT_TAG = protowire.encode_varint(protowire.RAW_INPUT_CONTENTS << 3 | protowire.LENGTH_DELIMITED)

_INT64 = (-(1 << 63), (1 << 63) - 1)

#: Compact, as Triton writes it.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_UINT64_MAX = (1 << 64) - 1


class ResponseOptions(namedtuple("ResponseOptions", "binary_default binary shared_memory")):
    """What a REST request asked of its response: ``binary_default`` for
    outputs not requested by name (``binary_data_output``), ``binary``
    (name -> bool) for those requested, ``shared_memory`` the names of the
    outputs written to shared memory."""

    def is_binary(self, name):
        return self.binary.get(name, self.binary_default)


# -- request -----------------------------------------------------------------------

def infer_request_from_http(payload):
    """``(request_bytes, options)`` for an HTTP_REQUEST frame's payload: a
    serialized ModelInferRequest for the model the URL names, and the
    :class:`ResponseOptions` :func:`http_response_from_infer` needs.
    INVALID_ARGUMENT for anything malformed."""
    request, raw, options = _convert(payload)
    parts = [request.SerializeToString()]
    for buffer in raw:
        parts.append(_RAW_INPUT_TAG + protowire.encode_varint(len(buffer)))
        parts.append(buffer)
    return b"".join(parts), options


class HttpParsedRequest(ParsedRequest):
    """A REST request as :func:`~anyserve_tw.worker.parsing.parse_request`
    makes one of bytes, whose ``len`` is the HTTP body's (what a request's
    size means to the worker's inline rule)."""

    __slots__ = ("size",)

    def __init__(self, message, raw, size):
        super().__init__(message, raw)
        self.size = size

    def __len__(self):
        return self.size


def parsed_request_from_http(payload):
    """``(request, options)`` as :func:`infer_request_from_http`, but the
    request as a :class:`HttpParsedRequest` (which ``parse_request``, the
    models and ``len`` take as they take request bytes): the binary inputs
    stay views of the frame, not copied into new bytes, and nothing is
    serialized to be parsed again."""
    request, raw, options = _convert(payload)
    return HttpParsedRequest(request, [_readonly(b) for b in raw], len(payload)), options


def _readonly(buffer):
    view = memoryview(buffer)
    return view if view.readonly else view.toreadonly()


def _convert(payload):
    """(ModelInferRequest without raw inputs, the raw inputs, options).
    JSON may escape a lone surrogate (``"\\ud800"``), which no protobuf
    string can hold: INVALID_ARGUMENT, as any other malformed body."""
    try:
        return _convert_json(payload)
    except UnicodeEncodeError as e:
        raise invalid_argument("the inference request has a string that is not valid Unicode: %s" % (e,)) from None


def _convert_json(payload):
    """:func:`_convert`, for bodies whose strings are all valid Unicode."""
    try:
        http = read_http_request(payload)
    except ValueError as e:
        raise invalid_argument(str(e)) from None
    if not len(http.json):
        if len(http.binary):
            raise invalid_argument(
                "Inference-Header-Content-Length 0 (a raw binary request) is not supported: "
                "send the JSON inference header first")
        raise invalid_argument("empty inference request body")
    try:
        body = json.loads(bytes(http.json))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise invalid_argument("malformed JSON in the inference request: %s" % (e,)) from None
    if not isinstance(body, dict):
        raise invalid_argument("the inference request must be a JSON object")

    request = _v2.ModelInferRequest(model_name=http.name, model_version=http.version)
    request_id = body.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise invalid_argument("'id' must be a string")
        request.id = request_id
    binary_default = False
    for key, value in _object(body.get("parameters"), "'parameters'").items():
        if key == "binary_data_output":
            binary_default = _bool(value, "parameter 'binary_data_output'")
        else:
            _set_parameter(request.parameters[key], value, "parameter '%s'" % key)

    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise invalid_argument("the inference request needs an 'inputs' list")
    binary = http.binary
    raw = []
    used = 0
    for index, item in enumerate(inputs):
        used = _add_input(request, index, item, binary, used, raw)
    if used != len(binary):
        raise invalid_argument(
            "the request carries %d bytes of binary data after its JSON, but its inputs' "
            "binary_data_size add up to %d" % (len(binary), used))

    outputs = body.get("outputs")
    binary_outputs = {}
    shared_memory = set()
    if outputs is not None:
        if not isinstance(outputs, list):
            raise invalid_argument("'outputs' must be a list")
        for index, item in enumerate(outputs):
            _add_output(request, index, item, binary_outputs, shared_memory)

    return request, raw, ResponseOptions(binary_default, binary_outputs, frozenset(shared_memory))


def _object(value, what):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid_argument("%s must be a JSON object" % what)
    return value


def _bool(value, what):
    if not isinstance(value, bool):
        raise invalid_argument("%s must be true or false" % what)
    return value


def _set_parameter(target, value, what):
    """A JSON parameter value into an InferParameter, as tritonclient's gRPC
    client types them: booleans, int64 (uint64 above its range), doubles,
    strings."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            target.int64_param = value
        elif 0 <= value <= _UINT64_MAX:
            target.uint64_param = value
        else:
            raise invalid_argument("%s: %d does not fit in 64 bits" % (what, value))
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise invalid_argument("%s must be a boolean, number or string" % what)


def _add_input(request, index, item, binary, used, raw):
    """Add input ``item`` to ``request`` and its content to ``raw``; return
    the binary bytes used so far."""
    if not isinstance(item, dict):
        raise invalid_argument("input %d must be a JSON object" % index)
    name = item.get("name")
    if not isinstance(name, str):
        raise invalid_argument("input %d needs a 'name' string" % index)
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise invalid_argument("input '%s' needs a 'datatype' string" % name)
    if datatype not in tensors.DATATYPES:
        raise invalid_argument("input '%s': unknown datatype '%s'" % (name, datatype))
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 63 for d in shape):
        raise invalid_argument("input '%s' needs a 'shape' list of non-negative int64 integers" % name)
    parameters = _object(item.get("parameters"), "input '%s': 'parameters'" % name)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)

    sources = [what for what, present in (
        ("'data'", "data" in item),
        ("'binary_data_size'", "binary_data_size" in parameters),
        ("'shared_memory_region'", "shared_memory_region" in parameters)) if present]
    if len(sources) != 1:
        raise invalid_argument(
            "input '%s' must set exactly one of 'data', 'binary_data_size' in 'parameters' or "
            "'shared_memory_region' in 'parameters', but %s" % (
                name, "sets none" if not sources else "sets " + " and ".join(sources)))
    for key, value in parameters.items():
        if key != "binary_data_size":
            _set_parameter(tensor.parameters[key], value, "input '%s': parameter '%s'" % (name, key))

    if "data" in item:
        raw.append(_json_tensor(name, datatype, shape, item["data"]))
    elif "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise invalid_argument("input '%s': 'binary_data_size' must be a non-negative integer" % name)
        if used + size > len(binary):
            raise invalid_argument(
                "input '%s': binary_data_size %d, but only %d bytes of binary data are left after "
                "the JSON" % (name, size, len(binary) - used))
        if datatype != "BYTES":
            expected = tensors.element_count(shape) * tensors.DATATYPES[datatype].itemsize
            if size != expected:
                raise invalid_argument(
                    "input '%s': binary_data_size %d, but %s %s takes %d bytes"
                    % (name, size, datatype, shape, expected))
        raw.append(binary[used:used + size])
        used += size
    return used


def _flatten(data):
    """The leaves of nested lists, in order."""
    if not isinstance(data, list):
        return [data]
    flat = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _json_tensor(name, datatype, shape, data):
    """The raw contents (little-endian; BYTES length-prefixed) of a tensor
    given as JSON ``data``."""
    count = tensors.element_count(shape)
    if datatype == "BYTES":
        items = _flatten(data)
        if not all(isinstance(item, str) for item in items):
            raise invalid_argument("input '%s': BYTES 'data' must hold strings" % name)
        _check_count(name, len(items), count, shape)
        return tensors.encode_bytes(items)
    dtype = tensors.DATATYPES[datatype]
    try:
        array = np.array(data)
    except ValueError:  # nested lists of uneven lengths: Triton takes them
        array = np.array(_flatten(data))
    if dtype.kind in "iu" and array.dtype.kind in "fO":
        # Integers past int64 (or uint64's mixed with small ones) make numpy
        # guess float or object: decide on the Python integers themselves.
        flat = _flatten(data)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            limits = np.iinfo(dtype)
            if flat and (min(flat) < limits.min or max(flat) > limits.max):
                raise invalid_argument("input '%s': a value in 'data' is out of range for %s" % (name, datatype))
            array = np.array(flat, dtype=dtype)
    if array.size:
        kind = array.dtype.kind
        if datatype == "BOOL":
            ok = kind == "b"
        elif dtype.kind in "iu":
            ok = kind in "iu"
            if ok:
                limits = np.iinfo(dtype)
                if int(array.min()) < limits.min or int(array.max()) > limits.max:
                    raise invalid_argument("input '%s': a value in 'data' is out of range for %s" % (name, datatype))
        else:
            ok = kind in "iuf"
        if not ok:
            expected = ("true/false" if datatype == "BOOL"
                        else "integers" if dtype.kind in "iu" else "numbers")
            raise invalid_argument("input '%s': %s 'data' must hold %s" % (name, datatype, expected))
    _check_count(name, array.size, count, shape)
    return array.astype(tensors.DATATYPES[datatype], copy=False).tobytes()


def _check_count(name, got, count, shape):
    if got != count:
        raise invalid_argument(
            "input '%s': 'data' holds %d elements, shape %s needs %d" % (name, got, shape, count))


def _add_output(request, index, item, binary, shared_memory):
    if not isinstance(item, dict):
        raise invalid_argument("output %d must be a JSON object" % index)
    name = item.get("name")
    if not isinstance(name, str):
        raise invalid_argument("output %d needs a 'name' string" % index)
    parameters = _object(item.get("parameters"), "output '%s': 'parameters'" % name)
    output = request.outputs.add(name=name)
    in_shared_memory = "shared_memory_region" in parameters
    wants_binary = _bool(parameters.get("binary_data", False), "output '%s': 'binary_data'" % name)
    if in_shared_memory:
        if "classification" in parameters:
            raise invalid_argument(
                "output '%s' can't set both 'shared_memory_region' and 'classification'" % name)
        if wants_binary:
            raise invalid_argument("output '%s' can't set both 'shared_memory_region' and 'binary_data'" % name)
        shared_memory.add(name)
    binary[name] = wants_binary
    for key, value in parameters.items():
        if key != "binary_data":
            _set_parameter(output.parameters[key], value, "output '%s': parameter '%s'" % (name, key))


# -- response ------------------------------------------------------------------------

def http_response_from_infer(response_parts, options):
    """``(body_parts, json_length)``: the HTTP body answering a REST request,
    as parts (Triton's JSON, then each binary output's bytes, not copied),
    from the parts of a serialized ModelInferResponse (``raw_output_contents``
    for its outputs) and the request's :class:`ResponseOptions`."""
    rest, raw = _split_response(response_parts)
    message = _v2.ModelInferResponse.FromString(rest)
    if raw and len(raw) != len(message.outputs):
        raise InferenceError(grpc.StatusCode.INTERNAL, "response has %d raw_output_contents for %d outputs"
                             % (len(raw), len(message.outputs)))
    outputs = []
    binary_parts = []
    for index, tensor in enumerate(message.outputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        entry = {"name": name, "datatype": datatype, "shape": shape}
        # An output written to shared memory is answered without parameters,
        # as Triton does: perf_analyzer reads ``binary_data_size`` from any
        # output that has them.
        parameters = {} if name in options.shared_memory else _parameters(tensor.parameters)
        if name not in options.shared_memory:
            buffer = raw[index] if raw else _typed_contents(datatype, shape, tensor.contents)
            data = None if options.is_binary(name) else _json_data(name, datatype, shape, buffer)
            if data is None:
                size = memoryview(buffer).nbytes
                parameters["binary_data_size"] = size
                if size:
                    binary_parts.append(buffer)
            else:
                entry["data"] = data
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document = {}
    if message.id:
        document["id"] = message.id
    document["model_name"] = message.model_name
    document["model_version"] = message.model_version
    parameters = _parameters(message.parameters)
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = outputs
    head = _JSON.encode(document).encode("utf-8")
    return [head] + binary_parts, len(head)


def _parameters(mapping):
    if not mapping:
        return {}
    out = {}
    for key, value in mapping.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def _typed_contents(datatype, shape, contents):
    """Raw bytes of an output sent typed (``contents``) rather than raw."""
    try:
        array = tensors.from_contents(datatype, shape, contents)
    except InferenceError as e:
        raise InferenceError(grpc.StatusCode.INTERNAL, "malformed response: %s" % e.message) from None
    return tensors.to_buffer(datatype, array)


def _json_data(name, datatype, shape, buffer):
    """A flat JSON list of an output's elements; None for BYTES elements
    that are not all UTF-8 (sent binary instead)."""
    count = tensors.element_count(shape)
    if datatype == "BYTES":
        try:
            items = tensors.decode_bytes(buffer, count)
        except InferenceError as e:
            raise InferenceError(grpc.StatusCode.INTERNAL, "output '%s': %s" % (name, e.message)) from None
        try:
            return [item.decode("utf-8") for item in items]
        except UnicodeDecodeError:
            return None
    dtype = tensors.DATATYPES.get(datatype)
    if dtype is None:
        raise InferenceError(grpc.StatusCode.INTERNAL, "output '%s': unknown datatype '%s'" % (name, datatype))
    size = memoryview(buffer).nbytes
    if size != count * dtype.itemsize:
        raise InferenceError(grpc.StatusCode.INTERNAL, "output '%s': %d bytes for %s %s"
                             % (name, size, datatype, shape))
    return np.frombuffer(buffer, dtype=dtype).tolist()


class _Parts:
    """Reads a byte stream given as a list of bytes-like parts, without
    joining them."""

    def __init__(self, parts):
        self.parts = [p for p in (_bytes_view(p) for p in parts) if len(p)]
        self.index = 0
        self.offset = 0

    def at_end(self):
        return self.index >= len(self.parts)

    def byte(self):
        if self.index >= len(self.parts):
            raise ValueError("truncated message")
        part = self.parts[self.index]
        value = part[self.offset]
        self.offset += 1
        if self.offset == len(part):
            self.index += 1
            self.offset = 0
        return value

    def varint(self):
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def take(self, n):
        """The next ``n`` bytes: a view when they lie in one part, else joined."""
        pieces = []
        while n:
            if self.index >= len(self.parts):
                raise ValueError("truncated message")
            part = self.parts[self.index]
            step = min(n, len(part) - self.offset)
            pieces.append(part[self.offset:self.offset + step])
            self.offset += step
            n -= step
            if self.offset == len(part):
                self.index += 1
                self.offset = 0
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)


def _bytes_view(part):
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


#: Parts shorter than this are joined before the walk (cheaper than walking
#: across them); longer ones are walked where they lie.
_SMALL_PART = 64 * 1024


def _segments(parts):
    """``parts`` with each run of small ones joined."""
    segments = []
    small = []
    for part in parts:
        size = len(part) if type(part) is bytes else memoryview(part).nbytes
        if size >= _SMALL_PART:
            if small:
                segments.append(b"".join(small))
                small = []
            segments.append(part)
        elif size:
            small.append(part)
    if small:
        segments.append(small[0] if len(small) == 1 else b"".join(small))
    return segments


def _split_response(parts):
    """``(rest, raw)``: the response's bytes but its raw outputs, and a view
    of each raw output (a copy only of small ones, or where one straddles
    two large parts)."""
    segments = _segments(parts if isinstance(parts, (list, tuple)) else [parts])
    if len(segments) == 1:
        return _split_one(_bytes_view(segments[0]))
    reader = _Parts(segments)
    rest = []
    raw = []
    encode = protowire.encode_varint
    try:
        while not reader.at_end():
            tag = reader.varint()
            wire_type = tag & 7
            if wire_type == protowire.LENGTH_DELIMITED:
                value = reader.take(reader.varint())
                if tag >> 3 == protowire.RAW_OUTPUT_CONTENTS:
                    raw.append(value)
                else:
                    rest += [encode(tag), encode(len(value)), value]
            elif wire_type == 0:
                rest += [encode(tag), encode(reader.varint())]
            elif wire_type == 1 or wire_type == 5:
                rest += [encode(tag), reader.take(8 if wire_type == 1 else 4)]
            else:
                raise ValueError("unsupported wire type %d" % wire_type)
    except ValueError as e:
        raise InferenceError(grpc.StatusCode.INTERNAL, "malformed ModelInferResponse: %s" % e) from None
    return b"".join(rest), raw



def _split_one(view):
    """:func:`_split_response` of a response in one piece."""
    rest = []
    raw = []
    run = 0  # start of the fields kept since the last raw output
    try:
        for field, wire_type, start, value_start, end in protowire.iter_fields(view):
            if field == protowire.RAW_OUTPUT_CONTENTS and wire_type == protowire.LENGTH_DELIMITED:
                if run < start:
                    rest.append(view[run:start])
                raw.append(view[value_start:end])
                run = end
    except (IndexError, ValueError) as e:
        raise InferenceError(grpc.StatusCode.INTERNAL, "malformed ModelInferResponse: %s" % e) from None
    if run < len(view):
        rest.append(view[run:])
    return b"".join(rest), raw

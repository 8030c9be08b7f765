"""What a worker knows of one model: its handler, its tensor specs, and how a
request's bytes become handler arguments and the handler's result becomes
response bytes.

Two of Triton's extensions live here, as they change what a tensor's bytes
are: *system shared memory* (a tensor's parameters name a registered region
the worker reads the input from or writes the output into, see
:mod:`anyserve_tw.worker.sharedmemory`) and *classification* (a requested
output's ``classification`` parameter asks for its top-k "value:index[:label]"
strings instead of its values).
"""
import inspect
from collections import namedtuple

import grpc
import numpy as np

from anyserve_tw.wire import protos, protowire
from anyserve_tw.wire.errors import InferenceError, brief, invalid_argument
from anyserve_tw.worker import tensors
from anyserve_tw.worker.failurelog import FailureLog
from anyserve_tw.worker.tensors import shape_text
from anyserve_tw.worker.parsing import parse_request
from anyserve_tw.worker.sharedmemory import write_parts

_v2 = protos.inference

#: The tensor parameters of the shared-memory extension.
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"
#: The requested-output parameter of the classification extension.
CLASSIFICATION = "classification"

#: Largest output (per batch entry) classified, as Triton caps it: sorting
#: it is the worker's CPU, whatever the client asks.
MAX_CLASSIFIED = 1000000


class TensorSpec(namedtuple("TensorSpec", "name datatype shape")):
    """A declared input or output: name, v2 datatype, shape (-1: any size)."""

    def __new__(cls, name, datatype, shape=(-1,)):
        if datatype not in tensors.DATATYPES:
            raise ValueError("unknown datatype %r for tensor %r" % (datatype, name))
        return super().__new__(cls, name, datatype, tuple(int(d) for d in shape))

    def accepts_shape(self, shape):
        if len(shape) != len(self.shape):
            return False
        for want, got in zip(self.shape, shape):
            if want >= 0 and want != got:
                return False
        return True


def as_spec(spec):
    """Accept a TensorSpec, a (name, datatype[, shape]) tuple or a dict."""
    if isinstance(spec, TensorSpec):
        return spec
    if isinstance(spec, dict):
        return TensorSpec(**spec)
    return TensorSpec(*spec)


def _parameter_value(parameter):
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _parameters(mapping):
    # Most requests carry none; an empty map's items() alone costs ~0.7 us.
    if not mapping:
        return {}
    return {key: _parameter_value(value) for key, value in mapping.items()}


class SharedMemoryWindow(namedtuple("SharedMemoryWindow", "region offset byte_size view")):
    """Where a requested output goes: the region, offset and byte size the
    client named, and the writable view of them resolved when the request
    was decoded (so a region unregistered meanwhile stays mapped)."""


def _shm_parameters(tensor, what):
    """(region, offset, byte_size) of a tensor's shared-memory parameters,
    or None; INVALID_ARGUMENT for Triton's malformed combinations."""
    parameters = tensor.parameters
    if not parameters or (SHM_REGION not in parameters and SHM_OFFSET not in parameters
                          and SHM_BYTE_SIZE not in parameters):
        return None
    name = brief(tensor.name)
    if SHM_REGION not in parameters:
        raise invalid_argument("'%s' and '%s' can not be given without '%s' for %s '%s'"
                               % (SHM_OFFSET, SHM_BYTE_SIZE, SHM_REGION, what, name))
    values = {}
    for key, choice in ((SHM_REGION, "string_param"), (SHM_OFFSET, "int64_param"),
                        (SHM_BYTE_SIZE, "int64_param")):
        if key in parameters:
            parameter = parameters[key]
            if parameter.WhichOneof("parameter_choice") != choice:
                raise invalid_argument("invalid value type for '%s' parameter for %s '%s', expected %s"
                                       % (key, what, name, choice))
            values[key] = getattr(parameter, choice)
    if SHM_BYTE_SIZE not in values:
        raise invalid_argument("'%s' must be given along with '%s' for %s '%s'"
                               % (SHM_BYTE_SIZE, SHM_REGION, what, name))
    return values[SHM_REGION], values.get(SHM_OFFSET, 0), values[SHM_BYTE_SIZE]


def _class_count(output):
    """The ``classification`` count a requested output asks for, or 0."""
    parameter = output.parameters.get(CLASSIFICATION) if output.parameters else None
    if parameter is None:
        return 0
    if parameter.WhichOneof("parameter_choice") != "int64_param":
        raise invalid_argument("invalid value type for 'classification' parameter of output '%s', "
                               "expected int64_param" % brief(output.name))
    if parameter.int64_param <= 0:
        raise invalid_argument("invalid value %d for 'classification' parameter of output '%s', "
                               "expected > 0" % (parameter.int64_param, brief(output.name)))
    return parameter.int64_param


def _no_table(name, what):
    return invalid_argument("%s '%s' names a shared memory region, but this worker has no "
                            "shared-memory table" % (what, brief(name)))


def _set_parameter(target, value):
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


class InferInput:
    """One input tensor of a request."""

    __slots__ = ("name", "datatype", "shape", "parameters", "_array")

    def __init__(self, name, datatype, shape, parameters, array):
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.parameters = parameters
        self._array = array

    def as_numpy(self):
        """The tensor as a numpy array (read-only when it views raw bytes)."""
        return self._array

    def __repr__(self):
        return "<InferInput %s %s %s>" % (self.name, self.datatype, list(self.shape))


class InferRequest:
    """What a handler receives: id, parameters, inputs by name."""

    def __init__(self, model_name, model_version, id, parameters, inputs, requested_outputs,
                 shared_memory_outputs=None, class_counts=None):
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.parameters = parameters
        self.inputs = inputs
        self.requested_outputs = requested_outputs
        #: Output name -> SharedMemoryWindow it is written into.
        self.shared_memory_outputs = shared_memory_outputs or {}
        #: Output name -> how many classes the client asked for instead of it.
        self.class_counts = class_counts or {}

    def __getitem__(self, name):
        """``request["a"]`` is ``request.inputs["a"].as_numpy()``."""
        try:
            return self.inputs[name].as_numpy()
        except KeyError:
            raise invalid_argument("request has no input '%s'" % brief(name)) from None


class InferResponse:
    """A handler's result with parameters; plain dicts of arrays also work."""

    def __init__(self, outputs, parameters=None):
        self.outputs = outputs
        self.parameters = parameters or {}


class Model:
    """A registered handler and its specs; turns request bytes into response bytes."""

    def __init__(self, handler, name, version="", inputs=None, outputs=None,
                 platform="python", asynchronous=None, labels=None, max_batch_size=0,
                 preferred_batch_sizes=None, max_queue_delay_ms=0):
        self.handler = handler
        self.name = name
        self.version = version or ""
        #: Its handler's tracebacks, at most one a second.
        self.failures = FailureLog()
        #: Largest batch (rows) the handler takes; 0: it does not batch
        #: (Triton's meaning).  See :mod:`anyserve_tw.worker.batching`.
        self.max_batch_size, self.preferred_batch_sizes, self.max_queue_delay_us = _batching(
            name, max_batch_size, preferred_batch_sizes, max_queue_delay_ms)
        # A batching model's declared shapes leave out the batch dimension,
        # as Triton's do; on the wire (and in ModelMetadata) it comes first.
        batch = (-1,) if self.max_batch_size else ()
        self.inputs = ([_batched(as_spec(s), batch) for s in inputs]
                       if inputs is not None else None)
        self.outputs = ([_batched(as_spec(s), batch) for s in outputs]
                        if outputs is not None else None)
        # By name, for checking each request and result (None: anything goes).
        self._input_specs = {s.name: s for s in self.inputs} if inputs is not None else None
        self._output_specs = {s.name: s for s in self.outputs} if outputs is not None else None
        # Output name -> (dimensions, ((index, size) of each fixed one)): a
        # result's shape checked in a few steps, the spec's loop kept for requests.
        self._output_shapes = {s.name: (len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if d >= 0))
                               for s in self.outputs or ()}
        self.platform = platform
        #: Runs on the event loop: ``async def``, or declared so.
        self.asynchronous = (inspect.iscoroutinefunction(handler) if asynchronous is None
                             else bool(asynchronous))
        #: A plain handler not declared either way: the worker may run it on
        #: the loop while it stays fast (``asynchronous=False`` forbids that).
        self.may_run_inline = asynchronous is None and not self.asynchronous
        #: Triton's "decoupled" models: a generator (or async generator)
        #: handler yields any number of responses per request, which only
        #: ModelStreamInfer can carry.
        self.decoupled = inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler)
        if self.decoupled and self.max_batch_size:
            raise ValueError("model %s streams its responses (a generator handler), so it can't "
                             "batch: leave max_batch_size at 0" % name)
        #: Output name -> class labels by index, for classification results.
        self.labels = _labels(labels, self._output_specs)

    @property
    def key(self):
        return self.name, self.version

    # -- request -------------------------------------------------------------

    def decode(self, payload, shared_memory=None):
        """Validate request bytes, or the ParsedRequest routing already made
        of them, into an InferRequest; INVALID_ARGUMENT on any problem.

        ``shared_memory`` (a :class:`~anyserve_tw.worker.sharedmemory.SharedMemoryTable`
        or a view of one) resolves the regions inputs and outputs name.
        """
        parsed = parse_request(payload)
        message, raw = parsed.message, parsed.raw
        in_shm = [_shm_parameters(t, "input") for t in message.inputs]
        shm_count = len(in_shm) - in_shm.count(None)
        # tritonclient (and Triton) send raw contents only for the inputs not
        # in shared memory; one entry per input (empty ones for those in
        # shared memory) is taken as well.
        aligned = len(raw) == len(message.inputs)
        if raw and not aligned and len(raw) != len(message.inputs) - shm_count:
            if shm_count:
                raise invalid_argument(
                    "%d raw_input_contents for %d inputs, %d of them in shared memory"
                    % (len(raw), len(message.inputs), shm_count))
            raise invalid_argument(
                "%d raw_input_contents for %d inputs" % (len(raw), len(message.inputs))
            )
        specs = self._input_specs
        inputs = {}
        raw_index = 0
        for index, tensor in enumerate(message.inputs):
            name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
            if name in inputs:
                raise invalid_argument("input '%s' given twice" % brief(name))
            if datatype not in tensors.DATATYPES:
                raise invalid_argument("input '%s': unknown datatype '%s'" % (brief(name), brief(datatype)))
            if specs is not None:
                spec = specs.get(name)
                if spec is None:
                    raise invalid_argument(
                        "unexpected input '%s' for model '%s' (expects %s)"
                        % (brief(name), self.name, ", ".join(sorted(specs)))
                    )
                if datatype != spec.datatype:
                    raise invalid_argument(
                        "input '%s': datatype %s, model '%s' expects %s"
                        % (name, datatype, self.name, spec.datatype)
                    )
                if not spec.accepts_shape(shape):
                    raise invalid_argument(
                        "input '%s': shape %s, model '%s' expects %s"
                        % (name, shape_text(shape), self.name, list(spec.shape))
                    )
            shm = in_shm[index]
            if shm is not None:
                if aligned and raw and len(raw[index]):
                    raise invalid_argument(
                        "input '%s' is in shared memory and has raw_input_contents too" % brief(name))
                if tensor.HasField("contents"):
                    raise invalid_argument(
                        "unexpected 'contents' given for input '%s' of model '%s', which is "
                        "in shared memory" % (brief(name), self.name))
                array = self._from_shared_memory(shared_memory, tensor, shape, shm)
            elif raw:
                array = tensors.from_raw(datatype, shape, raw[index if aligned else raw_index])
                raw_index += 1
            else:
                array = tensors.from_contents(datatype, shape, tensor.contents)
            inputs[name] = InferInput(name, datatype, shape, _parameters(tensor.parameters), array)
        if specs is not None:
            missing = [n for n in specs if n not in inputs]
            if missing:
                raise invalid_argument(
                    "model '%s' is missing input(s): %s" % (self.name, ", ".join(missing))
                )
        requested = [o.name for o in message.outputs]
        if requested and self._output_specs is not None:
            unknown = [n for n in requested if n not in self._output_specs]
            if unknown:
                raise invalid_argument(
                    "model '%s' has no output(s): %s" % (self.name, brief(", ".join(unknown)))
                )
        windows = {}
        class_counts = {}
        for output in message.outputs:
            if not output.parameters:
                continue
            shm = _shm_parameters(output, "output")
            count = _class_count(output)
            if shm is not None and count:
                raise invalid_argument(
                    "output '%s' can't set both 'shared_memory_region' and 'classification'"
                    % brief(output.name))
            if shm is not None:
                if shared_memory is None:
                    raise _no_table(output.name, "output")
                region, offset, byte_size = shm
                windows[output.name] = SharedMemoryWindow(
                    region, offset, byte_size, shared_memory.window(region, offset, byte_size))
            elif count:
                spec = (self._output_specs or {}).get(output.name)
                if spec is not None:
                    _check_classifiable(output.name, spec.datatype)
                class_counts[output.name] = count
        return InferRequest(
            message.model_name, message.model_version, message.id,
            _parameters(message.parameters), inputs, requested, windows, class_counts,
        )

    def _from_shared_memory(self, shared_memory, tensor, shape, shm):
        """An input's array, viewing the region it is in (BYTES: decoded)."""
        name, datatype = tensor.name, tensor.datatype
        if shared_memory is None:
            raise _no_table(name, "input")
        region, offset, byte_size = shm
        view = shared_memory.read(region, offset, byte_size)
        if datatype != "BYTES":
            expected = tensors.element_count(shape) * tensors.DATATYPES[datatype].itemsize
            if byte_size != expected:
                raise invalid_argument(
                    "input byte size mismatch for input '%s' for model '%s'. Expected %d, got %d"
                    % (brief(name), self.name, expected, byte_size))
        return tensors.from_raw(datatype, shape, view)

    # -- handler ---------------------------------------------------------------

    def call(self, request):
        """The handler's result; what it raises, other than InferenceError,
        becomes INTERNAL naming this model, its traceback logged."""
        try:
            return self.handler(request)
        except InferenceError:
            raise
        except Exception as e:
            self.failures.failure(self.name)
            raise handler_error(self, e) from e

    def respond(self, request, result):
        """The response to a result, as :meth:`encode_parts`; a result that
        cannot be encoded is the handler's error, so INTERNAL too."""
        try:
            return self.encode_parts(request, result)
        except InferenceError:
            raise
        except Exception as e:
            self.failures.failure(self.name, what="returned a result that can't be sent")
            raise handler_error(self, e) from e

    def serve(self, payload, shared_memory=None):
        """Request bytes (or a ParsedRequest) in, response parts out."""
        request = self.decode(payload, shared_memory)
        return self.respond(request, self.call(request))

    # -- response -------------------------------------------------------------

    def _named_outputs(self, result):
        """Normalise a handler result to (parameters, [(name, value)])."""
        parameters = {}
        if isinstance(result, InferResponse):
            parameters = result.parameters
            result = result.outputs
        if isinstance(result, dict):
            return parameters, list(result.items())
        if isinstance(result, (list, tuple)) and result and all(
            isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in result
        ):
            return parameters, list(result)
        if self.outputs is not None and len(self.outputs) == 1:
            return parameters, [(self.outputs[0].name, result)]
        raise TypeError(
            "handler of '%s' returned %s; return a dict of output name -> array"
            % (self.name, type(result).__name__)
        )

    def encode(self, request, result):
        """Response bytes for a handler result, honouring requested outputs."""
        return b"".join(self.encode_parts(request, result))

    def encode_parts(self, request, result):
        """The response as a list of bytes-like parts, output tensors not
        copied: the frame sender writes them as they are."""
        parameters, outputs = self._named_outputs(result)
        specs = self._output_specs or {}
        output_shapes = self._output_shapes
        if request.requested_outputs:
            produced = dict(outputs)
            missing = [n for n in request.requested_outputs if n not in produced]
            if missing:
                # With declared outputs the names were checked in decode(), so
                # the handler broke its contract; without, the client asked wrong.
                code = grpc.StatusCode.INTERNAL if specs else grpc.StatusCode.INVALID_ARGUMENT
                raise InferenceError(
                    code, "model '%s' produced no output(s): %s" % (self.name, ", ".join(missing))
                )
            outputs = [(n, produced[n]) for n in request.requested_outputs]
        response = _v2.ModelInferResponse(
            model_name=self.name, model_version=self.version, id=request.id
        )
        for key, value in parameters.items():
            _set_parameter(response.parameters[key], value)
        buffers = []
        windows = request.shared_memory_outputs
        class_counts = request.class_counts
        for name, value in outputs:
            spec = specs.get(name)
            if spec is not None:
                datatype = spec.datatype
                # An array already of the declared dtype goes as it is.
                if type(value) is np.ndarray and value.dtype is tensors.DATATYPES[datatype]:
                    array = value
                else:
                    array = self._as_declared(name, datatype, value)
                ndim, fixed = output_shapes[name]
                shape = array.shape
                if len(shape) != ndim or fixed and any(shape[i] != d for i, d in fixed):
                    raise InferenceError(
                        grpc.StatusCode.INTERNAL,
                        "model '%s' returned output '%s' with shape %s, but it is declared %s"
                        % (self.name, name, shape_text(shape), list(spec.shape)))
            else:
                array = np.asarray(value)
                datatype = tensors.datatype_of(array)
            if class_counts and name in class_counts:
                array = self.classify(name, datatype, array, class_counts[name])
                datatype = "BYTES"
            tensor = response.outputs.add()
            tensor.name = name
            tensor.datatype = datatype
            tensor.shape.extend(array.shape)
            buffer = tensors.to_buffer(datatype, array)
            if windows and name in windows:
                _write_output(name, windows[name], buffer, tensor)
                buffer = b""  # an empty entry keeps the others' positions
            buffers.append(buffer)
        return protowire.raw_output_parts(response.SerializeToString(), buffers)

    def _as_declared(self, name, datatype, value):
        """A handler's output as its declared datatype; INTERNAL naming it
        if that would change its values (see :func:`tensors.as_datatype`)."""
        try:
            return tensors.as_datatype(value, datatype)
        except tensors.LossyCast as e:
            raise InferenceError(
                grpc.StatusCode.INTERNAL,
                "model '%s': output '%s' is declared %s, but the handler returned %s"
                % (self.name, name, datatype, e)) from None

    def classify(self, name, datatype, array, count):
        """Triton's classification of output ``name``: the ``count`` largest
        values as "value:index[:label]" strings, per batch entry when the
        model batches (shape [batch, k]), else over the whole tensor ([k]).
        Equal values come lowest index first."""
        _check_classifiable(name, datatype)
        batched = self.max_batch_size > 0 and array.ndim > 0
        rows = array.reshape(array.shape[0] if batched else 1, -1)
        size = rows.shape[1]
        if size > MAX_CLASSIFIED:
            raise invalid_argument("output '%s' has %d elements to classify, more than %d"
                                   % (name, size, MAX_CLASSIFIED))
        k = min(count, size)
        labels = self.labels.get(name, ())
        number = "%f" if rows.dtype.kind == "f" else "%d"
        result = np.empty((rows.shape[0], k), dtype=object)
        for r, row in enumerate(rows):
            # Descending, equal values by ascending index: a stable sort of
            # the reversed row, read backwards.
            order = size - 1 - np.argsort(row[::-1], kind="stable")[::-1][:k]
            for c, index in enumerate(order.tolist()):
                text = (number % row[index]) + ":%d" % index
                if index < len(labels):
                    text += ":" + labels[index]
                result[r, c] = text.encode("utf-8")
        return result if batched else result.reshape(k)


def _batching(name, max_batch_size, preferred_batch_sizes, max_queue_delay_ms):
    """The batching settings checked as Triton checks them: (max_batch_size,
    preferred sizes as a sorted tuple, queue delay in whole microseconds)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ValueError("model %s: max_batch_size must be an int >= 0, not %r" % (name, max_batch_size))
    preferred = list(preferred_batch_sizes or ())
    if preferred and not max_batch_size:
        raise ValueError("model %s: preferred_batch_sizes need max_batch_size > 0" % name)
    for size in preferred:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= max_batch_size:
            raise ValueError("model %s: preferred batch size %r is not within 1..max_batch_size (%d)"
                             % (name, size, max_batch_size))
    if not max_queue_delay_ms >= 0:  # also refuses NaN
        raise ValueError("model %s: max_queue_delay_ms must be >= 0, not %r" % (name, max_queue_delay_ms))
    if max_queue_delay_ms and not max_batch_size:
        raise ValueError("model %s: max_queue_delay_ms needs max_batch_size > 0" % name)
    return max_batch_size, tuple(sorted(set(preferred))), int(round(max_queue_delay_ms * 1000))


def _batched(spec, batch):
    """``spec`` with the batch dimension (``batch``: () or (-1,)) in front."""
    return spec._replace(shape=batch + spec.shape) if batch else spec


def _check_classifiable(name, datatype):
    if datatype in ("BYTES", "BOOL"):
        raise invalid_argument(
            "class result not available for output '%s' due to unsupported type '%s'"
            % (name, datatype))


def _labels(labels, output_specs):
    """``labels`` checked: output name -> tuple of label strings."""
    if not labels:
        return {}
    if not isinstance(labels, dict):
        raise TypeError("labels must be a dict of output name -> list of labels")
    checked = {}
    for name, values in labels.items():
        if output_specs is not None and name not in output_specs:
            raise ValueError("labels given for '%s', which is not a declared output" % name)
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise TypeError("labels of output '%s' must be a list of strings" % name)
        checked[name] = tuple(values)
    return checked


def _write_output(name, window, buffer, tensor):
    """Copy an output into its shared-memory window and say so in the
    response, as Triton does: same parameters, no bytes of its own."""
    size = memoryview(buffer).nbytes
    if size > window.byte_size:
        raise InferenceError(
            grpc.StatusCode.INTERNAL,
            "shared memory size specified with the request for output '%s' (%d bytes) should be "
            "at least %d bytes to hold the results" % (name, window.byte_size, size))
    write_parts(window.view, [buffer])
    tensor.parameters[SHM_REGION].string_param = window.region
    tensor.parameters[SHM_BYTE_SIZE].int64_param = window.byte_size
    if window.offset:
        tensor.parameters[SHM_OFFSET].int64_param = window.offset


def handler_error(model, exception):
    """INTERNAL carrying what the handler raised."""
    return InferenceError(
        grpc.StatusCode.INTERNAL,
        "model '%s' failed: %s: %s" % (model.name, type(exception).__name__, exception),
    )

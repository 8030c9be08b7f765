"""What a worker knows of one model: its handler, its tensor specs, and how a
request's bytes become handler arguments and the handler's result becomes
response bytes."""
import inspect
from collections import namedtuple

import grpc
import numpy as np

from anyserve_tw.wire import protos, protowire
from anyserve_tw.wire.errors import InferenceError, invalid_argument
from anyserve_tw.worker import tensors
from anyserve_tw.worker.parsing import parse_request

_v2 = protos.inference


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

    def __init__(self, model_name, model_version, id, parameters, inputs, requested_outputs):
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.parameters = parameters
        self.inputs = inputs
        self.requested_outputs = requested_outputs

    def __getitem__(self, name):
        """``request["a"]`` is ``request.inputs["a"].as_numpy()``."""
        try:
            return self.inputs[name].as_numpy()
        except KeyError:
            raise invalid_argument("request has no input '%s'" % name) from None


class InferResponse:
    """A handler's result with parameters; plain dicts of arrays also work."""

    def __init__(self, outputs, parameters=None):
        self.outputs = outputs
        self.parameters = parameters or {}


class Model:
    """A registered handler and its specs; turns request bytes into response bytes."""

    def __init__(self, handler, name, version="", inputs=None, outputs=None,
                 platform="python", asynchronous=None):
        self.handler = handler
        self.name = name
        self.version = version or ""
        self.inputs = [as_spec(s) for s in inputs] if inputs is not None else None
        self.outputs = [as_spec(s) for s in outputs] if outputs is not None else None
        # By name, for checking each request and result (None: anything goes).
        self._input_specs = {s.name: s for s in self.inputs} if inputs is not None else None
        self._output_specs = {s.name: s for s in self.outputs} if outputs is not None else None
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
        #: Largest batch the handler takes (0: it does not batch, Triton's meaning).
        self.max_batch_size = 0

    @property
    def key(self):
        return self.name, self.version

    # -- request -------------------------------------------------------------

    def decode(self, payload):
        """Validate request bytes, or the ParsedRequest routing already made
        of them, into an InferRequest; INVALID_ARGUMENT on any problem."""
        parsed = parse_request(payload)
        message, raw = parsed.message, parsed.raw
        if raw and len(raw) != len(message.inputs):
            raise invalid_argument(
                "%d raw_input_contents for %d inputs" % (len(raw), len(message.inputs))
            )
        specs = self._input_specs
        inputs = {}
        for index, tensor in enumerate(message.inputs):
            name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
            if name in inputs:
                raise invalid_argument("input '%s' given twice" % name)
            if datatype not in tensors.DATATYPES:
                raise invalid_argument("input '%s': unknown datatype '%s'" % (name, datatype))
            if specs is not None:
                spec = specs.get(name)
                if spec is None:
                    raise invalid_argument(
                        "unexpected input '%s' for model '%s' (expects %s)"
                        % (name, self.name, ", ".join(sorted(specs)))
                    )
                if datatype != spec.datatype:
                    raise invalid_argument(
                        "input '%s': datatype %s, model '%s' expects %s"
                        % (name, datatype, self.name, spec.datatype)
                    )
                if not spec.accepts_shape(shape):
                    raise invalid_argument(
                        "input '%s': shape %s, model '%s' expects %s"
                        % (name, list(shape), self.name, list(spec.shape))
                    )
            if raw:
                array = tensors.from_raw(datatype, shape, raw[index])
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
                    "model '%s' has no output(s): %s" % (self.name, ", ".join(unknown))
                )
        return InferRequest(
            message.model_name, message.model_version, message.id,
            _parameters(message.parameters), inputs, requested,
        )

    # -- handler ---------------------------------------------------------------

    def call(self, request):
        """The handler's result; what it raises, other than InferenceError,
        becomes INTERNAL naming this model."""
        try:
            return self.handler(request)
        except InferenceError:
            raise
        except Exception as e:
            raise handler_error(self, e) from e

    def respond(self, request, result):
        """The response to a result, as :meth:`encode_parts`; a result that
        cannot be encoded is the handler's error, so INTERNAL too."""
        try:
            return self.encode_parts(request, result)
        except InferenceError:
            raise
        except Exception as e:
            raise handler_error(self, e) from e

    def serve(self, payload):
        """Request bytes (or a ParsedRequest) in, response parts out."""
        request = self.decode(payload)
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
        for name, value in outputs:
            spec = specs.get(name)
            if spec is not None:
                datatype = spec.datatype
                array = np.asarray(value, dtype=tensors.DATATYPES[datatype])
            else:
                array = np.asarray(value)
                datatype = tensors.datatype_of(array)
            tensor = response.outputs.add()
            tensor.name = name
            tensor.datatype = datatype
            tensor.shape.extend(array.shape)
            buffers.append(tensors.to_buffer(datatype, array))
        return protowire.raw_output_parts(response.SerializeToString(), buffers)


def handler_error(model, exception):
    """INTERNAL carrying what the handler raised."""
    return InferenceError(
        grpc.StatusCode.INTERNAL,
        "model '%s' failed: %s: %s" % (model.name, type(exception).__name__, exception),
    )

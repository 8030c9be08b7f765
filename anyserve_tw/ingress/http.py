"""KServe v2 / Triton's HTTP/REST protocol, on Twisted Web.

The same :class:`~anyserve_tw.ingress.inference.InferenceAPI` the gRPC
fronts serve answers everything but inference: each endpoint builds the
protobuf request from the URL (and a small JSON body for repository and
shared-memory calls), calls the API and renders its answer as Triton's JSON.

Inference bodies are not parsed here: the JSON and any binary tensors after
it are forwarded to a worker as they came, in an HTTP_REQUEST frame
(:func:`anyserve_tw.wire.payloads.http_request_parts`), and the worker's
answer is the response body (:mod:`anyserve_tw.worker.restcodec` does both
conversions).  So the ingress does no per-tensor work for REST either, and
every worker feature (validation, shared memory, classification) applies
to it unchanged.

Statuses follow Triton's: ready endpoints answer 200 or 400 (not ready)
with an empty body; errors are ``{"error": "message"}`` with the status
Triton gives the error's code (INVALID_ARGUMENT, CANCELLED, ALREADY_EXISTS,
UNKNOWN 400; NOT_FOUND 404; UNAVAILABLE 503; UNIMPLEMENTED 501; INTERNAL
500).  Triton has no code for the rest; they get the usual gRPC-to-HTTP
statuses: RESOURCE_EXHAUSTED 429, DEADLINE_EXCEEDED 504 and so on.  A body
over ``max_message_size`` is 413 (it is read and dropped, never held);
compressed bodies (``Content-Encoding: gzip`` / ``deflate``, as tritonclient
sends them) are inflated up to that size; other encodings are 415.
Unknown paths are 404 and wrong methods 405 (with ``Allow``), both JSON.
"""
import base64
import json
import zlib

import grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from anyserve_tw.wire import defaults, framing, protos
from anyserve_tw.wire.errors import InferenceError, as_inference_error, invalid_argument
from anyserve_tw.wire.payloads import WHOLE_BODY, http_request_parts

_v2 = protos.inference

#: gRPC status -> HTTP status.  Triton's own mapping first, then the
#: conventional one (google.rpc.Code's) for codes Triton does not have.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.UNKNOWN: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: The header that splits an inference body into JSON and binary tensors.
HEADER_LENGTH = b"inference-header-content-length"

#: Twisted's read size, and the one a body over LARGE_BODY bytes is read with.
READ_SIZE = 64 * 1024
LARGE_BODY = 256 * 1024
LARGE_READ = 1024 * 1024

_JSON = b"application/json"
_BINARY = b"application/octet-stream"


def http_status(code):
    """The HTTP status for a ``grpc.StatusCode``."""
    return HTTP_STATUS.get(code, 500)


def _dumps(value):
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def error_body(message):
    return _dumps({"error": message})


# -- protobuf messages as Triton's JSON ------------------------------------------

def _repeated(field):
    try:
        return field.is_repeated
    except AttributeError:  # protobuf before 5.28
        return field.label == field.LABEL_REPEATED


def _scalar(field, value, unset_messages):
    if field.message_type is not None:
        return message_json(value, unset_messages)
    if field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if field.type == field.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def message_json(message, unset_messages=False):
    """A protobuf message as the dict Triton prints: field names as in the
    proto, 64-bit integers as JSON numbers (protobuf's own JSON quotes them),
    enums by name, fields at their default values included.  An unset
    message field is left out (as protobuf's JSON does), or printed as its
    empty message with ``unset_messages`` (Triton's statistics always show
    every duration); an unset ``oneof`` is always left out."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None:
            if message.WhichOneof(oneof.name) != field.name:
                continue
        elif (field.message_type is not None and not _repeated(field) and not unset_messages
              and not message.HasField(field.name)):
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _scalar(value_field, item, unset_messages) for key, item in value.items()}
        elif _repeated(field):
            out[field.name] = [_scalar(field, item, unset_messages) for item in value]
        else:
            out[field.name] = _scalar(field, value, unset_messages)
    return out


# -- requests and the site ---------------------------------------------------------

class _Body:
    """A request body kept as the chunks it arrived in and joined once, where
    Twisted's default spools any body over 100 kB to a temporary file.  Past
    ``limit`` bytes it keeps nothing and only counts."""

    __slots__ = ("chunks", "size", "position", "limit")

    def __init__(self, limit):
        self.chunks = []
        self.size = 0
        self.position = 0
        self.limit = limit

    @property
    def too_large(self):
        return self.size > self.limit

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            self.chunks = []
        else:
            self.chunks.append(data)
        self.position = self.size

    def getvalue(self):
        chunks = self.chunks
        if len(chunks) != 1:
            self.chunks = chunks = [b"".join(chunks)]
        return chunks[0]

    def tell(self):
        return self.position

    def seek(self, offset, whence=0):
        self.position = offset if whence == 0 else (self.position if whence == 1 else self.size) + offset
        return self.position

    def read(self, size=-1):
        data = self.getvalue()
        end = len(data) if size is None or size < 0 else self.position + size
        chunk = data[self.position:end]
        self.position += len(chunk)
        return chunk

    def close(self):
        self.chunks = []


class _Request(server.Request):
    """Bodies in memory up to the site's cap (413 past it, before routing);
    no form parsing, no default Content-Type; 503 for every request while
    the service drains."""

    _parsePOSTFormSubmission = False
    defaultContentType = None

    def gotLength(self, length):
        self.content = _Body(self.channel.site.max_body_size)
        if length is not None and length > self.content.limit:
            self.content.size = length  # too large already: keep nothing
        elif length is not None and length > LARGE_BODY:
            # Fewer, larger reads for a large body: each read is a trip round
            # the reactor and through the HTTP parser.
            transport = self.channel.transport
            if getattr(transport, "bufferSize", None) == READ_SIZE:
                transport.bufferSize = min(length, LARGE_READ)

    def handleContentChunk(self, data):
        if not self.content.too_large:
            self.content.write(data)

    def process(self):
        site = self.channel.site
        transport = self.channel.transport
        if getattr(transport, "bufferSize", READ_SIZE) != READ_SIZE:
            transport.bufferSize = READ_SIZE
        if self.content.too_large:
            self.site = site
            _reply(self, 413, error_body("request body exceeds the %d-byte limit" % self.content.limit))
            return
        if site.service.draining:
            self.site = site
            _reply(self, 503, error_body("server is shutting down"))
            return
        super().process()


class _Channel(http.HTTPChannel):
    """An HTTP connection the site can close when the service stops."""

    def connectionMade(self):
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.site.channel_lost(self)


class _Site(server.Site):
    """The REST site: no access log line per request (the router's
    ``--access-log`` records inferences), no tracebacks to clients."""

    protocol = _Channel
    noisy = False
    displayTracebacks = False

    def __init__(self, resource, service, max_body_size):
        super().__init__(resource, requestFactory=_Request)
        self.service = service
        self.max_body_size = max_body_size
        self.channels = set()
        self._closed = []  # Deferreds waiting for the last channel to go

    def log(self, request):
        pass

    def channel_lost(self, channel):
        self.channels.discard(channel)
        if not self.channels:
            closed, self._closed = self._closed, []
            for d in closed:
                if not d.called:  # else given up on (timed out)
                    d.callback(None)

    def close_channels(self):
        """Close every connection; a Deferred firing once they are closed."""
        if not self.channels:
            return succeed(None)
        d = Deferred()
        self._closed.append(d)
        for channel in list(self.channels):
            channel.transport.loseConnection()
        return d


def _reply(request, code, body=b"", content_type=_JSON, headers=()):
    """Answer ``request`` now, unless its client has gone."""
    if request.finished or request._disconnected:
        return
    request.setResponseCode(code)
    if body and content_type is not None:
        request.setHeader(b"content-type", content_type)
    for name, value in headers:
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % len(body))
    if body and request.method != b"HEAD":
        request.write(body)
    request.finish()


class HttpError(Exception):
    """A failure with an HTTP status of its own (413, 415) rather than a
    gRPC code's."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def _reply_failure(request, failure):
    if failure.check(HttpError):
        _reply(request, failure.value.status, error_body(failure.value.message))
    else:
        error = as_inference_error(failure)
        _reply(request, http_status(error.code), error_body(error.message))


# -- the resource tree ---------------------------------------------------------------

class _Node(Resource):
    """A path: its own methods (``{b"GET": handler(request)}``, each returning
    ``(status, body)``, ``(status, body, content_type, headers)`` or a
    Deferred of one), named children (nodes, or functions building one when
    a URL reaches it: a model's endpoints are built per request, and only the
    one asked for), and ``child(segment, request)`` for the segments the URL
    chooses (a model, a version, a region)."""

    def __init__(self, service, methods=None, child=None, **children):
        super().__init__()
        self.service = service
        self.methods = methods or {}
        self.child = child
        self.branches = {name.encode("ascii"): node for name, node in children.items()}

    def getChild(self, path, request):
        branch = self.branches.get(path)
        if branch is not None:
            return branch if isinstance(branch, Resource) else branch()
        if self.child is not None and path:
            try:
                name = path.decode("utf-8")
            except UnicodeDecodeError:
                return _NOT_FOUND
            node = self.child(name, request)
            if node is not None:
                return node
        return _NOT_FOUND

    def render(self, request):
        method = request.method
        handler = self.methods.get(b"GET" if method == b"HEAD" else method)
        if handler is None:
            if not self.methods:
                return _not_found(request)
            allowed = sorted(self.methods)
            if b"GET" in self.methods:
                allowed.append(b"HEAD")
            request.setHeader(b"allow", b", ".join(sorted(allowed)))
            request.setResponseCode(405)
            request.setHeader(b"content-type", _JSON)
            return error_body("method %s not allowed here (allowed: %s)"
                              % (method.decode("latin-1"), ", ".join(m.decode() for m in sorted(allowed))))
        return self.service.respond(request, handler)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request):
        return _not_found(request)


def _not_found(request):
    request.setResponseCode(404)
    request.setHeader(b"content-type", _JSON)
    return error_body("Not Found")


_NOT_FOUND = _NotFound()


def _ready(response):
    return (200 if response.ready else 400), b""


def _server_health(field):
    """Server liveness or readiness: 200 with ``{"live": true}`` (or
    ``ready``), as KServe answers (its REST client reads the body; Triton's
    sends none and tritonclient reads only the status), 400 when not."""
    def render(response):
        if getattr(response, field):
            return 200, _dumps({field: True})
        return 400, b""
    return render


def _as_json(response, unset_messages=False):
    return 200, _dumps(message_json(response, unset_messages))


def _request_json(request, required=False):
    """The small JSON object of a control request's body ({} for none)."""
    body = request.content.getvalue() if isinstance(request.content, _Body) else request.content.read()
    if not body.strip():
        if required:
            raise invalid_argument("request body must be a JSON object")
        return {}
    try:
        value = json.loads(body)
        # A lone surrogate escape ("\ud800") parses, but can't be encoded
        # into the protobuf strings and file names it is meant for.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError) as e:
        raise invalid_argument("malformed JSON request body: %s" % (e,)) from None
    if not isinstance(value, dict):
        raise invalid_argument("request body must be a JSON object")
    return value


INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


def _repository_parameters(target, parameters):
    """Load/unload ``parameters`` (a JSON object) into a map of
    ModelRepositoryParameter; ``file:`` ones are base64 (tritonclient's)."""
    if not isinstance(parameters, dict):
        raise invalid_argument("'parameters' must be a JSON object")
    for key, value in parameters.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise invalid_argument("parameter '%s' is out of the int64 range" % key)
            slot.int64_param = value
        elif isinstance(value, str) and key.startswith("file:"):
            try:
                slot.bytes_param = base64.b64decode(value, validate=True)
            except ValueError:
                raise invalid_argument("parameter '%s' is not base64" % key) from None
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise invalid_argument("parameter '%s' must be a boolean, integer or string" % key)


def _uint(body, key):
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise invalid_argument("'%s' must be a non-negative 64-bit integer" % key)
    return value


class HttpService(Service):
    """Serves the REST protocol on ``host:port`` (0: any free port, see
    ``bound_port``), with ``metrics_resource`` at ``/metrics`` if given.

    ``router``: the :class:`~anyserve_tw.ingress.router.Router` inferences go
    through; ``api``: the InferenceAPI answering the rest.  Stopping stops
    listening, answers 503 to new requests, lets those in flight finish
    within ``grace`` seconds, then closes every connection.
    """

    log = Logger()

    def __init__(self, reactor, host, port, router, api, metrics_resource=None,
                 max_message_size=defaults.MAX_MESSAGE_SIZE, grace=10.0, tls_options=None):
        self.reactor = reactor
        #: An IOpenSSLServerConnectionCreator to serve HTTPS, or None.
        self.tls_options = tls_options
        self.host = host
        self.port = port
        self.router = router
        self.api = api
        self.max_message_size = max_message_size
        self.grace = grace
        self.draining = False
        self.bound_port = None
        self.site = _Site(self._resource(metrics_resource), self, max_message_size)
        self._listening = None
        self._inflight = 0
        self._idle = []  # Deferreds waiting for _inflight == 0

    # -- service ----------------------------------------------------------------

    def startService(self):
        host = self.host.strip("[]")  # "[::]", as gRPC writes it, is "::"
        endpoint_class = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        endpoint = endpoint_class(self.reactor, self.port, interface=host)
        factory = self.site
        if self.tls_options is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory  # pyOpenSSL: only when asked for

            factory = TLSMemoryBIOFactory(self.tls_options, False, self.site)
        outcome = []
        endpoint.listen(factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("http: listening on %s:%d did not complete at once" % (self.host, self.port))
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()  # a busy port stops twistd now
        self._listening = outcome[0]
        self.bound_port = self._listening.getHost().port
        self.draining = False
        super().startService()
        self.log.info("KServe v2 REST listening on {host}:{port}{tls}", host=self.host, port=self.bound_port,
                      tls=" (TLS)" if self.tls_options is not None else "")

    def stopService(self):
        super().stopService()
        self.draining = True
        stopped = succeed(None)
        if self._listening is not None:
            stopped = self._listening.stopListening() or stopped
            self._listening = None

        def drained(_):
            if not self._inflight:
                return True
            self.log.info("REST draining {count} request(s) (grace {grace}s)",
                          count=self._inflight, grace=self.grace)
            d = Deferred()
            self._idle.append(d)
            return d.addTimeout(self.grace, self.reactor, onTimeoutCancel=lambda _r, _t: False)

        def close(_):
            return self.site.close_channels().addTimeout(self.grace, self.reactor).addErrback(
                lambda f: self.log.warn("REST connections still open after {grace}s", grace=self.grace))

        return stopped.addCallback(drained).addCallback(close)

    # -- answering ----------------------------------------------------------------

    def respond(self, request, handler):
        """Run an endpoint's handler and answer with what it gives; a Deferred
        is bounded by nothing here (the handler does that) and cancelled when
        the client goes away."""
        try:
            result = handler(request)
        except Exception:
            _reply_failure(request, Failure())
            return server.NOT_DONE_YET
        if not isinstance(result, Deferred):
            _reply(request, *result)
            return server.NOT_DONE_YET
        self._inflight += 1
        request.notifyFinish().addErrback(lambda _: result.cancel())
        result.addCallbacks(lambda answer: _reply(request, *answer),
                            lambda failure: _reply_failure(request, failure))
        result.addErrback(lambda failure: self.log.failure("answering a REST request", failure))
        result.addBoth(self._done)
        return server.NOT_DONE_YET

    def _done(self, _):
        self._inflight -= 1
        if not self._inflight and self._idle:
            idle, self._idle = self._idle, []
            for d in idle:
                if not d.called:
                    d.callback(True)

    def call(self, method, message, render):
        """A handler calling ``api.<method>(message, timeout)`` and answering
        ``render(response)``; 501 while the API has no such method."""
        call = getattr(self.api, method, None)
        if call is None:
            raise InferenceError(grpc.StatusCode.UNIMPLEMENTED, "%s is not implemented by this server" % method)
        timeout = self.api.default_timeout(method)
        result = call(message, timeout)
        if isinstance(result, Deferred):
            if not result.called:
                result.addTimeout(timeout, self.reactor)
            return result.addCallback(render)
        return render(result)

    # -- inference ----------------------------------------------------------------

    def infer(self, request, name, version):
        """Forward the body to a worker of (name, version) as it is; answer
        with the worker's body (JSON, then any binary outputs)."""
        body = _decoded_body(request, self.max_message_size)
        json_length = request.getHeader(HEADER_LENGTH)
        if json_length is not None:
            try:
                json_length = int(json_length)
            except ValueError:
                raise invalid_argument("Inference-Header-Content-Length must be an integer") from None
            if not 0 <= json_length <= len(body) or json_length >= WHOLE_BODY:
                raise invalid_argument(
                    "Inference-Header-Content-Length %d is not within the body's %d bytes"
                    % (json_length, len(body)))
        timeout = self.api.default_timeout("ModelInfer")
        d = self.router.infer(name, version, http_request_parts(name, version, body, json_length),
                              timeout, kind=framing.HTTP_REQUEST)
        if not d.called:  # an unknown model fails at once: no timer for it
            d.addTimeout(timeout, self.reactor)
        return d.addCallback(_infer_answer)

    # -- the tree -------------------------------------------------------------------

    def _resource(self, metrics_resource):
        node = lambda **kw: _Node(self, **kw)  # noqa: E731
        call = self.call
        v2 = node(
            methods={b"GET": lambda r: call("ServerMetadata", _v2.ServerMetadataRequest(), _as_json)},
            health=node(
                live=node(methods={b"GET": lambda r: call(
                    "ServerLive", _v2.ServerLiveRequest(), _server_health("live"))}),
                ready=node(methods={b"GET": lambda r: call(
                    "ServerReady", _v2.ServerReadyRequest(), _server_health("ready"))}),
            ),
            models=node(child=self._models_child),
            repository=self._repository_node(),
            systemsharedmemory=self._shm_node("System"),
            cudasharedmemory=self._shm_node("Cuda"),
        )
        root = node(v2=v2)
        if metrics_resource is not None:
            root.putChild(b"metrics", metrics_resource)
        return root

    def _models_child(self, name, request):
        if name == "stats" and not request.postpath:
            return _Node(self, methods={b"GET": lambda r: self.call(
                "ModelStatistics", _v2.ModelStatisticsRequest(), lambda m: _as_json(m, True))})
        return self._model_node(name, "", versions=lambda: _Node(
            self, child=lambda version, _r: self._model_node(name, version)))

    def _model_node(self, name, version, **children):
        call = self.call

        def endpoint(method, handler):
            return lambda: _Node(self, methods={method: handler})

        return _Node(
            self,
            methods={b"GET": lambda r: call("ModelMetadata", _v2.ModelMetadataRequest(name=name, version=version),
                                            _as_json)},
            infer=endpoint(b"POST", lambda r: self.infer(r, name, version)),
            ready=endpoint(b"GET", lambda r: call(
                "ModelReady", _v2.ModelReadyRequest(name=name, version=version), _ready)),
            config=endpoint(b"GET", lambda r: call(
                "ModelConfig", _v2.ModelConfigRequest(name=name, version=version),
                lambda m: (200, _dumps(message_json(m.config))))),
            stats=endpoint(b"GET", lambda r: call(
                "ModelStatistics", _v2.ModelStatisticsRequest(name=name, version=version),
                lambda m: _as_json(m, True))),
            **children,
        )

    def _repository_node(self, repository=""):
        call = self.call

        def index(request):
            ready = _request_json(request).get("ready", False)
            if not isinstance(ready, bool):
                raise invalid_argument("'ready' must be a boolean")
            return call("RepositoryIndex", _v2.RepositoryIndexRequest(repository_name=repository, ready=ready),
                        lambda m: (200, _dumps([message_json(model) for model in m.models])))

        def control(method, message_class):
            def handle(request, name):
                message = message_class(repository_name=repository, model_name=name)
                _repository_parameters(message.parameters, _request_json(request).get("parameters", {}))
                return call(method, message, lambda _: (200, b""))
            return handle

        load = control("RepositoryModelLoad", _v2.RepositoryModelLoadRequest)
        unload = control("RepositoryModelUnload", _v2.RepositoryModelUnloadRequest)
        models = _Node(self, child=lambda name, _r: _Node(
            self,
            load=_Node(self, methods={b"POST": lambda r: load(r, name)}),
            unload=_Node(self, methods={b"POST": lambda r: unload(r, name)}),
        ))
        named = (lambda name, _r: self._repository_node(name)) if not repository else None
        return _Node(self, child=named, index=_Node(self, methods={b"POST": index}), models=models)

    def _shm_node(self, kind):
        """``/v2/{system,cuda}sharedmemory[/region/NAME]/{status,register,unregister}``."""
        call = self.call
        prefix = kind + "SharedMemory"

        def status_json(response):
            regions = getattr(response, "regions", {})
            return 200, _dumps([message_json(regions[name]) for name in sorted(regions)])

        def register(request, name):
            body = _request_json(request, required=True)
            message = getattr(_v2, prefix + "RegisterRequest")(name=name)
            if kind == "System":
                key = body.get("key")
                if not isinstance(key, str):
                    raise invalid_argument("'key' must be a string")
                message.key = key
                message.offset = _uint(body, "offset")
                message.byte_size = _uint(body, "byte_size")
            return call(prefix + "Register", message, lambda _: (200, b""))

        def actions(name):
            children = {
                "status": _Node(self, methods={b"GET": lambda r: call(
                    prefix + "Status", getattr(_v2, prefix + "StatusRequest")(name=name), status_json)}),
                "unregister": _Node(self, methods={b"POST": lambda r: call(
                    prefix + "Unregister", getattr(_v2, prefix + "UnregisterRequest")(name=name),
                    lambda _: (200, b""))}),
            }
            if name:
                children["register"] = _Node(self, methods={b"POST": lambda r: register(r, name)})
            return children

        region = _Node(self, child=lambda name, _r: _Node(self, **actions(name)))
        return _Node(self, region=region, **actions(""))


def _infer_answer(answer):
    json_length, body = answer
    if json_length >= len(body):
        return 200, body, _JSON, ()
    return 200, body, _BINARY, ((b"inference-header-content-length", b"%d" % json_length),)


def _decoded_body(request, limit):
    """The request body, inflated when it came compressed (gzip or zlib's
    deflate, as tritonclient sends them); 413 past ``limit`` bytes."""
    body = request.content.getvalue()
    encoding = request.getHeader(b"content-encoding")
    if encoding is None:
        return body
    encoding = encoding.strip().lower()
    if encoding == b"identity":
        return body
    if encoding in (b"gzip", b"x-gzip"):
        attempts = (16 + zlib.MAX_WBITS,)
    elif encoding == b"deflate":
        attempts = (zlib.MAX_WBITS, -zlib.MAX_WBITS)  # zlib-wrapped as the RFC says, or raw
    else:
        raise HttpError(415, "unsupported Content-Encoding '%s' (gzip, deflate and identity are)"
                        % encoding.decode("latin-1"))
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise HttpError(413, "decompressed request body exceeds the %d-byte limit" % limit)
        if not inflater.eof or inflater.unused_data:
            raise invalid_argument("%s request body is truncated or has trailing bytes" % encoding.decode())
        return out
    raise invalid_argument("request body is not valid %s data" % encoding.decode())

"""gRPC method tables built from the descriptor pool, for servers and clients.

``protoc``'s ``_pb2_grpc`` modules would register their messages in protobuf's
default pool (see :mod:`anyserve_tw.wire.protos`), so handlers and stubs are built
here from the service descriptors instead: the same paths
(``/inference.GRPCInferenceService/ModelInfer``) and messages on the wire.
"""
import inspect

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError, invalid_argument


def channel_options(max_message_size):
    """Options shared by our servers and clients: the message caps both ways."""
    return [
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.max_send_message_length", max_message_size),
    ]


#: Beyond this many seconds a remaining time means "no deadline": grpcio
#: reports a client without one as ~9.2e18 seconds away.
NO_DEADLINE = 1e9


def time_left(context, default):
    """Seconds the RPC behind ``context`` may still take, or ``default`` when
    the client set no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE:
        return default
    return remaining


def listen(server, label, host, port, credentials=None):
    """Bind grpc ``server`` (sync or aio) to ``host:port``, with TLS when
    ``credentials`` (grpc.ServerCredentials) are given; the port bound.
    Raises at once when it can't, so a busy port stops the process."""
    address = "%s:%d" % (host, port)
    try:
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise RuntimeError("%s: cannot listen on %s" % (label, address))
    return bound


def method_names(service_name, api=None):
    """The RPC names of ``service_name``, in the order the proto declares them;
    with ``api``, only those it answers (gRPC answers the rest UNIMPLEMENTED)."""
    names = [method.name for method in protos.service_descriptor(service_name).methods]
    if api is not None:
        names = [name for name in names if hasattr(api, name)]
    return names


def service_methods(service_name):
    """(name, request class, response class) of each RPC of ``service_name``."""
    service = protos.service_descriptor(service_name)
    for method in service.methods:
        yield (
            method.name,
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        )


def streaming_methods(service_name):
    """Names of the bidirectional-streaming RPCs of ``service_name``."""
    return {m.name for m in protos.service_descriptor(service_name).methods
            if m.client_streaming and m.server_streaming}


def lenient_parser(request_class):
    """A deserializer that returns the error instead of raising it: grpc
    answers a raising deserializer UNKNOWN (grpc.aio) or INTERNAL (threads),
    where malformed request bytes are the client's INVALID_ARGUMENT."""
    def parse(data):
        try:
            return request_class.FromString(data)
        except DecodeError as e:
            return invalid_argument("malformed %s: %s" % (request_class.DESCRIPTOR.name, e))
    return parse


def _refusing_malformed(behavior):
    """``behavior``, aborting with the request's own error when it could
    not be parsed (see :func:`lenient_parser`); sync or coroutine, as given."""
    if inspect.iscoroutinefunction(behavior):
        async def checked(request, context):
            if type(request) is InferenceError:
                await context.abort(request.code, request.message)
            return await behavior(request, context)
    else:
        def checked(request, context):
            if type(request) is InferenceError:
                context.abort(request.code, request.message)
            return behavior(request, context)
    return checked


def generic_handler(service_name, servicer, raw_methods=()):
    """A ``grpc.GenericRpcHandler`` calling ``servicer.<Method>(request, context)``.

    Methods named in ``raw_methods`` take and return serialized bytes untouched:
    the ingress forwards ModelInfer without ever parsing it.  Unary requests
    that don't parse are INVALID_ARGUMENT.
    """
    handlers = {}
    streams = streaming_methods(service_name)
    for name, request_class, response_class in service_methods(service_name):
        if not hasattr(servicer, name):
            continue
        make = (grpc.stream_stream_rpc_method_handler if name in streams
                else grpc.unary_unary_rpc_method_handler)
        if name in raw_methods:
            handlers[name] = make(getattr(servicer, name))
        elif name in streams:
            handlers[name] = make(
                getattr(servicer, name),
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
        else:
            handlers[name] = make(
                _refusing_malformed(getattr(servicer, name)),
                request_deserializer=lenient_parser(request_class),
                response_serializer=response_class.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service_name, handlers)


class Stub:
    """A client for ``service_name`` on ``channel``: ``stub.Method(request, timeout=...)``."""

    def __init__(self, channel, service_name):
        streams = streaming_methods(service_name)
        for name, request_class, response_class in service_methods(service_name):
            setattr(
                self,
                name,
                (channel.stream_stream if name in streams else channel.unary_unary)(
                    "/%s/%s" % (service_name, name),
                    request_serializer=request_class.SerializeToString,
                    response_deserializer=response_class.FromString,
                ),
            )

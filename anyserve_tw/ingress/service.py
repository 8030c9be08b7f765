"""The ingress's service tree.

Started in this order:

1. ``router``: registry, worker connections, heartbeat eviction;
2. ``management``: the WorkerManagement gRPC server (loopback by default);
3. ``inference``: the KServe v2 gRPC server;
4. ``workers``: the supervised worker scripts, if any, last, so that a port
   that can't be bound stops twistd before any worker process exists.

Stopped one after another as inference, workers, management, router: on
SIGTERM the inference server first stops taking RPCs and drains the ones in
flight (the router still forwards them), then the workers are stopped (they
unregister through the still-running management server), then the rest.

Both gRPC servers are fronts (:class:`~anyserve_tw.ingress.interfaces.IGrpcFront`):
``front="aio"`` serves them with grpc.aio on the asyncio loop the reactor
runs on (so the reactor must be asyncio's); ``front="threads"`` from grpcio
thread pools bridged into the reactor.
"""
from anyserve_tw import __version__
from anyserve_tw.ingress.inference import InferenceAPI
from anyserve_tw.ingress.interfaces import FRONTS
from anyserve_tw.ingress.management import ManagementAPI
from anyserve_tw.ingress.router import Router
from anyserve_tw.ingress.supervisor import WorkerSupervisor
from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.wire import defaults, rpc


def _front_factory(reactor, front):
    """A function building one front service from (label, host, port, api, ...)."""
    if front == "aio":
        from anyserve_tw.ingress.aiofront import AioGrpcService, RequestTimeouts, aio_servicer

        # The reactor's own loop: the current loop may be another.
        loop = reactor._asyncioEventloop

        def build(label, host, port, api, threads, **settings):
            timeouts = RequestTimeouts(reactor)
            handler = rpc.generic_handler(api.service_name, aio_servicer(api, timeouts), api.raw_methods)
            return AioGrpcService(loop, label, host, port, [handler], timeouts, **settings)
    elif front == "threads":
        from anyserve_tw.ingress.bridge import ReactorBridge
        from anyserve_tw.ingress.threadfront import GrpcServerService, threaded_servicer

        bridge = ReactorBridge(reactor)

        def build(label, host, port, api, threads, **settings):
            handler = rpc.generic_handler(api.service_name, threaded_servicer(api, bridge), api.raw_methods)
            return GrpcServerService(reactor, label, host, port, [handler], threads=threads, **settings)
    else:
        raise ValueError("unknown front %r (expected one of %s)" % (front, ", ".join(FRONTS)))
    return build


def make_ingress_service(reactor, port=8000, host="0.0.0.0", mgmt_port=9000,
                         mgmt_host="127.0.0.1", worker_scripts=(), copies=1, pool_size=2,
                         heartbeat_timeout=6.0, grace=10.0,
                         max_message_size=defaults.MAX_MESSAGE_SIZE, threads=defaults.DEFAULT_FRONT_THREADS,
                         max_concurrent_rpcs=defaults.DEFAULT_MAX_CONCURRENT_RPCS, request_timeout=600.0,
                         socket_dir=None, front="aio"):
    build = _front_factory(reactor, front)
    top = SequentialMultiService(stop_order=["inference", "workers", "management", "router"])
    router = Router(reactor, pool_size=pool_size, heartbeat_timeout=heartbeat_timeout,
                    max_payload=max_message_size)
    router.setName("router")
    router.setServiceParent(top)

    management = build("management", mgmt_host, mgmt_port, ManagementAPI(router), threads=8,
                       max_message_size=defaults.MAX_MANAGEMENT_MESSAGE_SIZE, grace=1.0)
    management.setName("management")
    management.setServiceParent(top)

    inference = build("inference", host, port, InferenceAPI(router, request_timeout, __version__),
                      threads=threads, max_message_size=max_message_size,
                      max_concurrent_rpcs=max_concurrent_rpcs, grace=grace)
    inference.setName("inference")
    inference.setServiceParent(top)

    if worker_scripts:
        client_host = "127.0.0.1" if mgmt_host in ("0.0.0.0", "::", "[::]") else mgmt_host
        supervisor = WorkerSupervisor(
            reactor, worker_scripts, copies, "%s:%d" % (client_host, mgmt_port),
            heartbeat_interval=min(2.0, heartbeat_timeout / 4.0), socket_dir=socket_dir,
            max_message_size=max_message_size,
        )
        supervisor.setName("workers")
        supervisor.setServiceParent(top)
    return top

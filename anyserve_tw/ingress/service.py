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
"""
from anyserve_tw import __version__
from anyserve_tw.wire import defaults, framing
from anyserve_tw.ingress.bridge import ReactorBridge
from anyserve_tw.ingress.grpcserver import (
    DEFAULT_MAX_CONCURRENT_RPCS, DEFAULT_THREADS, GrpcServerService,
)
from anyserve_tw.ingress.inference import InferenceServicer, inference_handler
from anyserve_tw.ingress.management import ManagementServicer, management_handler
from anyserve_tw.ingress.router import Router
from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.ingress.supervisor import WorkerSupervisor


def make_ingress_service(reactor, port=8000, host="0.0.0.0", mgmt_port=9000,
                         mgmt_host="127.0.0.1", worker_scripts=(), copies=1, pool_size=2,
                         heartbeat_timeout=6.0, grace=10.0,
                         max_message_size=defaults.MAX_MESSAGE_SIZE, threads=DEFAULT_THREADS,
                         max_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS, request_timeout=600.0, socket_dir=None):
    top = SequentialMultiService(stop_order=["inference", "workers", "management", "router"])
    router = Router(reactor, pool_size=pool_size, heartbeat_timeout=heartbeat_timeout,
                    max_payload=max_message_size)
    router.setName("router")
    router.setServiceParent(top)

    bridge = ReactorBridge(reactor)
    management = GrpcServerService(
        reactor, "management", mgmt_host, mgmt_port,
        [management_handler(ManagementServicer(bridge, router))],
        threads=8, max_message_size=4 * 1024 * 1024, grace=1.0,
    )
    management.setName("management")
    management.setServiceParent(top)

    inference = GrpcServerService(
        reactor, "inference", host, port,
        [inference_handler(InferenceServicer(bridge, router, request_timeout, __version__))],
        threads=threads, max_message_size=max_message_size,
        max_concurrent_rpcs=max_concurrent_rpcs, grace=grace,
    )
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

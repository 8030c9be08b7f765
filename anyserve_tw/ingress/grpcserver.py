"""A grpcio server as a Twisted service.

The server is created in ``startService``, never earlier: grpc objects do not
survive a fork, and twistd may daemonize between ``makeService`` and
``startService``.  ``stopService`` stops taking new RPCs at once (new ones get
UNAVAILABLE from grpc), lets in-flight ones finish for ``grace`` seconds, and
waits for that off the reactor thread, so the reactor keeps serving the
forwarded requests those RPCs are waiting on.
"""
from concurrent import futures

import grpc
from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from anyserve_tw.wire.rpc import channel_options


#: Threads of the public gRPC server: one per RPC in flight, as grpcio's
#: synchronous server blocks a thread for each.
DEFAULT_THREADS = 64

#: RPCs the public server takes in before answering RESOURCE_EXHAUSTED.
DEFAULT_MAX_CONCURRENT_RPCS = 1024


def build_server(handlers, threads=DEFAULT_THREADS, max_message_size=64 * 1024 * 1024,
                 max_concurrent_rpcs=DEFAULT_MAX_CONCURRENT_RPCS, label=""):
    """A grpcio thread-pool server, not yet bound or started: one thread per
    RPC in flight, the message caps both ways, no port sharing."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=label),
        handlers=handlers,
        options=channel_options(max_message_size) + [("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


class GrpcServerService(Service):
    """Serves ``handlers`` on ``host:port`` from a pool of ``threads`` threads."""

    log = Logger()

    def __init__(self, reactor, label, host, port, handlers, threads=32,
                 max_message_size=64 * 1024 * 1024, max_concurrent_rpcs=None, grace=10.0):
        self.reactor = reactor
        self.label = label
        self.host = host
        self.port = port
        self.handlers = handlers
        self.threads = threads
        self.max_message_size = max_message_size
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.grace = grace
        self.server = None
        self.bound_port = None

    def startService(self):
        self.server = build_server(self.handlers, self.threads, self.max_message_size,
                                   self.max_concurrent_rpcs, self.label)
        address = "%s:%d" % (self.host, self.port)
        self.bound_port = self.server.add_insecure_port(address)
        if not self.bound_port:
            raise RuntimeError("%s: cannot listen on %s" % (self.label, address))
        self.server.start()
        super().startService()
        self.log.info("{label} gRPC listening on {host}:{port}",
                      label=self.label, host=self.host, port=self.bound_port)

    def stopService(self):
        super().stopService()
        if self.server is None:
            return None
        stopped = self.server.stop(self.grace)
        self.log.info("{label} gRPC draining (grace {grace}s)", label=self.label, grace=self.grace)
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), stopped.wait, self.grace + 5
        )

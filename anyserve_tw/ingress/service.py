"""The ingress's service tree.

Started in this order:

1. ``access-log``, if asked for (opens its file);
2. ``router``: registry, worker connections, heartbeat eviction;
3. ``management``: the WorkerManagement gRPC server (loopback by default;
   only callers with the token, :mod:`anyserve_tw.ingress.authentication`);
4. ``inference``: the KServe v2 gRPC server, with gRPC's health service;
5. ``health``: keeps the health statuses in step with the router;
6. ``http``: the KServe v2 REST server and ``/metrics``, unless
   ``http_port`` is 0;
7. ``workers``: the supervised worker scripts, if any, last, so that a port
   that can't be bound stops twistd before any worker process exists.

Stopped one after another as health, inference, http, workers, management,
router, access-log: on SIGTERM every health status goes NOT_SERVING, the
inference server stops taking RPCs and drains the ones in flight (the router
still forwards them), the HTTP server does the same, then the workers are
stopped (they unregister through the still-running management server), then
the rest; the access log is closed last, after the last request it records.

Both gRPC servers are fronts (:class:`~anyserve_tw.ingress.interfaces.IGrpcFront`):
``front="aio"`` serves them with grpc.aio on the asyncio loop the reactor
runs on (so the reactor must be asyncio's); ``front="threads"`` from grpcio
thread pools bridged into the reactor.
"""
from anyserve_tw import __version__
from anyserve_tw.ingress.accesslog import AccessLog
from anyserve_tw.ingress.authentication import INTERCEPTORS, TokenCheck
from anyserve_tw.ingress.backpressure import MAX_UNREAD_PER_CLIENT, MAX_UNREAD_TOTAL, UNREAD_TIMEOUT, UnreadBytes
from anyserve_tw.ingress.health import HealthReporter
from anyserve_tw.ingress.http import HttpService
from anyserve_tw.ingress.inference import InferenceAPI
from anyserve_tw.ingress.interfaces import FRONTS
from anyserve_tw.ingress.management import ManagementAPI
from anyserve_tw.ingress.metrics import Metrics
from anyserve_tw.ingress.router import Router
from anyserve_tw.ingress.sharedmemory import SharedMemoryRegistry
from anyserve_tw.ingress.supervisor import WorkerSupervisor
from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.wire import defaults, rpc


def _front_factory(reactor, front):
    """A function building one front service from (label, host, port, api,
    threads, handlers=(more generic handlers), ...), and the health servicer
    (:mod:`anyserve_tw.ingress.health`) that front serves."""
    if front == "aio":
        from anyserve_tw.ingress.aiofront import AioGrpcService, RequestTimeouts, aio_servicer
        from anyserve_tw.ingress.health import AioHealth

        # The reactor's own loop: the current loop may be another.
        loop = reactor._asyncioEventloop

        def build(label, host, port, api, threads, handlers=(), unread=None, **settings):
            timeouts = RequestTimeouts(reactor)
            handler = rpc.generic_handler(api.service_name, aio_servicer(api, timeouts, unread), api.raw_methods)
            return AioGrpcService(loop, label, host, port, [handler, *handlers], timeouts, **settings)
        health = AioHealth(loop, reactor)
    elif front == "threads":
        from anyserve_tw.ingress.bridge import ReactorBridge
        from anyserve_tw.ingress.health import ThreadHealth
        from anyserve_tw.ingress.threadfront import GrpcServerService, threaded_servicer

        bridge = ReactorBridge(reactor)

        def build(label, host, port, api, threads, handlers=(), unread=None, **settings):
            handler = rpc.generic_handler(api.service_name, threaded_servicer(api, bridge, unread),
                                          api.raw_methods)
            return GrpcServerService(reactor, label, host, port, [handler, *handlers], threads=threads,
                                     **settings)
        health = ThreadHealth(reactor)
    elif front == "h2":
        from anyserve_tw.ingress.aiofront import RequestTimeouts
        from anyserve_tw.ingress.h2front import H2GrpcService, api_methods, health_methods
        from anyserve_tw.ingress.health import ReactorHealth

        health = ReactorHealth()

        def build(label, host, port, api, threads, handlers=(), unread=None, credentials=None,
                  interceptors=(), **settings):
            if credentials is not None or interceptors:
                raise ValueError("the HTTP/2 front serves neither TLS nor interceptors")
            methods = api_methods(api)
            methods.update(health_methods(health))
            return H2GrpcService(reactor, label, host, port, methods, RequestTimeouts(reactor),
                                 unread=unread, **settings)
    else:
        raise ValueError("unknown front %r (expected one of %s)" % (front, ", ".join(FRONTS)))
    return build, health


def management_front(reactor, front):
    """The front of the management port: the inference port's, but grpc's
    own server under the HTTP/2 front, for the token interceptor and TLS."""
    if front != "h2":
        return front
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    return "aio" if isinstance(reactor, AsyncioSelectorReactor) else "threads"


def make_ingress_service(reactor, port=8000, host="0.0.0.0", mgmt_port=9000,
                         mgmt_host="127.0.0.1", worker_scripts=(), copies=1, pool_size=2,
                         heartbeat_timeout=6.0, grace=10.0,
                         max_message_size=defaults.MAX_MESSAGE_SIZE, threads=defaults.DEFAULT_FRONT_THREADS,
                         max_concurrent_rpcs=defaults.DEFAULT_MAX_CONCURRENT_RPCS, request_timeout=600.0,
                         socket_dir=None, front="aio", http_port=8080, http_host=None, access_log=None,
                         forget_after=60.0, max_inflight_per_model=1024, startup_window=10.0,
                         mgmt_token=None, tls=None, worker_tls=None, insecure_workers=False,
                         worker_max_requests=0, worker_max_rss=0, worker_python=None,
                         worker_math_threads=0, gpus=(), max_unread_per_client=MAX_UNREAD_PER_CLIENT,
                         max_unread_total=MAX_UNREAD_TOTAL, unread_timeout=UNREAD_TIMEOUT):
    """The ingress (see the module's docstring).  ``http_port``: the REST and
    ``/metrics`` port, 0 for none (and then no metrics are kept, since
    nothing could read them); ``http_host``: its address, ``host`` if None;
    ``access_log``: a path, ``"-"`` for the twistd log, or None for none;
    ``forget_after``, ``max_inflight_per_model``, ``startup_window``: see
    :class:`~anyserve_tw.ingress.router.Router`; ``mgmt_token``: the token
    management calls must carry (None: any local process may call it);
    ``tls``: a :class:`~anyserve_tw.ingress.tls.ServerTls` to serve the
    inference ports (gRPC and REST) with TLS, or None; ``worker_tls``: a
    :class:`~anyserve_tw.wire.tlsconfig.MutualTls` (--tls-ca): the management
    server requires client certificates its CA signed, and ``tls://`` workers
    are reached with it; ``insecure_workers``: accept ``tcp://`` workers;
    ``worker_max_requests``, ``worker_max_rss`` (MB), ``worker_python``,
    ``worker_math_threads``, ``gpus``: see
    :class:`~anyserve_tw.ingress.supervisor.WorkerSupervisor`;
    ``max_unread_per_client``, ``max_unread_total`` (bytes), ``unread_timeout``
    (seconds): see :class:`~anyserve_tw.ingress.backpressure.UnreadBytes`."""
    build, health = _front_factory(reactor, front)
    mgmt_front = management_front(reactor, front)
    build_management = build if mgmt_front == front else _front_factory(reactor, mgmt_front)[0]
    top = SequentialMultiService(stop_order=["health", "inference", "http", "workers", "management",
                                             "router", "access-log"])
    router = Router(reactor, pool_size=pool_size, heartbeat_timeout=heartbeat_timeout,
                    max_payload=max_message_size, forget_after=forget_after,
                    max_inflight_per_model=max_inflight_per_model, startup_window=startup_window)
    metrics = Metrics(router) if http_port else None
    router.metrics = metrics
    if access_log is not None:
        router.access_log = AccessLog(access_log, reactor)
        router.access_log.setName("access-log")
        router.access_log.setServiceParent(top)
    router.worker_tls = worker_tls
    router.insecure_workers = insecure_workers
    router.setName("router")
    router.setServiceParent(top)

    interceptors = []
    if mgmt_token is not None:
        interceptors.append(INTERCEPTORS[mgmt_front](TokenCheck(mgmt_token, reactor)))
    management = build_management("management", mgmt_host, mgmt_port, ManagementAPI(router), threads=8,
                       max_message_size=defaults.MAX_MANAGEMENT_MESSAGE_SIZE, grace=1.0,
                       interceptors=interceptors,
                       credentials=None if worker_tls is None else worker_tls.grpc_server_credentials())
    management.setName("management")
    management.setServiceParent(top)

    shared_memory = SharedMemoryRegistry(on_change=router.shared_memory_changed)
    api = InferenceAPI(router, request_timeout, __version__, shared_memory=shared_memory)
    unread = UnreadBytes(reactor, per_client=max_unread_per_client, total=max_unread_total,
                         timeout=unread_timeout)
    inference = build("inference", host, port, api, threads=threads, handlers=[health.handler],
                      max_message_size=max_message_size, max_concurrent_rpcs=max_concurrent_rpcs, grace=grace,
                      credentials=None if tls is None else tls.grpc_credentials(),
                      unread=unread, unread_timeout=unread_timeout)
    inference.setName("inference")
    inference.setServiceParent(top)

    reporter = HealthReporter(reactor, router, health)
    reporter.setName("health")
    reporter.setServiceParent(top)

    if http_port:
        http = HttpService(reactor, host if http_host is None else http_host, http_port, router, api,
                           metrics_resource=metrics.resource(), max_message_size=max_message_size,
                           grace=grace, tls_options=None if tls is None else tls.twisted_options())
        http.setName("http")
        http.setServiceParent(top)

    if worker_scripts:
        client_host = "127.0.0.1" if mgmt_host in ("0.0.0.0", "::", "[::]") else mgmt_host
        supervisor = WorkerSupervisor(
            reactor, worker_scripts, copies, "%s:%d" % (client_host, mgmt_port),
            heartbeat_interval=min(2.0, heartbeat_timeout / 4.0), socket_dir=socket_dir,
            max_message_size=max_message_size, metrics=metrics, python=worker_python,
            max_requests=worker_max_requests, max_rss_mb=worker_max_rss,
            math_threads=worker_math_threads, gpus=gpus,
            environ=dict({} if mgmt_token is None else {defaults.ENV_TOKEN: mgmt_token},
                         **({} if worker_tls is None else worker_tls.environ())),
        )
        supervisor.setName("workers")
        supervisor.setServiceParent(top)
        router.on_evicted = supervisor.replace
        router.workers_registered = supervisor.all_registered
        router.on_registered = supervisor.note_registered
        router.max_requests_per_worker = worker_max_requests
        router.on_request_limit = supervisor.request_limit
        supervisor.drain = router.drain
        supervisor.requests_served = router.requests_served
    return top

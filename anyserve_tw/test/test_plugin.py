"""Tests for the twistd plugin (twisted/plugins/anyserve_plugin.py) and its options."""
import os
import subprocess
import sys
from unittest import SkipTest

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import defaults


def anyserve_maker():
    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "anyserve"]
    if len(makers) != 1:
        raise AssertionError("expected one 'anyserve' plugin, found %r" % (makers,))
    return makers[0]


def run_python(code):
    """Run ``code`` in a fresh interpreter from the checkout; return its stdout."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=here,
    )
    if result.returncode != 0:
        raise AssertionError("subprocess failed:\n" + result.stderr)
    return result.stdout.strip()


class DiscoveryTests(SynchronousTestCase):
    """twistd finds the plugin."""

    def test_found(self):
        """getPlugins(IServiceMaker) includes tapname 'anyserve'."""
        maker = anyserve_maker()
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertTrue(maker.description)
        self.assertEqual(maker.module, "anyserve_tw.ingress.tap")
        from anyserve_tw.ingress import tap

        self.assertIs(maker.options, tap.Options)

    def test_plugin_import_is_light(self):
        """Importing the plugin module imports neither grpc nor numpy."""
        out = run_python(
            "import sys\n"
            "import twisted.plugins.anyserve_plugin\n"
            "print('grpc' in sys.modules, 'numpy' in sys.modules,"
            " 'anyserve_tw.ingress.tap' in sys.modules)\n"
        )
        self.assertEqual(out, "False False False")

    def test_discovery_is_light(self):
        """What twistd --help does (getPlugins, read tapnames) imports no grpc or numpy."""
        out = run_python(
            "import sys\n"
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
            "print('anyserve' in names, 'grpc' in sys.modules, 'numpy' in sys.modules)\n"
        )
        self.assertEqual(out, "True False False")


class OptionsTests(SynchronousTestCase):
    """The anyserve subcommand's options."""

    def parse(self, *args):
        options = anyserve_maker().options()
        options.parseOptions(list(args))
        return options

    def test_example(self):
        """--port, --mgmt, repeated --worker and --workers parse as given."""
        options = self.parse("--port", "8000", "--mgmt", "9000", "--worker", "a.py",
                             "--worker", "b.py", "--workers", "2")
        self.assertEqual(options["port"], 8000)
        self.assertEqual(options["mgmt"], 9000)
        self.assertEqual(options["worker"], ["a.py", "b.py"])
        self.assertEqual(options["workers"], 2)

    def test_types(self):
        """Numeric options are converted to numbers."""
        options = self.parse("--port", "8001", "--heartbeat-timeout", "2.5", "--threads", "8")
        self.assertIsInstance(options["port"], int)
        self.assertEqual(options["heartbeat-timeout"], 2.5)
        self.assertIsInstance(options["heartbeat-timeout"], float)
        self.assertEqual(options["threads"], 8)

    def test_short_options(self):
        """-p, -m and -n are the short forms of --port, --mgmt and --workers."""
        options = self.parse("-p", "1234", "-m", "4321", "-n", "3")
        self.assertEqual((options["port"], options["mgmt"], options["workers"]), (1234, 4321, 3))

    def test_defaults(self):
        """Without arguments: documented defaults, no workers, fresh list each time."""
        options = self.parse()
        self.assertEqual(options["port"], 8000)
        self.assertEqual(options["mgmt"], 9000)
        self.assertEqual(options["workers"], 1)
        self.assertEqual(options["worker"], [])
        self.assertEqual(options["mgmt-host"], "127.0.0.1")
        self.assertEqual(options["max-message-size"], defaults.MAX_MESSAGE_SIZE)
        self.assertIsNone(options["socket-dir"])
        # The rest of README's option table, as written there.
        self.assertEqual(
            {name: options[name] for name in ("host", "pool-size", "heartbeat-timeout", "grace",
                                              "threads", "max-concurrent-rpcs", "request-timeout",
                                              "front", "http-port", "http-host", "access-log")},
            {"host": "0.0.0.0", "pool-size": 2, "heartbeat-timeout": 6.0, "grace": 10.0,
             "threads": 64, "max-concurrent-rpcs": 1024, "request-timeout": 600.0,
             "front": "aio", "http-port": 8080, "http-host": None, "access-log": None})
        self.assertEqual(options["loop"], "uvloop")
        self.parse("--worker", "x.py")
        self.assertEqual(self.parse()["worker"], [])

    def test_registry_defaults_and_values(self):
        """--forget-after, --max-inflight-per-model, --startup-window: their
        defaults, their types, and 0 allowed (forget at once, no cap, no window)."""
        options = self.parse()
        self.assertEqual((options["forget-after"], options["max-inflight-per-model"], options["startup-window"]),
                         (60.0, 1024, 10.0))
        options = self.parse("--forget-after", "2.5", "--max-inflight-per-model", "0", "--startup-window", "0")
        self.assertEqual((options["forget-after"], options["max-inflight-per-model"], options["startup-window"]),
                         (2.5, 0, 0.0))
        self.assertIsInstance(options["forget-after"], float)
        self.assertIsInstance(options["max-inflight-per-model"], int)

    def test_bad_values(self):
        """Zero or negative counts and durations are usage errors."""
        for args in (
            ["--workers", "0"],
            ["--workers", "-3"],
            ["--heartbeat-timeout", "-1"],
            ["--heartbeat-timeout", "0"],
            ["--pool-size", "0"],
            ["--threads", "0"],
            ["--max-concurrent-rpcs", "0"],
            ["--max-message-size", "0"],
            ["--grace", "-1"],
            ["--request-timeout", "0"],
            ["--front", "greenlets"],
            ["--loop", "trio"],
            ["--http-port", "-1"],
            ["--http-port", "65536"],
            ["--forget-after", "-1"],
            ["--max-inflight-per-model", "-1"],
            ["--startup-window", "-0.5"],
            ["--unread-timeout", "0"],
            ["--max-unread-per-client", "0"],
            ["--max-unread-total", "-1"],
            ["--tls-cert", "cert.pem"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_http_and_access_log(self):
        options = self.parse("--http-port", "0", "--http-host", "127.0.0.2", "--access-log", "/var/log/a.log")
        self.assertEqual((options["http-port"], options["http-host"], options["access-log"]),
                         (0, "127.0.0.2", "/var/log/a.log"))
        self.assertEqual(self.parse("--access-log", "-")["access-log"], "-")

    def test_not_a_number(self):
        """A non-numeric value for a numeric option is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--port", "http")
        self.assertRaises(usage.UsageError, self.parse, "--heartbeat-timeout", "soon")

    def test_unknown_option(self):
        """Unknown options are rejected."""
        self.assertRaises(usage.UsageError, self.parse, "--no-such-option")


class ServiceTreeTests(SynchronousTestCase):
    """What makeService builds from the options (nothing is started)."""

    def make(self, *args):
        # trial installs its reactor only when a test needs one; makeService
        # would otherwise install asyncio's for the rest of this process.
        from twisted.internet import reactor  # noqa: F401

        from anyserve_tw.ingress.tap import Options, makeService

        options = Options()
        options.parseOptions(list(args))
        return makeService(options)

    def test_supervised_heartbeat_interval(self):
        """README: supervised workers beat every min(2, timeout / 4) seconds, so
        a worker is never evicted for beating at its own pace."""
        for timeout, interval in (("6", 1.5), ("20", 2.0), ("1", 0.25)):
            supervisor = self.make("--worker", "w.py", "--heartbeat-timeout", timeout).getServiceNamed("workers")
            self.assertEqual(supervisor.heartbeat_interval, interval)

    def test_supervisor_passes_the_ingress_settings(self):
        supervisor = self.make("--worker", "w.py", "--mgmt", "9100", "--mgmt-host", "0.0.0.0",
                               "--max-message-size", "12345").getServiceNamed("workers")
        self.assertEqual(supervisor.ingress_address, "127.0.0.1:9100")  # reachable, not 0.0.0.0
        self.assertEqual(supervisor.max_message_size, 12345)

    def test_non_asyncio_reactor_gets_the_thread_front(self):
        """trial's default reactor is not asyncio's: --front aio falls back to threads."""
        from twisted.internet import reactor
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        from anyserve_tw.ingress.threadfront import GrpcServerService

        if isinstance(reactor, AsyncioSelectorReactor):
            raise SkipTest("trial runs on the asyncio reactor here")
        for args in ((), ("--front", "aio"), ("--front", "threads")):
            top = self.make(*args)
            self.assertIsInstance(top.getServiceNamed("inference"), GrpcServerService)
            self.assertIsInstance(top.getServiceNamed("management"), GrpcServerService)

    def test_the_asyncio_reactor_gets_the_aio_front(self):
        import asyncio

        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        from anyserve_tw.ingress.aiofront import AioGrpcService
        from anyserve_tw.ingress.service import make_ingress_service
        from anyserve_tw.ingress.tap import choose_front

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        reactor = AsyncioSelectorReactor(loop)
        self.assertEqual(choose_front(reactor, "aio"), "aio")
        self.assertEqual(choose_front(reactor, "threads"), "threads")
        top = make_ingress_service(reactor, front="aio")
        inference = top.getServiceNamed("inference")
        self.assertIsInstance(inference, AioGrpcService)
        self.assertIs(inference.loop, loop)  # the reactor's, even when not the current loop

    def test_the_h2_front_on_either_reactor(self):
        """--front h2 serves inference itself on any reactor; management stays
        on grpc's server: aio on the asyncio reactor, threads on another."""
        import asyncio

        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
        from twisted.internet.testing import MemoryReactorClock

        from anyserve_tw.ingress.aiofront import AioGrpcService
        from anyserve_tw.ingress.h2front import H2GrpcService
        from anyserve_tw.ingress.service import make_ingress_service
        from anyserve_tw.ingress.threadfront import GrpcServerService

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        for reactor, management in ((AsyncioSelectorReactor(loop), AioGrpcService),
                                    (MemoryReactorClock(), GrpcServerService)):
            top = make_ingress_service(reactor, front="h2")
            self.assertIsInstance(top.getServiceNamed("inference"), H2GrpcService)
            self.assertIsInstance(top.getServiceNamed("management"), management)

    def test_router_gets_the_registry_settings(self):
        router = self.make("--http-port", "0", "--forget-after", "7", "--max-inflight-per-model", "3",
                           "--startup-window", "4").getServiceNamed("router")
        self.assertEqual((router.registry.forget_after, router.max_inflight_per_model, router.startup_window),
                         (7.0, 3, 4.0))
        router = self.make("--http-port", "0").getServiceNamed("router")
        self.assertEqual((router.registry.forget_after, router.max_inflight_per_model, router.startup_window),
                         (60.0, 1024, 10.0))

    def test_no_workers_no_supervisor(self):
        self.assertEqual(sorted(s.name for s in self.make("--http-port", "0")),
                         ["health", "inference", "management", "router"])

    def test_stop_order(self):
        """Health goes NOT_SERVING first, then the fronts drain, then workers
        stop; the access log closes after the last request it records."""
        top = self.make("--worker", "w.py", "--access-log", "-", "--http-port", "0")
        self.assertEqual([s.name for s in top.stopping_order()],
                         ["health", "inference", "workers", "management", "router", "access-log"])

    def test_http_port_zero_keeps_no_metrics(self):
        top = self.make("--http-port", "0")
        self.assertIsNone(top.getServiceNamed("router").metrics)
        self.assertIsNone(top.getServiceNamed("router").access_log)

    def test_metrics_shared_by_router_and_supervisor(self):
        from anyserve_tw.ingress.metrics import Metrics

        top = self.make("--worker", "w.py", "--http-port", "8123")
        metrics = top.getServiceNamed("router").metrics
        self.assertIsInstance(metrics, Metrics)
        self.assertIs(top.getServiceNamed("workers").metrics, metrics)

    def test_http_service(self):
        top = self.make("--http-port", "8123", "--host", "127.0.0.3")
        http = top.getServiceNamed("http")
        self.assertEqual((http.host, http.port), ("127.0.0.3", 8123))
        self.assertIs(http.router, top.getServiceNamed("router"))
        self.assertEqual(self.make("--http-port", "8123", "--http-host", "::1").getServiceNamed("http").host,
                         "::1")
        self.assertEqual([s.name for s in top.stopping_order()][:3], ["health", "inference", "http"])

    def test_access_log(self):
        from anyserve_tw.ingress.accesslog import AccessLog

        top = self.make("--access-log", "relative.log", "--http-port", "0")
        log = top.getServiceNamed("access-log")
        self.assertIsInstance(log, AccessLog)
        self.assertIs(top.getServiceNamed("router").access_log, log)
        self.assertEqual(log.path, os.path.abspath("relative.log"))
        self.assertFalse(log.running)  # opened when started, not before

    def test_health_served_on_the_inference_port(self):
        """The inference front's handlers include grpc.health.v1.Health."""
        top = self.make("--http-port", "0")
        inference = top.getServiceNamed("inference")
        health = top.getServiceNamed("health").health
        self.assertEqual(len(inference.handlers), 2)
        self.assertIs(inference.handlers[1], health.handler)
        self.assertEqual(health.handler.service_name(), "grpc.health.v1.Health")

"""Tests for anyserve_tw.worker.registration: a worker pointed at a gRPC
server that is not the management API (the ingress's inference port) says
so once and backs off, instead of retrying every tick with "Method not
found" and no hint."""
from concurrent import futures

import grpc
from twisted.internet import reactor
from twisted.internet.defer import FirstError, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.wire import protos
from anyserve_tw.worker import registration
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.registration import MAX_MISDIRECTED_BACKOFF, Registration

HINT = ("answers as an inference server (UNIMPLEMENTED RegisterModel): point it at the "
        "ingress's --mgmt port")


def one_model_app():
    app = AnyServe()
    app.model("add", inputs=[("a", "INT32", [-1])], outputs=[("sum", "INT32", [-1])])(lambda r: {})
    return app


class _Counting(grpc.ServerInterceptor):
    """Counts the calls of a server that implements nothing (each is UNIMPLEMENTED)."""

    def __init__(self):
        self.methods = []

    def intercept_service(self, continuation, details):
        self.methods.append(details.method)
        return continuation(details)


class MisdirectedTests(TestCase):
    def setUp(self):
        self.calls = _Counting()
        self.server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[self.calls])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.addCleanup(self.server.stop, None)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def test_one_clear_error(self):
        """Against a real gRPC server without the management API: one error
        naming the address and the fix, whatever the number of attempts."""
        address = "127.0.0.1:%d" % self.port
        worker = Registration(reactor, one_model_app(), address, "unix:/nowhere", "w1",
                              interval=0.02, rpc_timeout=5.0)
        worker.startService()
        self.addCleanup(worker.stopService)
        for _ in range(500):
            if len(self.calls.methods) >= 4:
                break
            await deferLater(reactor, 0.02)
        self.assertGreaterEqual(len(self.calls.methods), 4)
        self.assertEqual(set(self.calls.methods), {"/%s/RegisterModel" % protos.MANAGEMENT_SERVICE})
        mine = [e for e in self.events if e.get("log_namespace") == registration.__name__]
        self.assertEqual([(e["log_level"], formatEvent(e)) for e in mine],
                         [(LogLevel.error, "ANYSERVE_INGRESS=%s %s" % (address, HINT))])
        self.assertFalse(worker.registered)


class _Unimplemented(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNIMPLEMENTED


class BackoffTests(SynchronousTestCase):
    """The wait between registrations doubles while the address answers
    UNIMPLEMENTED, up to MAX_MISDIRECTED_BACKOFF, and resets on success."""

    def test_doubling_wait(self):
        clock = Clock()
        worker = Registration(clock, one_model_app(), "host:1", "unix:/nowhere", "w1", interval=2.0)
        attempts = []

        def register():
            attempts.append(clock.seconds())
            return fail(FirstError(Failure(_Unimplemented()), 0))

        worker._register = register
        for _ in range(100):  # 200 s of ticks, every 2 s
            worker._tick()
            clock.advance(2.0)
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        self.assertEqual(gaps, [2.0, 4.0, 8.0, 16.0] + [MAX_MISDIRECTED_BACKOFF] * 5)


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


class RetryScheduleTests(SynchronousTestCase):
    """While the ingress cannot be reached, the worker tries again every
    RETRY_INTERVAL seconds, not every heartbeat interval; once it answers,
    ticks are a heartbeat interval apart again."""

    def test_unreachable_then_back(self):
        clock = Clock()
        worker = Registration(clock, one_model_app(), "127.0.0.1:1", "unix:/nowhere", "w1", interval=2.0)
        attempts = []
        reachable = []

        def register():
            attempts.append(clock.seconds())
            if reachable:
                worker.registered = True
                return succeed(None)
            return fail(FirstError(Failure(_Unavailable()), 0))

        worker._register = register
        worker._heartbeat = lambda: attempts.append(clock.seconds()) or succeed(None)
        worker.startService()
        self.addCleanup(worker.stopService)
        clock.pump([registration.RETRY_INTERVAL] * 8)
        self.assertEqual(len(attempts), 9)  # one at start, then one every RETRY_INTERVAL
        reachable.append(True)
        clock.pump([registration.RETRY_INTERVAL, 2.0, 2.0])
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        self.assertEqual(gaps, [registration.RETRY_INTERVAL] * 9 + [2.0, 2.0])

    def test_stop_ends_the_ticks(self):
        clock = Clock()
        worker = Registration(clock, one_model_app(), "127.0.0.1:1", "unix:/nowhere", "w1", interval=2.0)
        worker._register = lambda: succeed(None)
        worker.startService()
        worker.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_capped_reconnect_backoff(self):
        """gRPC's default back-off reaches 120 s; the management channel's
        is capped at about a second."""
        options = dict(registration.management_channel_options())
        self.assertLessEqual(options["grpc.max_reconnect_backoff_ms"], 1000)
        self.assertLessEqual(options["grpc.initial_reconnect_backoff_ms"],
                             options["grpc.max_reconnect_backoff_ms"])


class _Pool:
    """A thread pool that runs nothing: ``calls`` are (onResult, function)."""

    def __init__(self):
        self.calls = []
        self.functions = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.calls.append(onResult)
        self.functions.append(f)


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.pool = _Pool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class RegistrationsTests(SynchronousTestCase):
    """One Registration per ingress in ANYSERVE_INGRESS."""

    def test_addresses(self):
        self.assertEqual(registration.ingress_addresses("a:9000, b:9000,,a:9000 "), ["a:9000", "b:9000"])
        self.assertRaises(ValueError, registration.ingress_addresses, " , ")

    def test_withdraws_from_every_ingress_and_one_failure_stops_none(self):
        """Shutdown withdraws from each ingress; an ingress that fails to
        answer (it is gone) does not keep the others from being told."""
        registrations = registration.Registrations(Clock(), one_model_app(), ["a:9000", "b:9000", "c:9000"],
                                                   "tls://w1:7001", "w1")
        asked = []
        for r, outcome in zip(registrations.registrations, (succeed(True), fail(RuntimeError("gone")),
                                                             succeed(True))):
            r.registered = True
            r._blocking = lambda method, request, r=r, outcome=outcome: (asked.append(r.ingress), outcome)[1]
            r._stub = type("Stub", (), {"UnregisterModel": None})()
        self.successResultOf(registrations.withdraw())
        self.assertEqual(asked, ["a:9000", "b:9000", "c:9000"])
        self.assertTrue(all(r.withdrawn for r in registrations.registrations))
        self.flushLoggedErrors(RuntimeError)

    def test_an_ingress_that_does_not_answer_holds_two_threads(self):
        """Twelve models, calls that never return: two are in the reactor's
        thread pool at a time, the rest wait their turn (so other
        ingresses' heartbeats still find a thread)."""
        app = AnyServe()
        for i in range(12):
            app.model("m%d" % i, inputs=[("a", "INT32", [-1])], outputs=[("s", "INT32", [-1])])(lambda r: {})
        clock = FakeReactor()
        worker = Registration(clock, app, "a:9000", "tls://w1:7001", "w1")
        worker._stub = type("Stub", (), {"RegisterModel": None})()
        d = worker._register()
        self.assertEqual(len(clock.pool.calls), registration.CALLS_AT_ONCE)
        answered = 0
        while clock.pool.calls:
            clock.pool.calls.pop(0)(True, None)  # one answered: the next goes in
            answered += 1
            self.assertLessEqual(len(clock.pool.calls), registration.CALLS_AT_ONCE)
        self.assertEqual(answered, 12)
        self.successResultOf(d)
        self.assertTrue(worker.registered)

    def test_withdrawal_waits_for_a_registration_under_way(self):
        """SIGTERM while the models are being registered: the withdrawal
        waits for that registration, then unregisters every model (the
        ingress already routes to those it took)."""
        def register(request, **kwargs):
            pass

        def unregister(request, **kwargs):
            pass

        clock = FakeReactor()
        worker = Registration(clock, one_model_app(), "a:9000", "tls://w1:7001", "w1")
        worker._stub = type("Stub", (), {"RegisterModel": staticmethod(register),
                                         "UnregisterModel": staticmethod(unregister),
                                         "Heartbeat": staticmethod(register)})()
        worker.running = True
        worker._loop()
        self.assertEqual(clock.pool.functions, [register])
        withdrawn = worker.withdraw()
        self.assertNoResult(withdrawn)
        self.assertEqual(clock.pool.functions, [register])  # nothing unregistered before it is registered
        clock.pool.calls.pop(0)(True, None)
        self.assertTrue(worker.registered)
        self.assertEqual(clock.pool.functions, [register, unregister])
        clock.pool.calls.pop(0)(True, None)
        self.successResultOf(withdrawn)
        worker.running = False

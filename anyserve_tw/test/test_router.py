"""Tests for anyserve_tw.ingress.router.Router, on a MemoryReactorClock.

Worker connections are completed by hand (see FakeWorkerLink): every
connectUNIX the router's worker handles make is recorded by the fake reactor,
and the test plays the worker end of it.
"""
import grpc
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import framing
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.payloads import Region, Timing, decode_shm_table
from anyserve_tw.ingress.router import Router
from anyserve_tw.test.test_workerlink import (
    FailsWithMixin, FakeWorkerLink, accept_pending, fail_attempt, frame,
)

INPUTS = [("INPUT0", "FP32", (1, 4))]
OUTPUTS = [("OUTPUT0", "FP32", (1, 4))]


class RouterTests(FailsWithMixin, SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.router = Router(self.reactor, pool_size=2, heartbeat_timeout=10.0, connect_timeout=3.0)
        self.accepted = 0

    def accept(self):
        """Play the worker end of every connection attempt not yet answered."""
        links = accept_pending(self.reactor, self.accepted)
        self.accepted = len(self.reactor.unixClients)
        return links

    def register(self, worker_id, name, version="", path=None):
        """Register and connect a worker; the worker ends of its connections."""
        path = path or "/tmp/%s.sock" % worker_id
        d = self.router.register_model(worker_id, "unix://" + path, name, version, "onnx", INPUTS, OUTPUTS)
        links = self.accept()
        self.assertIs(self.successResultOf(d), True)
        return links

    def assertNoFrames(self, links):
        self.assertEqual([link.transport.value() for link in links], [b""] * len(links))

    def infer_frames(self, links):
        return [f for link in links for f in link.frames() if f[0] == framing.REQUEST]

    # -- registration ----------------------------------------------------

    def test_register_connects_then_registers(self):
        d = self.router.register_model(
            "w1", "unix:///tmp/w1.sock", "resnet", "1", "onnx", INPUTS, OUTPUTS
        )
        self.assertEqual(
            [(path, timeout) for path, _f, timeout, _p in self.reactor.unixClients],
            [("/tmp/w1.sock", 3.0)] * 2,
        )
        # Not routed until the whole pool is up.
        self.assertNoResult(d)
        self.assertFalse(self.router.model_ready("resnet", "1"))
        self.assertFailsWith(self.router.infer("resnet", "1", b"x"), grpc.StatusCode.NOT_FOUND)
        first = FakeWorkerLink(self.reactor, "/tmp/w1.sock", self.reactor.unixClients[0][1])
        self.assertNoResult(d)
        self.assertFalse(self.router.model_ready("resnet", "1"))
        second = FakeWorkerLink(self.reactor, "/tmp/w1.sock", self.reactor.unixClients[1][1])
        self.assertIs(self.successResultOf(d), True)

        self.assertTrue(self.router.model_ready("resnet", "1"))
        self.assertTrue(self.router.model_ready("resnet"))  # the default version
        model, versions = self.router.model_metadata("resnet")
        self.assertEqual((model.name, model.version, model.platform), ("resnet", "1", "onnx"))
        self.assertEqual((list(model.inputs), list(model.outputs)), (INPUTS, OUTPUTS))
        self.assertEqual(versions, ["1"])
        self.assertTrue(self.router.heartbeat("w1"))

        result = self.router.infer("resnet", "1", b"request-bytes", timeout=2)
        sent = self.infer_frames([first, second])
        self.assertEqual(len(sent), 1)
        kind, request_id, aux, payload = sent[0]
        self.assertEqual((aux, payload), (2000, b"request-bytes"))
        [link] = [link for link in (first, second) if link.frames()]
        link.send(frame(framing.RESPONSE, request_id, b"response-bytes"))
        self.assertEqual(self.successResultOf(result), b"response-bytes")

    def test_second_model_on_same_worker_reuses_pool(self):
        d1 = self.router.register_model("w1", "unix:///tmp/w1.sock", "a")
        d2 = self.router.register_model("w1", "unix:///tmp/w1.sock", "b", "2")
        self.assertEqual(len(self.reactor.unixClients), 2)  # one shared attempt
        self.accept()
        self.assertIs(self.successResultOf(d1), True)
        self.assertIs(self.successResultOf(d2), True)
        d3 = self.router.register_model("w1", "unix:///tmp/w1.sock", "c")
        self.assertIs(self.successResultOf(d3), True)  # already connected: at once
        self.assertEqual(len(self.reactor.unixClients), 2)
        for name in ("a", "b", "c"):
            self.assertTrue(self.router.model_ready(name))

    def test_register_unreachable_worker(self):
        d = self.router.register_model("w1", "unix:///tmp/nobody.sock", "m")
        fail_attempt(self.reactor, 0)
        e = self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("/tmp/nobody.sock", e.message)
        self.assertFalse(self.router.heartbeat("w1"))
        self.assertNotIn("w1", self.router.workers)
        self.assertFailsWith(self.router.infer("m", "", b"x"), grpc.StatusCode.NOT_FOUND)
        # A retry makes a fresh attempt rather than reusing the failed handle.
        self.accepted = len(self.reactor.unixClients)
        d = self.router.register_model("w1", "unix:///tmp/nobody.sock", "m")
        self.assertEqual(len(self.reactor.unixClients), 4)
        self.accept()
        self.assertIs(self.successResultOf(d), True)
        self.assertTrue(self.router.model_ready("m"))

    def test_register_with_unsupported_address(self):
        for _ in range(2):
            # Rejected both times (the second must not hang on the first's
            # half-made handle) ...
            failure = self.failureResultOf(
                maybeDeferred(self.router.register_model, "w1", "tcp://127.0.0.1:7000", "m"),
                InferenceError,
            )
            self.assertEqual(failure.value.code, grpc.StatusCode.INVALID_ARGUMENT)
            # ... and no trace of the worker is left behind.
            self.assertNotIn("w1", self.router.workers)
            self.assertFalse(self.router.heartbeat("w1"))

    def test_live_worker_id_at_new_address_is_refused(self):
        """A second process claiming a live worker's id gets ALREADY_EXISTS and
        the first keeps serving; once the first is gone, the id is free."""
        old_links = self.register("w1", "m", path="/tmp/old.sock")
        old_handle = self.router.workers["w1"]
        with self.assertRaises(InferenceError) as caught:
            self.router.register_model("w1", "unix:///tmp/new.sock", "m")
        self.assertEqual(caught.exception.code, grpc.StatusCode.ALREADY_EXISTS)
        self.assertIs(self.router.workers["w1"], old_handle)
        self.assertFalse(any(link.transport.disconnected for link in old_links))
        in_flight = self.router.infer("m", "", b"x")
        self.assertEqual(len(self.infer_frames(old_links)), 1)

        # The old process dies: its handle goes, the id can be registered anew.
        old_links[0].transport.loseConnection()
        self.reactor.advance(0)
        self.assertFailsWith(in_flight, grpc.StatusCode.UNAVAILABLE)
        self.assertNotIn("w1", self.router.workers)
        d = self.router.register_model("w1", "unix:///tmp/new.sock", "m")
        new_links = self.accept()
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.router.workers["w1"].address, "unix:///tmp/new.sock")
        self.router.infer("m", "", b"y")
        self.assertEqual(len(self.infer_frames(new_links)), 1)

    def test_heartbeat_names_models_not_served(self):
        """A heartbeat naming a model this worker no longer serves is unhealthy,
        which makes the worker register again."""
        self.register("w1", "m")
        self.assertTrue(self.router.heartbeat("w1", ["m"]))
        self.router.unregister_model("w1", "m")
        self.assertFalse(self.router.heartbeat("w1", ["m"]))
        self.assertTrue(self.router.heartbeat("w1", []))

    # -- inference -------------------------------------------------------

    def test_infer_unknown_model_is_not_found_and_touches_no_worker(self):
        links = self.register("w1", "m", "1")
        for name, version in (("other", ""), ("other", "1"), ("m", "2")):
            self.assertFailsWith(self.router.infer(name, version, b"x"), grpc.StatusCode.NOT_FOUND)
        self.assertNoFrames(links)
        self.assertEqual(self.router.workers["w1"].outstanding, 0)

    def test_infer_known_model_without_worker_is_unavailable(self):
        """A model whose worker was lost is UNAVAILABLE (try again) for
        forget_after seconds, then NOT_FOUND; the timer is the reactor's."""
        links = self.register("w1", "m")
        links[0].transport.peer_closes()
        self.assertFalse(self.router.model_ready("m"))
        e = self.assertFailsWith(self.router.infer("m", "", b"x"), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("'m'", e.message)
        self.assertNoFrames(links)
        self.assertFalse(self.router.server_ready())
        self.reactor.advance(59)
        self.assertFailsWith(self.router.infer("m", "", b"x"), grpc.StatusCode.UNAVAILABLE)
        self.reactor.advance(1)
        self.assertFailsWith(self.router.infer("m", "", b"x"), grpc.StatusCode.NOT_FOUND)
        self.assertRaises(InferenceError, self.router.model_metadata, "m")
        self.assertEqual(self.router.registry.models(), [])

    def test_unregistered_by_last_worker_is_not_found(self):
        """UnregisterModel by its last worker (a clean exit): gone at once,
        and ServerReady no longer waits for it."""
        links = self.register("w1", "m")
        self.register("w2", "m")
        self.register("w1", "n")
        self.assertTrue(self.router.unregister_model("w1", "m"))
        self.assertTrue(self.router.model_ready("m"))
        self.assertTrue(self.router.unregister_model("w2", "m"))
        self.assertFalse(self.router.model_ready("m"))
        self.assertFailsWith(self.router.infer("m", "", b"x"), grpc.StatusCode.NOT_FOUND)
        self.assertNoFrames(links)
        self.router.startService()
        self.addCleanup(self.router.stopService)
        self.reactor.advance(self.router.startup_window)
        self.assertTrue(self.router.server_ready())
        self.assertFalse(self.router.unregister_model("w2", "m"))

    def test_forget_after_is_configurable(self):
        router = Router(self.reactor, pool_size=1, forget_after=5.0)
        d = router.register_model("w1", "unix:///tmp/w1.sock", "m")
        (link,) = accept_pending(self.reactor, 0)
        self.successResultOf(d)
        link.transport.peer_closes()
        self.reactor.advance(4.9)
        self.assertFailsWith(router.infer("m", "", b"x"), grpc.StatusCode.UNAVAILABLE)
        self.reactor.advance(0.1)
        self.assertFailsWith(router.infer("m", "", b"x"), grpc.StatusCode.NOT_FOUND)

    def test_infer_spreads_over_workers(self):
        links1 = self.register("w1", "m")
        links2 = self.register("w2", "m")
        self.router.infer("m", "", b"a")
        self.router.infer("m", "", b"b")
        self.assertEqual((len(self.infer_frames(links1)), len(self.infer_frames(links2))), (1, 1))

    # -- heartbeats --------------------------------------------------------

    def test_heartbeat(self):
        self.register("w1", "m")
        self.reactor.advance(4)
        self.assertTrue(self.router.heartbeat("w1"))
        self.assertEqual(self.router.workers["w1"].last_heartbeat, 4)
        self.assertFalse(self.router.heartbeat("nobody"))
        self.assertNotIn("nobody", self.router.workers)

    def test_evict_silent_workers(self):
        silent_links = self.register("silent", "a")
        self.register("alive", "b")
        in_flight = self.router.infer("a", "", b"x")
        for _ in range(4):
            self.reactor.advance(2.5)
            self.assertTrue(self.router.heartbeat("alive"))
            self.router.evict_silent_workers()
        # 10s of silence is not yet more than heartbeat_timeout.
        self.assertIn("silent", self.router.workers)
        self.assertNoResult(in_flight)

        self.reactor.advance(0.5)
        self.assertTrue(self.router.heartbeat("alive"))
        self.router.evict_silent_workers()
        self.assertNotIn("silent", self.router.workers)
        self.assertFalse(self.router.heartbeat("silent"))
        self.assertTrue(all(link.transport.disconnected for link in silent_links))
        self.reactor.advance(0)
        e = self.assertFailsWith(in_flight, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("no heartbeat", e.message)
        self.assertFalse(self.router.model_ready("a"))
        self.assertFailsWith(self.router.infer("a", "", b"x"), grpc.StatusCode.UNAVAILABLE)

        self.assertIn("alive", self.router.workers)
        self.assertTrue(self.router.model_ready("b"))
        self.assertNoResult(self.router.infer("b", "", b"y"))

    def test_reaper_evicts_after_start(self):
        silent_links = self.register("silent", "a")
        alive_links = self.register("alive", "b")
        in_flight = self.router.infer("a", "", b"x")
        self.router.startService()
        self.addCleanup(self.router.stopService)
        for _ in range(10):
            self.reactor.advance(1)
            self.router.heartbeat("alive")
        self.assertIn("silent", self.router.workers)
        for _ in range(3):  # t=13: the reaper's tick at 12.5 sees 12.5s of silence
            self.reactor.advance(1)
            self.router.heartbeat("alive")
        self.assertNotIn("silent", self.router.workers)
        self.assertTrue(all(link.transport.disconnected for link in silent_links))
        self.assertFailsWith(in_flight, grpc.StatusCode.UNAVAILABLE)
        self.assertFalse(self.router.model_ready("a"))
        self.assertTrue(self.router.model_ready("b"))
        self.assertTrue(self.router.server_ready() is False)  # "a" is known but not ready

        self.router.stopService()
        self.assertFalse(self.router.running)
        self.assertTrue(all(link.transport.disconnected for link in alive_links))
        self.reactor.advance(0)
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])

    def test_reaper_keeps_heartbeating_workers(self):
        self.register("w1", "m")
        self.router.startService()
        self.addCleanup(self.router.stopService)
        for _ in range(100):
            self.reactor.advance(1)
            self.router.heartbeat("w1")
        self.assertIn("w1", self.router.workers)
        self.assertTrue(self.router.server_ready())

    # -- connection loss ----------------------------------------------------

    def test_connection_drop_removes_worker(self):
        links = self.register("w1", "m")
        in_flight = self.router.infer("m", "", b"x")
        sent_on = [link for link in links if link.frames()]
        other = [link for link in links if not link.frames()]
        self.assertEqual((len(sent_on), len(other)), (1, 1))
        other[0].transport.peer_closes()  # the idle connection drops

        self.assertNotIn("w1", self.router.workers)
        self.assertFalse(self.router.heartbeat("w1"))
        self.assertFalse(self.router.model_ready("m"))
        self.assertTrue(sent_on[0].transport.disconnected)
        self.reactor.advance(0)
        self.assertFailsWith(in_flight, grpc.StatusCode.UNAVAILABLE)
        # Still known: "try again", not "no such model".
        self.assertFailsWith(self.router.infer("m", "", b"x"), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.router.model_metadata("m")[0].name, "m")
        self.assertEqual(len(self.infer_frames(links)), 1)

        # The worker, told by its heartbeat that it is unknown, registers again.
        self.register("w1", "m")
        self.assertTrue(self.router.model_ready("m"))

    def test_evicted_model_forgotten_unless_registered_again(self):
        self.register("silent", "a")
        self.reactor.advance(11)
        self.router.evict_silent_workers()
        self.assertFailsWith(self.router.infer("a", "", b"x"), grpc.StatusCode.UNAVAILABLE)
        self.reactor.advance(30)
        self.register("back", "a")  # cancels the forgetting
        self.reactor.advance(60)
        self.assertTrue(self.router.model_ready("a"))
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])


class RecyclingTests(FailsWithMixin, SynchronousTestCase):
    """What recycling asks of the router: a count per worker, a word when
    one reaches the limit, and a drain that loses no request."""

    accept = RouterTests.accept
    register = RouterTests.register
    infer_frames = RouterTests.infer_frames

    def setUp(self):
        RouterTests.setUp(self)
        self.told = []
        self.router.on_request_limit = lambda *args: self.told.append(args)

    def test_requests_are_counted_per_worker(self):
        self.register("w1", "m")
        self.register("w2", "m")
        for _ in range(5):
            self.router.infer("m", "", b"x")
        self.assertEqual(self.router.requests_served("w1") + self.router.requests_served("w2"), 5)
        self.assertEqual(self.router.requests_served("nobody"), 0)

    def test_the_limit_is_told_once_on_the_next_turn(self):
        self.router.max_requests_per_worker = 3
        self.register("w1", "m")
        for _ in range(3):
            self.router.infer("m", "", b"x")
        self.assertEqual(self.told, [])  # never inside a request
        self.reactor.advance(0)
        self.assertEqual(self.told, [("w1", "unix:///tmp/w1.sock", 3)])
        for _ in range(3):
            self.router.infer("m", "", b"x")
        self.reactor.advance(0)
        self.assertEqual(len(self.told), 1)

    def test_no_limit_by_default(self):
        self.register("w1", "m")
        for _ in range(3):
            self.router.infer("m", "", b"x")
        self.reactor.advance(0)
        self.assertEqual(self.told, [])

    def test_drain_stops_new_requests_and_finishes_those_in_flight(self):
        old = self.register("w1", "m")
        self.register("w1", "other")
        new = self.register("w2", "m")
        in_flight = self.router.infer("m", "", b"x")
        [request] = self.infer_frames(old)
        self.assertTrue(self.router.drain("w1"))
        self.assertTrue(self.router.draining("w1"))
        for _ in range(4):
            self.router.infer("m", "", b"y")
        self.assertEqual((len(self.infer_frames(old)), len(self.infer_frames(new))), (1, 4))
        self.assertTrue(self.router.model_ready("m"))
        # Withdrawn like an UnregisterModel: its last model leaves.
        self.assertFailsWith(self.router.infer("other", "", b"x"), grpc.StatusCode.NOT_FOUND)
        # Its request in flight is answered.
        [link] = [link for link in old if link.frames()]
        link.send(frame(framing.RESPONSE, request[1], b"answer"))
        self.assertEqual(self.successResultOf(in_flight), b"answer")

    def test_a_draining_worker_is_not_told_to_register_again(self):
        old = self.register("w1", "m")
        self.register("w2", "m")
        self.router.drain("w1")
        self.assertTrue(self.router.heartbeat("w1", ["m"]))  # else it would register again
        self.assertTrue(self.router.unregister_model("w1", "m"))  # its own withdrawal: no error
        d = self.router.register_model("w1", "unix:///tmp/w1.sock", "m")
        self.assertIs(self.successResultOf(d), True)
        for _ in range(3):
            self.router.infer("m", "", b"y")
        self.assertEqual(self.infer_frames(old), [])
        self.assertTrue(self.router.model_ready("m"))

    def test_a_drained_worker_is_forgotten_when_it_disconnects(self):
        old = self.register("w1", "m")
        self.register("w2", "m")
        self.router.drain("w1")
        for link in old:
            link.transport.peer_closes()
        self.assertNotIn("w1", self.router.workers)
        self.assertFalse(self.router.draining("w1"))
        self.assertTrue(self.router.model_ready("m"))
        # The same id may come back as a new worker.
        self.register("w1", "m")
        self.router.infer("m", "", b"a")
        self.router.infer("m", "", b"b")
        self.assertEqual(self.router.requests_served("w1"), 1)

    def test_drain_of_an_unknown_worker(self):
        self.assertFalse(self.router.drain("nobody"))
        self.assertFalse(self.router.draining("nobody"))


class InflightCapTests(FailsWithMixin, SynchronousTestCase):
    """--max-inflight-per-model: past the cap, RESOURCE_EXHAUSTED at once,
    for that model only; a slot is freed by every outcome."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.router = Router(self.reactor, pool_size=1, max_inflight_per_model=2)
        self.links = {}
        for index, name in enumerate(("slow", "other")):
            d = self.router.register_model("w-" + name, "unix:///tmp/%s.sock" % name, name)
            (self.links[name],) = accept_pending(self.reactor, index)
            self.successResultOf(d)

    def test_cap(self):
        slow = self.router.registry.resolve("slow")
        first = self.router.infer("slow", "", b"1")
        second = self.router.infer("slow", "", b"2")
        self.assertEqual(slow.outstanding, 2)
        e = self.assertFailsWith(self.router.infer("slow", "", b"3"), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(e.message, "model 'slow' has 2 requests in flight")
        self.assertEqual(len(self.links["slow"].frames()), 2)  # the third never reached the worker
        # Another model is not affected.
        other = self.router.infer("other", "", b"x")
        self.assertEqual(self.router.registry.resolve("other").outstanding, 1)

        # An answer frees a slot, and so does a cancellation (the client went).
        request = self.links["slow"].frames()[0]
        self.links["slow"].reply(request[1], b"done")
        self.assertEqual(self.successResultOf(first), b"done")
        self.assertEqual(slow.outstanding, 1)
        self.assertNoResult(self.router.infer("slow", "", b"4"))
        self.assertFailsWith(self.router.infer("slow", "", b"5"), grpc.StatusCode.RESOURCE_EXHAUSTED)
        second.cancel()
        self.failureResultOf(second)
        self.assertEqual(slow.outstanding, 1)
        self.assertNoResult(self.router.infer("slow", "", b"6"))
        self.assertNoResult(other)

    def test_worker_loss_frees_every_slot(self):
        slow = self.router.registry.resolve("slow")
        pending = [self.router.infer("slow", "", b"x") for _ in range(2)]
        self.links["slow"].transport.peer_closes()
        self.reactor.advance(0)
        for d in pending:
            self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(slow.outstanding, 0)

    def test_zero_is_no_cap(self):
        self.router.max_inflight_per_model = 0
        for _ in range(50):
            self.assertNoResult(self.router.infer("slow", "", b"x"))
        self.assertEqual(self.router.registry.resolve("slow").outstanding, 50)


class StartupWindowTests(FailsWithMixin, SynchronousTestCase):
    """For startup_window seconds after start an unknown model is
    UNAVAILABLE ("workers are registering"), NOT_FOUND after."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.router = Router(self.reactor, pool_size=1, startup_window=10.0)

    def start(self):
        self.router.startService()
        self.addCleanup(self.router.stopService)

    def test_not_started_is_not_found(self):
        self.assertFailsWith(self.router.infer("x", "", b""), grpc.StatusCode.NOT_FOUND)

    def test_window(self):
        self.start()
        self.reactor.advance(9.9)
        e = self.assertFailsWith(self.router.infer("x", "", b""), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(e.message, "model 'x' is not registered yet: workers are registering")
        e = self.assertFailsWith(self.router.infer("x", "2", b""), grpc.StatusCode.UNAVAILABLE)
        e = self.assertRaises(InferenceError, self.router.model_metadata, "x")
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)
        self.reactor.advance(0.1)
        self.assertFailsWith(self.router.infer("x", "", b""), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.assertRaises(InferenceError, self.router.model_metadata, "x").code,
                         grpc.StatusCode.NOT_FOUND)

    def test_long_name_is_shortened(self):
        self.start()
        e = self.assertFailsWith(self.router.infer("n" * 5000, "", b""), grpc.StatusCode.UNAVAILABLE)
        self.assertLess(len(e.message), 300)

    def test_ends_once_every_supervised_worker_registered(self):
        registered = []
        self.router.workers_registered = lambda: bool(registered)
        self.start()
        self.assertFailsWith(self.router.infer("x", "", b""), grpc.StatusCode.UNAVAILABLE)
        registered.append(True)
        self.assertFailsWith(self.router.infer("x", "", b""), grpc.StatusCode.NOT_FOUND)

    def test_zero_window(self):
        self.router.startup_window = 0
        self.start()
        self.assertFailsWith(self.router.infer("x", "", b""), grpc.StatusCode.NOT_FOUND)


class Recorder:
    """Metrics and access log in one: records every call the router makes."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name,) + args)


class AccountingTests(FailsWithMixin, SynchronousTestCase):
    """Every forwarded request is counted in the model's statistics, the
    metrics and the access log; the worker's timing reaches both."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.router = Router(self.reactor, pool_size=1)
        self.router.metrics = Recorder()
        self.router.access_log = Recorder()
        d = self.router.register_model("w1", "unix:///tmp/w1.sock", "m", "1")
        (self.link,) = accept_pending(self.reactor, 0)
        self.successResultOf(d)
        self.model = self.router.registry.resolve("m", "1")

    def test_success_with_timing(self):
        self.reactor.advance(100)
        d = self.router.infer("m", "1", b"req", request_id="r-1")
        self.reactor.advance(0.25)
        (request,) = self.link.frames()
        self.link.send(frame(framing.TIMING, request[1], Timing(10, 20, 30, 40, 1).pack()))
        self.link.reply(request[1], b"answer")
        self.assertEqual(self.successResultOf(d), b"answer")
        stats = self.model.stats.to_proto("m", "1")
        self.assertEqual((stats.inference_count, stats.execution_count), (1, 1))
        self.assertEqual(stats.inference_stats.success.count, 1)
        self.assertEqual(stats.inference_stats.success.ns, 250000000)
        self.assertEqual(stats.inference_stats.compute_infer.ns, 30)
        self.assertEqual(stats.last_inference, 100250)
        self.assertEqual(self.router.metrics.calls, [
            ("worker_timing", "m", "1", Timing(10, 20, 30, 40, 1)),
            ("request_finished", "m", "1", "OK", 0.25),
        ])
        self.assertEqual(self.router.access_log.calls, [("record", "m", "1", "OK", 0.25, "w1", "r-1")])

    def test_failure_is_counted_with_its_status(self):
        d = self.router.infer("m", "1", b"req")
        (request,) = self.link.frames()
        self.link.send(frame(framing.ERROR, request[1], b"bad", grpc.StatusCode.INVALID_ARGUMENT.value[0]))
        self.assertFailsWith(d, grpc.StatusCode.INVALID_ARGUMENT)
        stats = self.model.stats.to_proto("m", "1")
        self.assertEqual((stats.inference_stats.fail.count, stats.inference_stats.success.count), (1, 0))
        self.assertEqual(self.router.metrics.calls[-1][:4], ("request_finished", "m", "1", "INVALID_ARGUMENT"))

    def test_unknown_model_touches_no_account(self):
        self.assertFailsWith(self.router.infer("nope", "", b"req"), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.router.metrics.calls, [])
        self.assertEqual(self.router.access_log.calls, [])

    def test_shared_memory_table_reaches_every_worker_and_newcomers(self):
        self.router.shared_memory_changed({"r": Region("/k", 0, 64)})
        (table,) = [f for f in self.link.frames() if f[0] == framing.SHM_TABLE]
        self.assertEqual(decode_shm_table(table[3]), {"r": Region("/k", 0, 64)})
        d = self.router.register_model("w2", "unix:///tmp/w2.sock", "m", "1")
        (newcomer,) = accept_pending(self.reactor, 1)
        self.successResultOf(d)
        self.assertEqual(newcomer.frames()[0][0], framing.SHM_TABLE)
        self.router.shared_memory_changed({})
        self.assertEqual(newcomer.frames()[-1][:2], (framing.SHM_TABLE, 0))
        self.assertEqual(decode_shm_table(newcomer.frames()[-1][3]), {})


class SupervisionHookTests(SynchronousTestCase):
    """What the router tells a supervisor, and what ServerReady asks of it."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.router = Router(self.reactor, pool_size=1, heartbeat_timeout=4.0)
        self.router.startService()
        self.addCleanup(self.router.stopService)
        self.heard = []
        self.router.on_registered = lambda worker_id: self.heard.append(("registered", worker_id))
        self.router.on_evicted = lambda *args: self.heard.append(("evicted",) + args)
        d = self.router.register_model("slot-0-42", "unix:///tmp/s.sock", "m")
        accept_pending(self.reactor, 0)
        self.successResultOf(d)

    def test_registration_and_eviction_are_told(self):
        self.reactor.advance(5)
        self.assertEqual(self.heard[0], ("registered", "slot-0-42"))
        self.assertEqual(self.heard[1][:3], ("evicted", "slot-0-42", "unix:///tmp/s.sock"))
        self.assertIn("no heartbeat", self.heard[1][3])

    def test_server_ready_waits_for_every_supervised_worker(self):
        self.assertTrue(self.router.server_ready())
        self.router.workers_registered = lambda: False
        self.assertFalse(self.router.server_ready())

"""Tests for anyserve_tw.ingress.health: the statuses, their publishing, and
both servicers behind real gRPC servers (in this process)."""
import asyncio
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.ingress.health import (
    NOT_SERVING, READINESS, SERVER, SERVING, AioHealth, HealthReporter, ThreadHealth, health_statuses,
)

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class FakeModel:
    def __init__(self, name, version="", ready=True):
        self.name = name
        self.version = version
        self.ready = ready


class FakeRegistry:
    def __init__(self, router):
        self.router = router

    def models(self):
        return list(self.router.models)


class FakeRouter:
    """What health reads: the registry's models, ModelReady and ServerReady
    (a request naming no version goes to the highest version here)."""

    def __init__(self, *models):
        self.models = list(models)
        self.registry = FakeRegistry(self)

    def model_ready(self, name, version=""):
        versions = [m for m in self.models if m.name == name and (m.version == version or not version)]
        if not versions:
            return False
        return max(versions, key=lambda m: m.version).ready

    def server_ready(self):
        return all(m.ready for m in self.models)


class StatusTests(SynchronousTestCase):
    def test_no_models(self):
        self.assertEqual(health_statuses(FakeRouter()), {SERVER: True, READINESS: True})

    def test_models_and_versions(self):
        router = FakeRouter(FakeModel("add"), FakeModel("cls", "v1", ready=False), FakeModel("cls", "v2"))
        self.assertEqual(health_statuses(router), {
            SERVER: True, READINESS: False, "add": True, "cls": True, "cls/v1": False, "cls/v2": True,
        })

    def test_liveness_does_not_follow_the_models(self):
        """A model without a worker makes the server not ready, not dead."""
        statuses = health_statuses(FakeRouter(FakeModel("add", ready=False)))
        self.assertTrue(statuses[SERVER])
        self.assertFalse(statuses[READINESS])
        self.assertFalse(statuses["add"])

    def test_readiness_is_the_inference_service_name(self):
        from anyserve_tw.wire import protos

        self.assertEqual(READINESS, protos.INFERENCE_SERVICE)


class FakeHealth:
    """Records set() calls; each answers with a Deferred the test fires."""

    def __init__(self, immediate=True):
        self.immediate = immediate
        self.calls = []
        self.pending = []
        self.shut_down = None

    def set(self, service, status):
        self.calls.append((service, status))
        if self.immediate:
            return succeed(None)
        d = Deferred()
        self.pending.append(d)
        return d

    def shutdown(self):
        self.shut_down = Deferred()
        return self.shut_down


class ReporterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.add = FakeModel("add")
        self.router = FakeRouter(self.add)
        self.health = FakeHealth()
        self.reporter = HealthReporter(self.clock, self.router, self.health, interval=0.5)

    def test_everything_published_at_start_then_only_changes(self):
        self.reporter.startService()
        self.assertEqual(sorted(self.health.calls), sorted([
            (SERVER, SERVING), (READINESS, SERVING), ("add", SERVING)]))
        del self.health.calls[:]
        self.clock.advance(0.5)
        self.assertEqual(self.health.calls, [])  # nothing changed
        self.add.ready = False
        self.clock.advance(0.5)
        self.assertEqual(sorted(self.health.calls), sorted([(READINESS, NOT_SERVING), ("add", NOT_SERVING)]))
        del self.health.calls[:]
        self.router.models.append(FakeModel("cls", "v1"))
        self.add.ready = True
        self.clock.advance(0.5)
        self.assertEqual(sorted(self.health.calls), sorted([
            (READINESS, SERVING), ("add", SERVING), ("cls", SERVING), ("cls/v1", SERVING)]))

    def test_a_model_that_leaves_is_not_serving(self):
        self.reporter.startService()
        del self.health.calls[:]
        self.router.models.remove(self.add)
        self.clock.advance(0.5)
        self.assertEqual(self.health.calls, [("add", NOT_SERVING)])
        del self.health.calls[:]
        self.clock.advance(0.5)
        self.assertEqual(self.health.calls, [])

    def test_one_set_at_a_time_per_service_the_latest_wins(self):
        """While a set() for a service is unfinished, changes wait; then only
        the latest is sent, so an older status never lands last."""
        self.health.immediate = False
        self.reporter.startService()
        first = {call: d for call, d in zip(self.health.calls, self.health.pending)}
        del self.health.calls[:]
        self.add.ready = False
        self.clock.advance(0.5)
        self.add.ready = True
        self.clock.advance(0.5)
        self.add.ready = False
        self.clock.advance(0.5)
        self.assertEqual(self.health.calls, [])  # all three wait for the first sets
        first[("add", SERVING)].callback(None)
        first[(READINESS, SERVING)].callback(None)
        self.assertEqual(sorted(self.health.calls), [("add", NOT_SERVING), (READINESS, NOT_SERVING)])

    def test_no_status_change_no_resend_after_a_slow_set(self):
        self.health.immediate = False
        self.reporter.startService()
        calls = len(self.health.calls)
        for d in list(self.health.pending):
            d.callback(None)
        self.clock.advance(0.5)
        self.assertEqual(len(self.health.calls), calls)

    def test_stop_shuts_the_servicer_down_and_stops_polling(self):
        self.reporter.startService()
        d = self.reporter.stopService()
        self.assertIs(d, self.health.shut_down)
        del self.health.calls[:]
        self.add.ready = False
        self.clock.advance(5)
        self.assertEqual(self.health.calls, [])


def _health_stub(address):
    channel = grpc.insecure_channel(address)
    return channel, health_pb2_grpc.HealthStub(channel)


def _check(stub, service):
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError as e:
        return e.code()


class WatchReader:
    """Reads one Watch stream in a thread: the statuses, then how it ended."""

    def __init__(self, stub, service):
        self.statuses = []
        self.ended = None
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for response in self.call:
                with self.changed:
                    self.statuses.append(response.status)
                    self.changed.notify_all()
            ended = grpc.StatusCode.OK
        except grpc.RpcError as e:
            ended = e.code()
        with self.changed:
            self.ended = ended
            self.changed.notify_all()

    def wait(self, predicate, timeout=10):
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError("watch: %r, ended %r" % (self.statuses, self.ended))


class ThreadHealthTests(TestCase):
    """The thread front's servicer on a grpcio thread-pool server."""

    def setUp(self):
        from anyserve_tw.ingress.threadfront import build_server

        self.health = ThreadHealth(reactor)
        self.server = build_server([self.health.handler], threads=4)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.addCleanup(self.server.stop, 0)
        self.channel, self.stub = _health_stub("127.0.0.1:%d" % port)
        self.addCleanup(self.channel.close)

    @inlineCallbacks
    def test_check_set_watch_and_shutdown(self):
        yield self.health.set("add", SERVING)
        self.assertEqual((yield deferToThread(_check, self.stub, "add")), SERVING)
        self.assertEqual((yield deferToThread(_check, self.stub, "")), SERVING)
        self.assertEqual((yield deferToThread(_check, self.stub, "nope")), grpc.StatusCode.NOT_FOUND)

        watch = WatchReader(self.stub, "add")
        unknown = WatchReader(self.stub, "nope")
        yield deferToThread(watch.wait, lambda w: w.statuses == [SERVING])
        yield deferToThread(unknown.wait, lambda w: w.statuses == [SERVICE_UNKNOWN])
        yield self.health.set("add", NOT_SERVING)
        yield deferToThread(watch.wait, lambda w: w.statuses == [SERVING, NOT_SERVING])
        yield self.health.set("add", SERVING)
        yield deferToThread(watch.wait, lambda w: w.statuses[-1] == SERVING)

        yield self.health.shutdown()
        # Told NOT_SERVING, then ended cleanly: not held open until the server stops.
        yield deferToThread(watch.wait, lambda w: w.ended is not None)
        self.assertEqual((watch.statuses[-1], watch.ended), (NOT_SERVING, grpc.StatusCode.OK))
        yield deferToThread(unknown.wait, lambda w: w.ended is not None)
        self.assertEqual(unknown.ended, grpc.StatusCode.OK)
        self.assertEqual((yield deferToThread(_check, self.stub, "")), NOT_SERVING)
        self.assertEqual((yield deferToThread(_check, self.stub, "add")), NOT_SERVING)
        yield self.health.set("add", SERVING)  # ignored from now on
        self.assertEqual((yield deferToThread(_check, self.stub, "add")), NOT_SERVING)


class AioHealthTests(SynchronousTestCase):
    """The asyncio front's servicer on a grpc.aio server, all on one loop
    (this test drives the loop itself)."""

    def setUp(self):
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.clock = Clock()
        self.health = AioHealth(self.loop, self.clock)
        asyncio.set_event_loop(self.loop)
        self.addCleanup(asyncio.set_event_loop, None)
        self.server = grpc.aio.server(handlers=[self.health.handler])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.go(self.server.start())
        self.addCleanup(self.go, self.server.stop(0))
        self.channel = grpc.aio.insecure_channel("127.0.0.1:%d" % port)
        self.addCleanup(self.go, self.channel.close())
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    def go(self, awaitable, timeout=10):
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, timeout))

    def fired(self, d):
        """Run the loop until Deferred ``d`` has fired; its result."""
        self.go(d.asFuture(self.loop))
        return self.successResultOf(d) if d.called else None

    async def check(self, service):
        try:
            return (await self.stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
        except grpc.aio.AioRpcError as e:
            return e.code()

    def test_check_set_watch_and_shutdown(self):
        self.fired(self.health.set("add", SERVING))
        self.assertEqual(self.go(self.check("add")), SERVING)
        self.assertEqual(self.go(self.check("")), SERVING)
        self.assertEqual(self.go(self.check("nope")), grpc.StatusCode.NOT_FOUND)

        watch = self.stub.Watch(health_pb2.HealthCheckRequest(service="add"))
        unknown = self.stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
        self.assertEqual(self.go(watch.read()).status, SERVING)
        self.assertEqual(self.go(unknown.read()).status, SERVICE_UNKNOWN)
        self.fired(self.health.set("add", NOT_SERVING))
        self.assertEqual(self.go(watch.read()).status, NOT_SERVING)
        self.fired(self.health.set("add", SERVING))
        self.assertEqual(self.go(watch.read()).status, SERVING)

        self.fired(self.health.shutdown())
        self.assertEqual(self.go(watch.read()).status, NOT_SERVING)
        self.assertIs(self.go(watch.read()), grpc.aio.EOF)  # ended: not held open
        self.assertEqual(self.go(watch.code()), grpc.StatusCode.OK)
        self.assertIs(self.go(unknown.read()), grpc.aio.EOF)
        self.assertEqual(self.go(unknown.code()), grpc.StatusCode.OK)
        self.assertEqual(self.go(self.check("")), NOT_SERVING)
        self.fired(self.health.set("add", SERVING))  # ignored from now on
        self.assertEqual(self.go(self.check("add")), NOT_SERVING)

    def test_a_client_leaving_a_watch_is_no_error(self):
        self.fired(self.health.set("add", SERVING))
        watch = self.stub.Watch(health_pb2.HealthCheckRequest(service="add"))
        self.assertEqual(self.go(watch.read()).status, SERVING)
        watch.cancel()
        self.go(asyncio.sleep(0.05))
        self.assertEqual(self.health._watches, set())
        self.fired(self.health.shutdown())

    def test_shutdown_gives_up_on_a_stuck_watch(self):
        """A watch that never takes NOT_SERVING is cancelled after the timeout."""
        self.fired(self.health.set("add", SERVING))
        watch = self.stub.Watch(health_pb2.HealthCheckRequest(service="add"))
        self.assertEqual(self.go(watch.read()).status, SERVING)
        [stuck] = self.health._watches

        class Stuck:
            async def write(self, response):
                await asyncio.Event().wait()  # the next write never finishes
        stuck.context = Stuck()
        d = self.health.shutdown(timeout=1.0)
        self.go(asyncio.sleep(0.05))
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.go(asyncio.sleep(0.05))
        self.assertEqual(self.health._watches, set())
        self.assertIs(self.go(watch.read()), grpc.aio.EOF)

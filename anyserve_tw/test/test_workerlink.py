"""Tests for anyserve_tw.ingress.workerlink: WorkerConnection and WorkerHandle."""
import os
import shutil
import tempfile

import grpc
from twisted.internet import error, reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.wire import defaults, framing
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.payloads import Timing
from anyserve_tw.test.test_framing import frame
from anyserve_tw.ingress.workerlink import WorkerConnection, WorkerHandle, endpoint_for


# -- helpers (also used by test_router) ---------------------------------------


class ClosingTransport(StringTransport):
    """A StringTransport that behaves like a socket transport when closed.

    ``loseConnection``/``abortConnection`` mark it disconnected and deliver
    ``connectionLost`` to its protocol one reactor turn later (``callLater(0)``
    on ``clock``), as Twisted's real socket transports do.
    """

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.protocol = None
        self.lost_scheduled = False

    def _schedule_lost(self, reason):
        self.connected = False
        if not self.lost_scheduled:
            self.lost_scheduled = True
            self.clock.callLater(0, self.protocol.connectionLost, Failure(reason))

    def loseConnection(self):
        self.disconnecting = True
        self._schedule_lost(error.ConnectionDone())

    def abortConnection(self):
        self.disconnected = True
        self.disconnecting = True
        self._schedule_lost(error.ConnectionAborted())

    def peer_closes(self):
        """The worker end hangs up: connectionLost right now."""
        self.connected = False
        self.lost_scheduled = True
        self.protocol.connectionLost(Failure(error.ConnectionDone()))


def written_frames(transport):
    """Every frame written to ``transport`` as (kind, request_id, aux, payload)."""
    return [tuple(f[:3]) + (bytes(f[3]),) for f in framing.FrameDecoder().feed(transport.value())]


class FakeWorkerLink:
    """The worker end of one connection the ingress asked the reactor for."""

    def __init__(self, clock, path, factory):
        self.path = path
        self.factory = factory
        self.transport = ClosingTransport(clock)
        self.protocol = factory.buildProtocol(UNIXAddress(path))
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def frames(self):
        return written_frames(self.transport)

    def send(self, data):
        self.protocol.dataReceived(data)

    def reply(self, request_id, payload):
        self.send(frame(framing.RESPONSE, request_id, payload))


def accept_pending(clock, already):
    """Complete every recorded connectUNIX from index ``already`` on."""
    return [FakeWorkerLink(clock, path, factory) for path, factory, _t, _p in clock.unixClients[already:]]


def fail_attempt(clock, index, reason=None):
    _path, factory, _t, _p = clock.unixClients[index]
    factory.clientConnectionFailed(
        clock.connectors[index], Failure(reason or error.ConnectionRefusedError("refused"))
    )


class FakeHandle:
    """The parts of WorkerHandle a WorkerConnection uses."""

    worker_id = "w-fake"
    lost_reason = "connection closed"
    shm_table = b""

    def __init__(self):
        self.lost = []

    def _connectionLost(self, connection):
        self.lost.append(connection)


# -- WorkerConnection -----------------------------------------------------------


class FailsWithMixin:
    def assertFailsWith(self, d, code):
        """``d`` has failed with an InferenceError of ``code``; return it."""
        failure = self.failureResultOf(d, InferenceError)
        self.assertEqual(failure.value.code, code)
        return failure.value


class WorkerConnectionTests(FailsWithMixin, SynchronousTestCase):
    def connection(self, max_payload=defaults.MAX_MESSAGE_SIZE):
        self.clock = MemoryReactorClock()
        self.handle = FakeHandle()
        conn = WorkerConnection(self.handle, max_payload)
        self.transport = ClosingTransport(self.clock)
        self.transport.protocol = conn
        conn.makeConnection(self.transport)
        return conn

    def test_forward_writes_request_frames(self):
        conn = self.connection()
        conn.forward(b"first", timeout=1.5)
        conn.forward(b"", timeout=None)
        conn.forward(b"x", timeout=0.0001)
        conn.forward(b"y", timeout=10 ** 10)
        self.assertEqual(
            written_frames(self.transport),
            [
                (framing.REQUEST, 1, 1500, b"first"),
                (framing.REQUEST, 2, 0, b""),
                (framing.REQUEST, 3, 1, b"x"),  # never rounded down to "no timeout"
                (framing.REQUEST, 4, 0xFFFFFFFF, b"y"),  # clamped to u32
            ],
        )
        self.assertEqual(conn.outstanding, 4)

    def test_header_flags_and_reserved_are_zero(self):
        conn = self.connection()
        conn.forward(b"abc", timeout=2)
        length, kind, flags, reserved, request_id, aux = framing.HEADER.unpack(
            self.transport.value()[: framing.HEADER_SIZE]
        )
        self.assertEqual((length, kind, flags, reserved, request_id, aux), (3, framing.REQUEST, 0, 0, 1, 2000))

    def test_responses_out_of_order(self):
        conn = self.connection()
        ds = [conn.forward(b"req%d" % i) for i in range(1, 5)]
        self.assertEqual([f[1] for f in written_frames(self.transport)], [1, 2, 3, 4])
        # Answers come back in a different order, two of them in one read,
        # one split across reads.
        conn.dataReceived(frame(framing.RESPONSE, 3, b"three") + frame(framing.RESPONSE, 1, b"one"))
        self.assertEqual(self.successResultOf(ds[2]), b"three")
        self.assertEqual(self.successResultOf(ds[0]), b"one")
        self.assertNoResult(ds[1])
        self.assertNoResult(ds[3])
        data = frame(framing.RESPONSE, 4, b"four" * 100) + frame(framing.RESPONSE, 2, b"two")
        for i in range(0, len(data), 7):
            conn.dataReceived(data[i:i + 7])
        self.assertEqual(self.successResultOf(ds[3]), b"four" * 100)
        self.assertEqual(self.successResultOf(ds[1]), b"two")
        self.assertEqual(conn.outstanding, 0)

    def test_error_frame(self):
        conn = self.connection()
        d1 = conn.forward(b"a")
        d2 = conn.forward(b"b")
        d3 = conn.forward(b"c")
        conn.dataReceived(
            frame(framing.ERROR, 2, "bad input \u2713".encode("utf-8"),
                  grpc.StatusCode.INVALID_ARGUMENT.value[0])
        )
        e = self.assertFailsWith(d2, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(e.message, "bad input \u2713")
        self.assertNoResult(d1)
        conn.dataReceived(frame(framing.ERROR, 1, b"oom", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]))
        self.assertEqual(self.assertFailsWith(d1, grpc.StatusCode.RESOURCE_EXHAUSTED).message, "oom")
        conn.dataReceived(frame(framing.ERROR, 3, b"\xff?", 9999))  # unknown code, bad UTF-8
        e = self.assertFailsWith(d3, grpc.StatusCode.UNKNOWN)
        self.assertEqual(e.message, "\ufffd?")
        self.assertFalse(self.transport.disconnecting)

    def test_timing_and_partials_reach_the_listener(self):
        """TIMING goes to the listener of any request; PARTIAL responses only
        to a stream's; the request stays open until its RESPONSE."""
        conn = self.connection()
        heard = []

        class Listener:
            def timing(self, timing):
                heard.append(("timing", timing))

            def partial(self, payload):
                heard.append(("partial", payload))

        d = conn.forward(b"s", kind=framing.STREAM_REQUEST, listener=Listener())
        timing = Timing(1, 2, 3, 4, 1)
        conn.dataReceived(frame(framing.PARTIAL, 1, b"one") + frame(framing.PARTIAL, 1, b"two"))
        self.assertNoResult(d)
        conn.dataReceived(frame(framing.TIMING, 1, timing.pack()) + frame(framing.RESPONSE, 1, b""))
        self.assertEqual(self.successResultOf(d), b"")
        self.assertEqual(heard, [("partial", b"one"), ("partial", b"two"), ("timing", timing)])
        self.assertEqual(written_frames(self.transport), [(framing.STREAM_REQUEST, 1, 0, b"s")])

    def test_http_response_carries_its_json_length(self):
        conn = self.connection()
        d = conn.forward([b"head", b"body"], kind=framing.HTTP_REQUEST)
        conn.dataReceived(frame(framing.RESPONSE, 1, b'{"a":1}BIN', 7))
        self.assertEqual(self.successResultOf(d), (7, b'{"a":1}BIN'))
        self.assertEqual(written_frames(self.transport), [(framing.HTTP_REQUEST, 1, 0, b"headbody")])

    def test_malformed_timing_fails_the_request_and_closes(self):
        conn = self.connection()

        class Listener:
            def timing(self, timing):
                raise AssertionError("not reached")

        d = conn.forward(b"a", listener=Listener())
        other = conn.forward(b"b")
        conn.dataReceived(frame(framing.TIMING, 1, b"short"))
        self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(other)  # failed when the connection is lost

    def test_shm_table_goes_first_on_a_new_connection(self):
        self.clock = MemoryReactorClock()
        handle = FakeHandle()
        handle.shm_table = b'{"r": ["/k", 0, 8]}'
        conn = WorkerConnection(handle, defaults.MAX_MESSAGE_SIZE)
        transport = ClosingTransport(self.clock)
        transport.protocol = conn
        conn.makeConnection(transport)
        conn.forward(b"a")
        self.assertEqual(written_frames(transport),
                         [(framing.SHM_TABLE, 0, 0, b'{"r": ["/k", 0, 8]}'), (framing.REQUEST, 1, 0, b"a")])

    def test_cancel_sends_cancel_and_ignores_late_response(self):
        conn = self.connection()
        d1 = conn.forward(b"a")
        d2 = conn.forward(b"b")
        self.transport.clear()
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertEqual(written_frames(self.transport), [(framing.CANCEL, 1, 0, b"")])
        self.assertEqual(conn.outstanding, 1)
        # The worker had already answered; the late answer is dropped quietly.
        conn.dataReceived(frame(framing.RESPONSE, 1, b"late") + frame(framing.RESPONSE, 2, b"b!"))
        self.assertEqual(self.successResultOf(d2), b"b!")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(conn.outstanding, 0)
        # Cancelling an answered request sends nothing.
        self.transport.clear()
        d2.cancel()
        self.assertEqual(self.transport.value(), b"")

    def test_cancel_after_disconnect_sends_nothing(self):
        conn = self.connection()
        d = conn.forward(b"a")
        self.transport.connected = False  # closing, connectionLost not yet delivered
        self.transport.clear()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.transport.value(), b"")

    def test_oversize_response_fails_only_that_request(self):
        conn = self.connection(max_payload=16)
        d1 = conn.forward(b"a")
        d2 = conn.forward(b"b")
        d3 = conn.forward(b"c")
        data = (
            frame(framing.RESPONSE, 1, b"z" * 100)
            + frame(framing.RESPONSE, 2, b"fits")
            + frame(framing.RESPONSE, 3, b"q" * 16)
        )
        for i in range(0, len(data), 9):  # oversize payload spread over many reads
            conn.dataReceived(data[i:i + 9])
        e = self.assertFailsWith(d1, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("100", e.message)
        self.assertEqual(self.successResultOf(d2), b"fits")
        self.assertEqual(self.successResultOf(d3), b"q" * 16)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(conn.outstanding, 0)

    def test_unexpected_frame_type_fails_request_and_closes(self):
        conn = self.connection()
        d = conn.forward(b"a")
        conn.dataReceived(frame(framing.REQUEST, 1, b"?"))
        self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_fails_pending(self):
        conn = self.connection()
        ds = [conn.forward(b"%d" % i) for i in range(3)]
        self.transport.peer_closes()
        for d in ds:
            self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.handle.lost, [conn])
        self.assertEqual(conn.outstanding, 0)


# -- WorkerHandle ---------------------------------------------------------------


class WorkerHandleTests(FailsWithMixin, SynchronousTestCase):
    address = "unix:///tmp/anyserve-test-w1.sock"

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.lost = []

    def handle(self, pool_size=2, address=None, **kw):
        return WorkerHandle(self.reactor, "w1", address or self.address, self.lost.append,
                            pool_size=pool_size, **kw)

    def connected_handle(self, pool_size=2):
        handle = self.handle(pool_size)
        d = handle.connect()
        links = accept_pending(self.reactor, 0)
        self.assertIs(self.successResultOf(d), handle)
        return handle, links

    def test_connect_opens_pool_and_fires_when_all_up(self):
        handle = self.handle(pool_size=3, connect_timeout=7)
        d = handle.connect()
        self.assertEqual(
            [(path, timeout) for path, _f, timeout, _p in self.reactor.unixClients],
            [("/tmp/anyserve-test-w1.sock", 7)] * 3,
        )
        again = handle.connect()  # a concurrent caller shares the attempt
        self.assertEqual(len(self.reactor.unixClients), 3)
        links = []
        for i in range(3):
            self.assertNoResult(d)
            self.assertNoResult(again)
            links.append(FakeWorkerLink(self.reactor, "/tmp/anyserve-test-w1.sock",
                                        self.reactor.unixClients[i][1]))
        self.assertIs(self.successResultOf(d), handle)
        self.assertIs(self.successResultOf(again), handle)
        # Once up, connect() answers at once without reconnecting.
        self.assertIs(self.successResultOf(handle.connect()), handle)
        self.assertEqual(len(self.reactor.unixClients), 3)
        self.assertFalse(handle.closed)
        self.assertEqual(self.lost, [])

    def test_forward_before_connected_is_unavailable(self):
        handle = self.handle()
        e = self.assertRaises(InferenceError, handle.forward, b"x")
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)

    def test_connect_failure_is_unavailable(self):
        handle = self.handle(pool_size=2)
        d = handle.connect()
        first = FakeWorkerLink(self.reactor, "p", self.reactor.unixClients[0][1])
        self.assertNoResult(d)
        fail_attempt(self.reactor, 1, error.ConnectionRefusedError("nobody home"))
        e = self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertIn(self.address, e.message)
        self.assertIn("nobody home", e.message)
        self.assertTrue(handle.closed)
        # The connection that did come up is not left open.
        self.assertTrue(first.transport.disconnecting)
        # A later connect() fails at once, without a new attempt.
        self.assertFailsWith(handle.connect(), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(len(self.reactor.unixClients), 2)
        e = self.assertRaises(InferenceError, handle.forward, b"x")
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)

    def test_connection_arriving_after_failure_is_closed(self):
        # Attempt 0 fails first; attempt 1 completes afterwards.  Nobody will
        # ever use or close that late connection, so the handle must.
        handle = self.handle(pool_size=2)
        d = handle.connect()
        fail_attempt(self.reactor, 0)
        self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        late = FakeWorkerLink(self.reactor, "p", self.reactor.unixClients[1][1])
        self.assertTrue(late.transport.disconnecting, "connection made after the pool failed was leaked")

    def test_connection_arriving_after_close_is_closed(self):
        # The router drops a worker (eviction, re-registration elsewhere)
        # while its pool is still connecting.
        handle = self.handle(pool_size=2)
        d = handle.connect()
        handle.close("evicted")
        links = accept_pending(self.reactor, 0)
        self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        for link in links:
            self.assertTrue(link.transport.disconnecting, "connection made after close() was leaked")

    def test_bad_address_is_rejected_before_any_connect(self):
        """An unsupported address fails when the handle is made, so no handle
        (and no waiter) is ever left behind for it."""
        with self.assertRaises(InferenceError) as caught:
            self.handle(address="tcp://127.0.0.1:9000")
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("tcp://127.0.0.1:9000", caught.exception.message)
        self.assertEqual(self.reactor.unixClients, [])

    def test_forward_picks_least_outstanding_connection(self):
        handle, links = self.connected_handle(pool_size=3)
        ds = [handle.forward(b"r%d" % i) for i in range(3)]
        self.assertEqual([len(link.frames()) for link in links], [1, 1, 1])
        self.assertEqual(handle.outstanding, 3)
        # The second connection's request is answered: it is now the idlest.
        request_id = links[1].frames()[0][1]
        links[1].reply(request_id, b"done")
        self.assertEqual(self.successResultOf(ds[1]), b"done")
        handle.forward(b"next")
        self.assertEqual([len(link.frames()) for link in links], [1, 2, 1])
        self.assertEqual(links[1].frames()[1][3], b"next")
        outstanding = lambda: [link.protocol._wrappedProtocol.outstanding for link in links]
        self.assertEqual(outstanding(), [1, 1, 1])
        handle.forward(b"again")  # a tie: the first of the tied ones
        self.assertEqual(outstanding(), [2, 1, 1])
        handle.forward(b"more")
        self.assertEqual(outstanding(), [2, 2, 1])
        handle.forward(b"last")
        self.assertEqual(outstanding(), [2, 2, 2])
        self.assertEqual([f[3] for f in links[2].frames()], [b"r2", b"last"])
        self.assertEqual(handle.outstanding, 6)

    def test_connection_lost_fails_all_and_calls_on_lost_once(self):
        handle, links = self.connected_handle(pool_size=2)
        ds = [handle.forward(b"r%d" % i, timeout=1) for i in range(4)]
        self.assertEqual([len(link.frames()) for link in links], [2, 2])
        links[0].transport.peer_closes()
        for d in ds[0::2]:  # those on the lost connection, at once
            self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertTrue(handle.closed)
        self.assertTrue(links[1].transport.disconnected)  # the sibling is aborted
        self.reactor.advance(0)  # ... and its connectionLost arrives
        for d in ds[1::2]:
            self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(self.lost, [handle])
        self.assertEqual(handle.outstanding, 0)
        e = self.assertRaises(InferenceError, handle.forward, b"x")
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)
        self.assertFailsWith(handle.connect(), grpc.StatusCode.UNAVAILABLE)

    def test_close_fails_in_flight_with_reason(self):
        handle, links = self.connected_handle(pool_size=2)
        d = handle.forward(b"x")
        handle.close("no heartbeat for 12.0s")
        self.assertTrue(all(link.transport.disconnected for link in links))
        self.reactor.advance(0)
        e = self.assertFailsWith(d, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("no heartbeat", e.message)
        self.assertEqual(self.lost, [handle])


class EndpointTests(SynchronousTestCase):
    def test_unix_address(self):
        clock = MemoryReactorClock()
        endpoint = endpoint_for(clock, "unix:///run/anyserve/w.sock", timeout=3)
        endpoint.connect(Factory.forProtocol(framing.FramedProtocol))
        self.assertEqual(clock.unixClients[0][0], "/run/anyserve/w.sock")
        self.assertEqual(clock.unixClients[0][2], 3)

    def test_rejects_other_addresses(self):
        for address in ("tcp://127.0.0.1:9000", "127.0.0.1:9000", "/tmp/w.sock", "unix://", "unix:/tmp/w.sock", ""):
            e = self.assertRaises(InferenceError, endpoint_for, MemoryReactorClock(), address)
            self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT, address)


# -- over a real Unix socket ------------------------------------------------------


class EchoWorker(framing.FramedProtocol):
    """Answers every REQUEST with its own payload."""

    def connectionMade(self):
        super().connectionMade()
        self.lost = Deferred()
        self.requests = 0
        self.factory.connections.append(self)

    def frameReceived(self, kind, request_id, aux, payload):
        if kind == framing.REQUEST:
            self.requests += 1
            self.sendFrame(framing.RESPONSE, request_id, payload)

    def connectionLost(self, reason):
        self.lost.callback(None)


class RealSocketTests(TestCase):
    @inlineCallbacks
    def test_forward_large_payload(self):
        directory = tempfile.mkdtemp(dir="/tmp", prefix="asw")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "w.sock")
        factory = Factory.forProtocol(EchoWorker)
        factory.connections = []
        port = reactor.listenUNIX(path, factory)
        self.addCleanup(port.stopListening)

        gone = Deferred()
        handle = WorkerHandle(reactor, "w1", "unix://" + path, gone.callback, pool_size=2)
        self.assertIs((yield handle.connect()), handle)
        payload = os.urandom(3 * 1024 * 1024)
        small = [handle.forward(b"small-%d" % i, timeout=10) for i in range(3)]
        result = yield handle.forward(payload, timeout=10)
        self.assertEqual(len(result), len(payload))
        self.assertTrue(result == payload)
        self.assertEqual((yield gatherResults(small)), [b"small-%d" % i for i in range(3)])
        # Least-busy choice spreads the four requests over both connections.
        self.assertEqual(sorted(c.requests for c in factory.connections), [2, 2])

        handle.close("test over")
        self.assertIs((yield gone), handle)
        yield gatherResults([c.lost for c in factory.connections])


class NetworkEndpointTests(SynchronousTestCase):
    def test_tcp_only_when_insecure(self):
        e = self.assertRaises(InferenceError, endpoint_for, MemoryReactorClock(), "tcp://10.0.0.5:7001")
        self.assertIn("--insecure-workers", e.message)
        clock = MemoryReactorClock()
        endpoint_for(clock, "tcp://10.0.0.5:7001", timeout=3, insecure_tcp=True).connect(
            Factory.forProtocol(framing.FramedProtocol))
        self.assertEqual(clock.tcpClients[0][1], 7001)

    def test_tls_needs_the_ingress_identity(self):
        e = self.assertRaises(InferenceError, endpoint_for, MemoryReactorClock(), "tls://10.0.0.5:7001")
        self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("--tls-ca", e.message)

    def test_malformed_network_addresses(self):
        for address in ("tls://10.0.0.5", "tcp://:7001", "tls://h:port", "tls://h:7001/path", "udp://h:1"):
            e = self.assertRaises(InferenceError, endpoint_for, MemoryReactorClock(), address,
                                  insecure_tcp=True)
            self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT, address)


class NetworkReconnectTests(TestCase):
    """A tcp:// worker (the reconnect logic is the same for tls://) whose
    connections the test drops from the worker's side."""

    def setUp(self):
        self.factory = Factory.forProtocol(EchoWorker)
        self.factory.connections = []
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(lambda: self.port.stopListening() if self.port.connected else None)
        self.gone = Deferred()
        self.handle = WorkerHandle(reactor, "w1", "tcp://127.0.0.1:%d" % self.port.getHost().port,
                                   self.gone.callback, pool_size=2, insecure_tcp=True, reconnect_window=0.5)
        self.addCleanup(self.handle.close, "test over")

    def wait(self, seconds):
        from twisted.internet.task import deferLater

        return deferLater(reactor, seconds, lambda: None)

    @inlineCallbacks
    def test_dropped_connection_reconnected_worker_kept(self):
        """One connection dropped: its request in flight fails, the worker
        keeps its other connection (and the request on it) and gets its
        second connection back."""
        yield self.handle.connect()
        for connection in self.factory.connections:
            connection.frameReceived = lambda *args: None  # holds what it is sent
        outcomes = []
        held = [self.handle.forward(b"held") for _ in range(2)]  # one on each connection
        for d in held:
            d.addErrback(lambda f: getattr(f.value, "code", f.value)).addCallback(outcomes.append)
        self.factory.connections[0].transport.abortConnection()
        for _ in range(100):
            if len(self.handle._connections) == 2 and outcomes:
                break
            yield self.wait(0.02)
        self.assertEqual(outcomes, [grpc.StatusCode.UNAVAILABLE])
        self.assertEqual(len(self.handle._connections), 2)
        self.assertEqual(len(self.factory.connections), 3)
        self.assertEqual((yield self.handle.forward(b"new", timeout=5)), b"new")  # the least busy: the new one
        self.assertFalse(self.gone.called)
        held[0].cancel()
        held[1].cancel()  # the one still held (the failed one is done)

    @inlineCallbacks
    def test_small_frames_go_out_at_once(self):
        """TCP_NODELAY: a request is not held back behind an unacknowledged one."""
        import socket

        yield self.handle.connect()
        for connection in self.handle._connections:
            sock = connection.transport.getHandle()
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @inlineCallbacks
    def test_worker_given_up_when_a_connection_cannot_come_back(self):
        yield self.handle.connect()
        yield self.port.stopListening()
        self.factory.connections[0].transport.abortConnection()
        self.assertIs((yield self.gone), self.handle)
        self.assertTrue(self.handle.closed)
        self.assertIn("could not reconnect", self.handle.lost_reason)

    @inlineCallbacks
    def test_worker_given_up_at_once_when_every_connection_drops(self):
        """No connection left: the worker leaves routing now (its next
        heartbeat registers it again if it lives)."""
        yield self.handle.connect()
        for connection in self.factory.connections:
            connection.transport.abortConnection()
        self.assertIs((yield self.gone), self.handle)


class SilentTlsServerTests(TestCase):
    @inlineCallbacks
    def test_tls_connection_without_the_workers_hello_times_out(self):
        """A TLS server that accepts the handshake but is no worker (never
        says HELLO) fails the connect after connect_timeout, not never."""
        import trustme
        from twisted.internet import ssl

        from anyserve_tw.wire.tlsconfig import MutualTls

        ca = trustme.CA()
        ingress, server = ca.issue_cert("ingress.test"), ca.issue_cert("127.0.0.1")
        tls = MutualTls(ca.cert_pem.bytes(), ingress.cert_chain_pems[0].bytes(), ingress.private_key_pem.bytes())
        served = MutualTls(ca.cert_pem.bytes(), server.cert_chain_pems[0].bytes(), server.private_key_pem.bytes())
        factory = Factory.forProtocol(framing.FramedProtocol)
        port = reactor.listenSSL(0, factory, served.server_options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        lost = []
        handle = WorkerHandle(reactor, "w1", "tls://127.0.0.1:%d" % port.getHost().port, lost.append,
                              connect_timeout=0.3, tls=tls)
        e = yield self.assertFailure(handle.connect(), InferenceError)
        self.assertEqual(e.code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("timed out", e.message.lower())
        self.assertEqual(lost, [])

"""Tests for anyserve_tw.ingress.backpressure: the count of unread response
bytes, its caps per client and in all, and the sweep of stuck calls; and
the fronts' use of it (grpc.aio servicer, on a real loop, fake context)."""
import asyncio

import grpc
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.aiofront import RequestTimeouts, aio_servicer
from anyserve_tw.ingress.backpressure import UnreadBytes, keepalive_options
from anyserve_tw.ingress.inference import InferenceAPI
from anyserve_tw.test.test_aiofront import Aborted, FakeAioContext, LoopTestCase
from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError

A, B = "ipv4:127.0.0.1:1000", "ipv4:127.0.0.1:2000"


class UnreadBytesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.unread = UnreadBytes(self.clock, per_client=100, total=150, timeout=30, interval=1)

    def assertRefused(self, peer):
        error = self.assertRaises(InferenceError, self.unread.admit, peer)
        self.assertEqual(error.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return error

    def test_per_client_cap(self):
        hold = self.unread.open(A)
        self.unread.take(hold, 60)
        self.unread.admit(A)
        self.unread.take(hold, 60)  # may go past by one response
        self.assertEqual(self.unread.unread(A), 120)
        self.assertIn("has not read", self.assertRefused(A).message)
        self.assertRaises(InferenceError, self.unread.take, self.unread.open(A), 1)
        self.unread.admit(B)  # another client is not held back
        self.unread.give(hold, 60)
        self.unread.admit(A)

    def test_total_cap(self):
        """Past the total cap, the connections holding a large share are
        refused and the others served; past twice the cap, everyone is."""
        self.unread.take(self.unread.open(A), 90)
        self.unread.take(self.unread.open(B), 90)
        self.assertIn("its clients have not read", self.assertRefused(A).message)
        self.assertRefused(B)
        fresh = "ipv4:127.0.0.1:3000"
        self.unread.admit(fresh)
        self.unread.take(self.unread.open(fresh), 11)  # under 100/8
        self.unread.admit(fresh)
        self.unread.take(self.unread.open("ipv4:127.0.0.1:3001"), 110)
        self.assertEqual(self.unread.total, 301)
        self.assertIn("its clients have not read", self.assertRefused("ipv4:127.0.0.1:3002").message)

    def test_close_releases_everything_once(self):
        hold = self.unread.open(A)
        self.unread.take(hold, 70)
        self.unread.close(hold)
        self.unread.close(hold)
        self.assertEqual((self.unread.total, self.unread.by_peer), (0, {}))
        self.unread.take(hold, 10)  # a late response of an ended call counts nothing
        self.assertEqual(self.unread.total, 0)

    def test_sweep_cancels_calls_without_progress(self):
        cancelled = []
        stuck = self.unread.open(A, lambda: cancelled.append("stuck"))
        moving = self.unread.open(B, lambda: cancelled.append("moving"))
        self.unread.take(stuck, 10)
        self.unread.take(moving, 10)
        self.unread.take(moving, 10)
        self.clock.advance(20)
        self.unread.give(moving, 10)  # progress
        self.clock.advance(10)
        self.assertEqual(self.unread.sweep(), 1)
        self.assertEqual(cancelled, ["stuck"])
        self.assertEqual(self.unread.sweep(), 0)  # cancelled once only
        self.unread.close(stuck)  # what the cancelled call's end does
        self.unread.close(moving)
        self.assertEqual((self.unread.total, self.unread.by_peer, self.unread._holds), (0, {}, set()))

    def test_first_admission_starts_one_sweep_a_second(self):
        cancelled = []
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.unread.admit(B)
        self.addCleanup(self.unread.stop)
        hold = self.unread.open(A, lambda: cancelled.append(1))
        self.unread.take(hold, 10)
        self.unread.admit(B)
        self.unread.take(self.unread.open(B), 10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the sweep's, nothing per call
        self.clock.pump([1] * 29)
        self.assertEqual(cancelled, [])
        self.clock.advance(1)
        self.assertEqual(cancelled, [1])

    def test_keepalive_within_the_timeout(self):
        options = dict(keepalive_options(30))
        self.assertEqual(options["grpc.keepalive_time_ms"] + options["grpc.keepalive_timeout_ms"], 30000)


class StubRouter:
    def __init__(self):
        self.answers = []

    def infer(self, name, version, payload, timeout, kind=None, partial=None, request_id=""):
        d = Deferred()
        self.answers.append(d)
        return d

    def server_ready(self):
        return True


class AioCountingTests(LoopTestCase):
    def setUp(self):
        super().setUp()
        self.router = StubRouter()
        self.router.reactor = self.clock
        self.timeouts = RequestTimeouts(self.clock, interval=1.0)
        self.unread = UnreadBytes(self.clock, per_client=100, total=1000)
        self.servicer = aio_servicer(InferenceAPI(self.router, request_timeout=600.0), self.timeouts,
                                     self.unread)
        self.request = protos.inference.ModelInferRequest(model_name="add").SerializeToString()

    def test_unary_response_counted_until_delivered(self):
        context = FakeAioContext(remaining=5.0, peer=A)
        task = self.start(self.servicer.ModelInfer(self.request, context))
        self.router.answers[0].callback(b"x" * 80)
        self.assertEqual(self.outcome(task), b"x" * 80)
        self.assertEqual(self.unread.unread(A), 80)
        context.finish()
        self.assertEqual(self.unread.unread(A), 0)

    def test_client_over_its_cap_is_refused_at_once(self):
        first = FakeAioContext(remaining=5.0, peer=A)
        task = self.start(self.servicer.ModelInfer(self.request, first))
        self.router.answers[0].callback(b"x" * 120)
        self.outcome(task)
        task = self.start(self.servicer.ModelInfer(self.request, FakeAioContext(remaining=5.0, peer=A)))
        error = self.outcome(task)
        self.assertIsInstance(error, Aborted)
        self.assertEqual(error.args[0], grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(len(self.router.answers), 1)  # never forwarded
        other = self.start(self.servicer.ModelInfer(self.request, FakeAioContext(remaining=5.0, peer=B)))
        self.assertEqual(len(self.router.answers), 2)  # another client is
        first.finish()
        again = self.start(self.servicer.ModelInfer(self.request, FakeAioContext(remaining=5.0, peer=A)))
        self.assertEqual(len(self.router.answers), 3)
        for answer in self.router.answers[1:]:
            answer.callback(b"")
        self.assertEqual((self.outcome(other), self.outcome(again)), (b"", b""))

    def test_stream_swept_while_grpc_writes(self):
        """What grpc.aio does with a stream whose client reads nothing: the
        RPC's task awaits the write of the first response; the sweep
        cancels the task; its done callbacks end the stream and release
        every byte it held, queued ones included."""
        self.unread.start()
        self.addCleanup(self.unread.stop)
        context = FakeAioContext(peer=A)
        blocked = []

        async def serve():  # grpc.aio's loop over the handler's responses
            async for response in self.servicer.ModelStreamInfer(_requests(self.request, self.request), context):
                blocked.append(response)
                await asyncio.Event().wait()  # the write never completes

        task = self.loop.create_task(serve())
        task.add_done_callback(lambda _: context.finish())
        self.spin()
        self.assertEqual(len(self.router.answers), 2)
        self.router.answers[0].callback(b"a" * 30)
        self.router.answers[1].callback(b"b" * 40)
        self.spin()
        self.assertEqual(len(blocked), 1)
        self.assertGreaterEqual(self.unread.unread(A), 70)  # the one being written and the one queued
        self.clock.advance(30)
        self.spin()
        self.assertTrue(task.cancelled())
        self.assertEqual(self.unread.unread(A), 0)


async def _requests(*items):
    for item in items:
        yield item
    await asyncio.Event().wait()

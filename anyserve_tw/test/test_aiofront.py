"""Tests for anyserve_tw.ingress.aiofront: a Deferred awaited by an RPC's
coroutine is bounded by the deadline, cancelled with the RPC, and its failure
becomes the RPC's status.  Run on a real asyncio loop with a fake clock."""
import asyncio

import grpc
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.aiofront import RequestTimeouts, aio_servicer, settle
from anyserve_tw.ingress.inference import InferenceAPI
from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError, not_found

_v2 = protos.inference


class Aborted(Exception):
    pass


class FakeAioContext:
    """The part of grpc.aio.ServicerContext the front uses."""

    def __init__(self, remaining=None, peer="ipv4:127.0.0.1:5000"):
        self.remaining = remaining
        self._peer = peer
        self.done_callbacks = []

    def time_remaining(self):
        return self.remaining

    def peer(self):
        return self._peer

    def add_done_callback(self, callback):
        self.done_callbacks.append(callback)

    def finish(self):
        """gRPC delivered the response (or the call ended)."""
        for callback in self.done_callbacks:
            callback(self)

    async def abort(self, code, message):
        raise Aborted(code, message)


class Cancellable:
    def __init__(self):
        self.cancelled = 0
        self.deferred = Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))


class LoopTestCase(SynchronousTestCase):
    def setUp(self):
        self.loop = asyncio.new_event_loop()
        self.addCleanup(self.loop.close)
        self.clock = Clock()

    def start(self, coroutine):
        """Start ``coroutine`` as a task and let it run until it waits."""
        task = self.loop.create_task(coroutine)
        self.spin()
        return task

    def spin(self):
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.run_until_complete(asyncio.sleep(0))

    def outcome(self, task):
        self.spin()
        self.assertTrue(task.done(), "the coroutine is still waiting")
        return task.result() if task.exception() is None else task.exception()


class SettleTests(LoopTestCase):
    def setUp(self):
        super().setUp()
        self.timeouts = RequestTimeouts(self.clock, interval=1.0)
        self.timeouts.start()
        self.addCleanup(self.timeouts.stop)

    def test_fired_deferred(self):
        task = self.start(settle(succeed(b"answer"), self.timeouts, 5))
        self.assertEqual(self.outcome(task), b"answer")
        self.assertEqual(len(self.timeouts), 0)

    def test_later_result(self):
        op = Cancellable()
        task = self.start(settle(op.deferred, self.timeouts, 5))
        self.assertEqual(len(self.timeouts), 1)
        self.assertFalse(task.done())
        op.deferred.callback(b"late")
        self.assertEqual(self.outcome(task), b"late")
        self.assertEqual(op.cancelled, 0)
        self.assertEqual(len(self.timeouts), 0)

    def test_failure_keeps_its_status(self):
        task = self.start(settle(fail(not_found("nope")), self.timeouts, 5))
        error = self.outcome(task)
        self.assertIsInstance(error, InferenceError)
        self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)

    def test_timeout_cancels_and_is_deadline_exceeded(self):
        """The sweep bounds a request to within its interval, with no timer of its own."""
        op = Cancellable()
        task = self.start(settle(op.deferred, self.timeouts, 5))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the sweep's, nothing per request
        self.clock.advance(4.9)
        self.spin()
        self.assertFalse(task.done())
        self.clock.advance(1.0)
        error = self.outcome(task)
        self.assertEqual(op.cancelled, 1)  # the worker is told to drop it
        self.assertEqual(error.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual(len(self.timeouts), 0)

    def test_without_timeouts_only_the_rpc_bounds_it(self):
        op = Cancellable()
        task = self.start(settle(op.deferred))
        self.clock.advance(10000)
        self.spin()
        self.assertFalse(task.done())
        task.cancel()  # what grpc.aio does when the client's deadline passes
        self.spin()
        self.assertEqual(op.cancelled, 1)

    def test_rpc_cancelled_cancels_the_deferred(self):
        op = Cancellable()
        task = self.start(settle(op.deferred, self.timeouts, 5))
        task.cancel()
        self.spin()
        self.assertTrue(task.cancelled())
        self.assertEqual(op.cancelled, 1)
        self.assertEqual(len(self.timeouts), 0)  # no longer watched


class StubRouter:
    def __init__(self):
        self.forwarded = []
        self.answer = Deferred()

    def infer(self, name, version, payload, timeout, request_id=""):
        self.forwarded.append((name, version, payload, timeout))
        if name == "missing":
            return fail(not_found(name))
        if name == "broken":
            raise KeyError("a bug")
        return self.answer

    def server_ready(self):
        return True


class ServicerTests(LoopTestCase):
    def setUp(self):
        super().setUp()
        self.router = StubRouter()
        self.timeouts = RequestTimeouts(self.clock, interval=1.0)
        self.timeouts.start()
        self.addCleanup(self.timeouts.stop)
        self.servicer = aio_servicer(InferenceAPI(self.router, request_timeout=600.0), self.timeouts)

    def test_model_infer_forwards_bytes_with_the_deadline(self):
        request = _v2.ModelInferRequest(model_name="add", model_version="2").SerializeToString()
        task = self.start(self.servicer.ModelInfer(request, FakeAioContext(remaining=3.0)))
        self.assertEqual(self.router.forwarded, [("add", "2", request, 3.0)])
        self.assertEqual(len(self.timeouts), 0)  # grpc.aio enforces a client's own deadline
        self.router.answer.callback(b"response bytes")
        self.assertEqual(self.outcome(task), b"response bytes")

    def test_no_client_deadline_uses_the_request_timeout(self):
        request = _v2.ModelInferRequest(model_name="add").SerializeToString()
        task = self.start(self.servicer.ModelInfer(request, FakeAioContext(remaining=9.2e18)))
        self.assertEqual(self.router.forwarded[0][3], 600.0)
        self.clock.advance(599.5)
        self.spin()
        self.assertFalse(task.done())
        self.clock.advance(1.0)
        self.assertEqual(self.outcome(task).args[0], grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_statuses_abort_the_rpc(self):
        missing = _v2.ModelInferRequest(model_name="missing").SerializeToString()
        task = self.start(self.servicer.ModelInfer(missing, FakeAioContext()))
        self.assertEqual(self.outcome(task).args[0], grpc.StatusCode.NOT_FOUND)
        task = self.start(self.servicer.ModelInfer(b"\xff\xff", FakeAioContext()))
        self.assertEqual(self.outcome(task).args[0], grpc.StatusCode.INVALID_ARGUMENT)

    def test_unexpected_errors_are_internal(self):
        broken = _v2.ModelInferRequest(model_name="broken").SerializeToString()
        task = self.start(self.servicer.ModelInfer(broken, FakeAioContext()))
        code, message = self.outcome(task).args
        self.assertEqual(code, grpc.StatusCode.INTERNAL)
        self.assertIn("a bug", message)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_registry_rpcs_answer_without_waiting(self):
        task = self.start(self.servicer.ServerReady(_v2.ServerReadyRequest(), FakeAioContext()))
        self.assertEqual(self.outcome(task), _v2.ServerReadyResponse(ready=True))
        task = self.start(self.servicer.ServerLive(_v2.ServerLiveRequest(), FakeAioContext()))
        self.assertEqual(self.outcome(task), _v2.ServerLiveResponse(live=True))

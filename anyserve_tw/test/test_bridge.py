"""Tests for anyserve_tw.ingress.bridge (run_bounded, ReactorBridge) and the failure-to-status mapping it uses."""
import queue
import threading
import time

import grpc
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.bridge import ReactorBridge, run_bounded
from anyserve_tw.wire.errors import as_inference_error
from anyserve_tw.wire.errors import InferenceError

WAIT = 10  # seconds: a bound on waits for the other thread, never reached when all is well


class ThreadedClock(Clock):
    """A Clock plus callFromThread, whose calls queue up for the test to run."""

    def __init__(self):
        super().__init__()
        self.from_threads = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.put((f, args, kwargs))

    def run_one(self, timeout=WAIT):
        """Wait for the next call from the thread and run it, as the reactor would."""
        f, args, kwargs = self.from_threads.get(timeout=timeout)
        f(*args, **kwargs)

    def run_pending(self):
        """Run every call already queued; how many there were."""
        count = 0
        while True:
            try:
                f, args, kwargs = self.from_threads.get_nowait()
            except queue.Empty:
                return count
            f(*args, **kwargs)
            count += 1


class Cancellable:
    """A reactor-side operation: a Deferred that records its cancellation."""

    def __init__(self):
        self.cancelled = 0
        self.calls = []
        self.deferred = Deferred(self._canceller)

    def _canceller(self, d):
        self.cancelled += 1

    def __call__(self, *args):
        self.calls.append(args)
        return self.deferred


class FakeContext:
    """The part of grpc.ServicerContext the bridge uses."""

    def __init__(self, active=True):
        self.active = active
        self.callbacks = []
        self.added = threading.Event()

    def add_callback(self, callback):
        registered = self.active
        if registered:
            self.callbacks.append(callback)
        self.added.set()
        return registered

    def is_active(self):
        return self.active

    def terminate(self):
        """The RPC ends (completed or cancelled by the client): run its callbacks."""
        self.active = False
        for callback in self.callbacks:
            callback()


class InThread:
    """bridge.call(...) run in a thread of its own, as a gRPC thread would."""

    def __init__(self, bridge, *args, **kwargs):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(bridge, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, bridge, args, kwargs):
        try:
            self.result = bridge.call(*args, **kwargs)
        except BaseException as e:
            self.error = e

    def join(self, case):
        self.thread.join(WAIT)
        case.assertFalse(self.thread.is_alive(), "bridge.call did not return")


class RunBoundedTests(SynchronousTestCase):
    def test_timeout_cancels_and_fails(self):
        clock = Clock()
        op = Cancellable()
        d = run_bounded(clock, 5, op, "a", 1)
        self.assertEqual(op.calls, [("a", 1)])
        clock.advance(4.9)
        self.assertNoResult(d)
        self.assertEqual(op.cancelled, 0)
        clock.advance(0.1)
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(op.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_result_before_timeout(self):
        clock = Clock()
        op = Cancellable()
        d = run_bounded(clock, 5, op)
        clock.advance(1)
        op.deferred.callback(b"answer")
        self.assertEqual(self.successResultOf(d), b"answer")
        self.assertEqual(clock.getDelayedCalls(), [])  # the timeout is withdrawn
        clock.advance(10)
        self.assertEqual(op.cancelled, 0)

    def test_no_timeout(self):
        clock = Clock()
        op = Cancellable()
        d = run_bounded(clock, None, op)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10 ** 6)
        self.assertNoResult(d)
        self.assertEqual(op.cancelled, 0)

    def test_synchronous_results(self):
        clock = Clock()
        self.assertEqual(self.successResultOf(run_bounded(clock, 5, lambda x: x * 2, 21)), 42)

        def boom():
            raise ValueError("boom")

        self.failureResultOf(run_bounded(clock, 5, boom), ValueError)
        self.assertEqual(clock.getDelayedCalls(), [])


class AsInferenceErrorTests(SynchronousTestCase):
    def test_timeout(self):
        e = as_inference_error(Failure(TimeoutError()))
        self.assertIsInstance(e, InferenceError)
        self.assertEqual(e.code, grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_cancelled(self):
        e = as_inference_error(Failure(CancelledError()))
        self.assertIsInstance(e, InferenceError)
        self.assertEqual(e.code, grpc.StatusCode.CANCELLED)

    def test_inference_error_passes_through(self):
        original = InferenceError(grpc.StatusCode.NOT_FOUND, "no such model")
        self.assertIs(as_inference_error(Failure(original)), original)

    def test_anything_else_is_internal(self):
        e = as_inference_error(Failure(ZeroDivisionError("division by zero")))
        self.assertIsInstance(e, InferenceError)
        self.assertEqual(e.code, grpc.StatusCode.INTERNAL)
        self.assertIn("division by zero", e.message)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class ReactorBridgeTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ThreadedClock()
        self.bridge = ReactorBridge(self.reactor, grace=WAIT)

    def start(self, timeout, f, *args, context=None):
        """``bridge.call(timeout, f, *args)`` in a thread, once the reactor has run f."""
        call = InThread(self.bridge, timeout, f, *args, context=context)
        self.reactor.run_one()
        return call

    def test_result_returned_in_thread(self):
        op = Cancellable()
        call = self.start(5, op, "x", 2)
        self.assertEqual(op.calls, [("x", 2)])
        self.assertTrue(call.thread.is_alive())
        op.deferred.callback({"out": 1})
        call.join(self)
        self.assertEqual((call.result, call.error), ({"out": 1}, None))
        self.assertEqual(op.cancelled, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.run_pending(), 0)

    def test_synchronous_result(self):
        call = self.start(None, succeed, "v")
        call.join(self)
        self.assertEqual(call.result, "v")

    def test_errors_become_inference_errors(self):

        def not_found():
            raise InferenceError(grpc.StatusCode.NOT_FOUND, "unknown model")

        call = self.start(5, not_found)
        call.join(self)
        self.assertIsInstance(call.error, InferenceError)
        self.assertEqual((call.error.code, call.error.message), (grpc.StatusCode.NOT_FOUND, "unknown model"))

    def test_deadline_cancels_reactor_side(self):
        op = Cancellable()
        call = self.start(2.0, op)
        self.reactor.advance(1.9)
        self.assertTrue(call.thread.is_alive())
        self.assertEqual(op.cancelled, 0)
        self.reactor.advance(0.1)
        self.assertEqual(op.cancelled, 1)
        self.reactor.run_pending()
        call.join(self)
        self.assertIsInstance(call.error, InferenceError)
        self.assertEqual(call.error.code, grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_client_cancel_cancels_reactor_side(self):
        op = Cancellable()
        context = FakeContext()
        call = self.start(30, op, context=context)
        self.assertTrue(context.added.wait(WAIT))
        self.assertEqual(op.cancelled, 0)
        context.terminate()  # the client goes away (gRPC's thread runs this)
        self.reactor.run_one()  # the cancellation hops to the reactor
        self.assertEqual(op.cancelled, 1)
        call.join(self)
        self.assertIsInstance(call.error, InferenceError)
        self.assertEqual(call.error.code, grpc.StatusCode.CANCELLED)

    def test_rpc_end_after_answer_cancels_nothing(self):
        op = Cancellable()
        context = FakeContext()
        call = self.start(30, op, context=context)
        op.deferred.callback("done")
        call.join(self)
        self.assertEqual(call.result, "done")
        context.terminate()  # gRPC runs the callbacks on normal completion too
        self.assertEqual(self.reactor.run_pending(), 0)  # no cancel hop was queued

    def test_rpc_already_over_cancels_reactor_side(self):
        # add_callback returns False when the RPC is already over (the client
        # cancelled, or its deadline passed, before the servicer got here):
        # the callback will never run, so the bridge must cancel by itself
        # rather than keep the worker busy and this thread waiting.
        op = Cancellable()
        context = FakeContext(active=False)
        call = self.start(30, op, context=context)
        self.assertTrue(context.added.wait(WAIT))
        deadline = time.monotonic() + 1.0
        while not op.cancelled and time.monotonic() < deadline:
            try:
                self.reactor.run_one(timeout=0.05)
            except queue.Empty:
                pass
        cancelled = op.cancelled
        self.reactor.advance(30)  # release the thread either way
        self.reactor.run_pending()
        call.join(self)
        self.assertEqual(cancelled, 1, "a call for an RPC that had already ended was not cancelled")

    def test_stuck_reactor(self):
        bridge = ReactorBridge(self.reactor, grace=0.05)
        op = Cancellable()
        started = time.monotonic()
        with self.assertRaises(InferenceError) as cm:
            bridge.call(0.05, op)
        elapsed = time.monotonic() - started
        self.assertEqual(cm.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertGreaterEqual(elapsed, 0.09)
        self.assertLess(elapsed, WAIT)
        self.assertEqual(op.calls, [])
        # When the reactor catches up it starts the call, then cancels it
        # straight away: the worker is not left working for nobody.
        self.assertEqual(self.reactor.run_pending(), 2)
        self.assertEqual(op.calls, [()])
        self.assertEqual(op.cancelled, 1)

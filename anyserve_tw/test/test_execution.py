"""Tests for anyserve_tw.worker.execution.Execution, on a fake clock.

The thread pool is a queue the test empties by hand (:class:`QueuedPool`), so
"queued", "running" and "finished" are steps the test takes; handler run
times come from a fake timer the handlers advance.
"""
import grpc
import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import framing, protos
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.worker import execution
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.execution import (
    INLINE_BUDGET, INLINE_MAX_BYTES, OUTLIER_BUDGETS, Answer, Execution,
)

_v2 = protos.inference


class FakeReactor(Clock):
    """A Clock a pool can report back to, as threads do with callFromThread."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class QueuedPool:
    """ThreadPool's interface; jobs wait in ``queue`` until :meth:`run`.
    ``max`` is the worker's thread budget, grown by the stuck threads
    replaced (``adjustPoolsize``)."""

    def __init__(self, threads=4):
        self.queue = []
        self.running = False
        self.stopped = False
        self.min, self.max = 1, threads

    def adjustPoolsize(self, minthreads=None, maxthreads=None):
        if minthreads is not None:
            self.min = minthreads
        if maxthreads is not None:
            self.max = maxthreads

    def start(self):
        self.running = True

    def stop(self):
        self.running = False
        self.stopped = True

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.queue.append((on_result, f, args, kwargs))

    def run(self, count=None):
        """Run the first ``count`` queued jobs, in order; by default, until
        none is left (those queued meanwhile included)."""
        while self.queue and count != 0:
            on_result, f, args, kwargs = self.queue.pop(0)
            try:
                result = f(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
            if count is not None:
                count -= 1


class FakeTimer:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def infer_request(model, version="", pad=0, **arrays):
    message = _v2.ModelInferRequest(model_name=model, model_version=version, id="r")
    for name, array in arrays.items():
        message.inputs.add(name=name, datatype="INT32", shape=list(array.shape))
        message.raw_input_contents.append(np.asarray(array, dtype="<i4").tobytes())
    if pad:
        message.parameters["pad"].string_param = "x" * pad
    return message.SerializeToString()


def outputs_of(answer):
    kind, payload, code = answer[:3]
    assert (kind, code) == (framing.RESPONSE, 0), answer
    if isinstance(payload, list):
        payload = b"".join(payload)
    response = _v2.ModelInferResponse.FromString(bytes(payload))
    return {o.name: np.frombuffer(raw, "<i4").tolist()
            for o, raw in zip(response.outputs, response.raw_output_contents)}


class ExecutionTestCase(SynchronousTestCase):
    """An app of test models, an Execution running it, and what ran."""

    def setUp(self):
        self.reactor = FakeReactor()
        self.pool = QueuedPool()
        self.timer = FakeTimer()
        self.app = AnyServe()
        self.calls = []  # names of the handlers that ran
        self.cost = {}  # seconds each plain handler takes, by model name
        self.pending = {}  # model name -> Deferred an asynchronous handler returned
        self.execution = Execution(self.reactor, self.app, self.pool, max_payload=1 << 20,
                                   timer=self.timer)
        self.execution.start()

        def plain(name, **kw):
            def handler(request):
                self.calls.append(name)
                self.timer.now += self.cost.get(name, 10e-6)
                return {"sum": request["a"] + request["b"]}

            self.app.model(name, **kw)(handler)

        plain("add")
        plain("pinned", asynchronous=False)
        plain("mirror", asynchronous=True)  # a plain value, on the loop

        @self.app.model("fail")
        def fail(request):
            self.calls.append("fail")
            raise ZeroDivisionError("division by zero in the handler")

        @self.app.model("reject")
        def reject(request):
            self.calls.append("reject")
            raise InferenceError(grpc.StatusCode.FAILED_PRECONDITION, "not today")

        @self.app.model("later", asynchronous=True)
        def later(request):
            self.calls.append("later")
            d = self.pending["later"] = Deferred(lambda _: self.calls.append("later cancelled"))
            return d.addCallback(lambda n: {"sum": request["a"] * n})

        @self.app.model("coro")
        async def coro(request):
            self.calls.append("coro")
            d = self.pending["coro"] = Deferred(lambda _: self.calls.append("coro cancelled"))
            n = await d
            if n is None:
                raise ValueError("no n")
            return {"sum": request["a"] * n}

    def execute(self, model, timeout=None, **arrays):
        arrays = arrays or {"a": np.array([1, 2]), "b": np.array([10, 20])}
        return self.execution.execute(infer_request(model, **arrays), timeout)

    def assertAnswer(self, d, code, text=None):
        kind, payload, status = self.successResultOf(d)[:3]
        self.assertEqual((kind, status), (framing.ERROR, code.value[0]), payload)
        if text is not None:
            self.assertIn(text, payload.decode())
        return payload.decode()


class PoolTests(ExecutionTestCase):
    def test_plain_handler_runs_in_the_pool(self):
        d = self.execute("add")
        self.assertNoResult(d)
        self.assertEqual((len(self.pool.queue), self.calls), (1, []))
        self.assertEqual(self.execution.pending, 1)
        self.pool.run()
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [11, 22]})
        self.assertEqual(self.execution.pending, 0)

    def test_deadline_fails_the_request_and_the_handler_never_runs(self):
        d = self.execute("add", timeout=0.5)
        self.reactor.advance(0.4)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertAnswer(d, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.pool.run()
        self.assertEqual(self.calls, [])
        self.assertEqual(self.execution.pending, 0)

    def test_answer_within_the_deadline(self):
        d = self.execute("add", timeout=0.5)
        self.pool.run()
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [11, 22]})
        self.reactor.advance(1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_drops_a_queued_request(self):
        first, second = self.execute("add"), self.execute("add")
        second.cancel()
        self.assertAnswer(second, grpc.StatusCode.CANCELLED)
        self.pool.run()
        self.assertEqual(self.calls, ["add"])  # only the first ran
        self.assertEqual(outputs_of(self.successResultOf(first)), {"sum": [11, 22]})

    def test_cancel_while_running_is_answered_once(self):
        """A handler already running when the cancel comes finishes unheard."""
        requests = []

        @self.app.model("cancelled_midway")
        def midway(request):
            requests[0].cancel()
            return {"sum": request["a"]}

        requests.append(self.execute("cancelled_midway"))
        self.pool.run()
        self.assertAnswer(requests[0], grpc.StatusCode.CANCELLED)
        self.assertEqual(self.execution.pending, 0)

    def test_handler_exception_is_internal_with_its_message(self):
        d = self.execute("fail")
        self.pool.run()
        message = self.assertAnswer(d, grpc.StatusCode.INTERNAL, "division by zero in the handler")
        self.assertIn("ZeroDivisionError", message)
        self.assertIn("'fail'", message)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_inference_error_keeps_its_code(self):
        d = self.execute("reject")
        self.pool.run()
        self.assertEqual(self.assertAnswer(d, grpc.StatusCode.FAILED_PRECONDITION), "not today")

    def test_a_job_failing_outside_the_handler_is_internal(self):
        d = self.execute("add")
        [(on_result, _f, _a, _kw)] = self.pool.queue
        del self.pool.queue[:]
        on_result(False, Failure(RuntimeError("pool trouble")))
        self.assertAnswer(d, grpc.StatusCode.INTERNAL, "pool trouble")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RoutingTests(ExecutionTestCase):
    def test_unknown_model_is_not_found_without_a_thread(self):
        d = self.execute("nobody")
        self.assertAnswer(d, grpc.StatusCode.NOT_FOUND, "'nobody'")
        self.assertEqual(self.pool.queue, [])

    def test_malformed_bytes_are_invalid(self):
        self.assertAnswer(self.execution.execute(b"\x0a\x05ab"), grpc.StatusCode.INVALID_ARGUMENT,
                          "malformed")

    def test_invalid_inputs_are_invalid_before_the_handler(self):
        self.app.model("typed", inputs=[("a", "INT32", [2])])(lambda r: self.calls.append("typed"))
        d = self.execute("typed", a=np.array([1, 2, 3]))
        self.pool.run()
        self.assertAnswer(d, grpc.StatusCode.INVALID_ARGUMENT, "shape")
        self.assertEqual(self.calls, [])

    def test_route_gets_the_parsed_request(self):
        """An app's route() hook (a probe counting requests, say) sees every
        request, parsed once."""
        seen = []
        route = self.app.route
        self.app.route = lambda parsed: seen.append(parsed.name) or route(parsed)
        self.execute("nobody")
        self.execute("mirror")
        self.assertEqual(seen, ["nobody", "mirror"])

    def test_oversize_response_is_resource_exhausted(self):
        self.execution.max_payload = 100
        d = self.execute("mirror", a=np.arange(50), b=np.arange(50))
        self.assertAnswer(d, grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the 100-byte limit")


class AsynchronousTests(ExecutionTestCase):
    def test_plain_value_answers_at_once_on_the_loop(self):
        d = self.execute("mirror")
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [11, 22]})
        self.assertEqual(self.pool.queue, [])

    def test_deferred_handler_answers_when_it_fires(self):
        d = self.execute("later")
        self.assertEqual(self.pool.queue, [])
        self.assertNoResult(d)
        self.assertEqual(self.execution.pending, 1)
        self.pending["later"].callback(3)
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [3, 6]})
        self.assertEqual(self.execution.pending, 0)

    def test_coroutine_handler_answers(self):
        d = self.execute("coro")
        self.assertNoResult(d)
        self.pending["coro"].callback(2)
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [2, 4]})

    def test_coroutine_exception_is_internal(self):
        d = self.execute("coro")
        self.pending["coro"].callback(None)
        self.assertAnswer(d, grpc.StatusCode.INTERNAL, "ValueError: no n")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # its traceback is logged

    def test_a_failing_models_traceback_is_logged_once_a_second(self):
        from anyserve_tw.worker.failurelog import FailureLog

        self.execution.failures = FailureLog(every=1.0, clock=self.timer)
        for _ in range(3):
            d = self.execute("coro")
            self.pending["coro"].callback(None)
            self.assertAnswer(d, grpc.StatusCode.INTERNAL, "ValueError: no n")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.timer.now += 1
        d = self.execute("coro")
        self.pending["coro"].callback(None)
        self.assertAnswer(d, grpc.StatusCode.INTERNAL, "ValueError: no n")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_deferred_failure_keeps_an_inference_error(self):
        d = self.execute("later")
        self.pending["later"].errback(InferenceError(grpc.StatusCode.ABORTED, "stop"))
        self.assertEqual(self.assertAnswer(d, grpc.StatusCode.ABORTED), "stop")

    def test_deferred_failure_is_internal(self):
        d = self.execute("later")
        self.pending["later"].errback(KeyError("gone"))
        self.assertAnswer(d, grpc.StatusCode.INTERNAL, "'later' failed: KeyError")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_deadline_cancels_what_the_handler_awaits(self):
        d = self.execute("later", timeout=2)
        self.reactor.advance(2)
        self.assertAnswer(d, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual(self.calls, ["later", "later cancelled"])
        self.assertEqual(self.execution.pending, 0)

    def test_cancel_reaches_a_coroutine(self):
        d = self.execute("coro")
        d.cancel()
        self.assertAnswer(d, grpc.StatusCode.CANCELLED)
        self.assertEqual(self.calls, ["coro", "coro cancelled"])

    def test_synchronous_exception_is_internal(self):
        @self.app.model("raises_at_once", asynchronous=True)
        def raises(request):
            raise TypeError("bad call")

        self.assertAnswer(self.execute("raises_at_once"), grpc.StatusCode.INTERNAL, "bad call")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)  # its traceback is logged

    def test_unusable_result_is_internal(self):
        self.app.model("returns_junk", asynchronous=True)(lambda request: object())
        self.assertAnswer(self.execute("returns_junk"), grpc.StatusCode.INTERNAL, "'returns_junk'")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class InlineTests(ExecutionTestCase):
    """Plain handlers move onto the loop while their run time stays within
    the inline budget, and back to the pool when they get slow."""

    def warm(self, model="add"):
        d = self.execute(model)
        self.pool.run()
        self.successResultOf(d)

    def test_first_run_is_in_the_pool_then_inline(self):
        self.warm()
        self.assertEqual(self.execution.estimates[self.app.models["add", ""]], 10e-6)
        d = self.execute("add")
        self.assertEqual(self.pool.queue, [])
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [11, 22]})
        self.assertEqual(self.execution.pending, 0)

    def test_slow_handler_stays_in_the_pool(self):
        self.cost["add"] = 2 * INLINE_BUDGET
        self.warm()
        self.assertNoResult(self.execute("add"))
        self.assertEqual(len(self.pool.queue), 1)

    def test_getting_slow_moves_back_to_the_pool_and_fast_again_inline(self):
        self.warm()
        self.cost["add"] = 0.05  # one 50 ms run inline ...
        self.successResultOf(self.execute("add"))
        self.cost["add"] = 10e-6
        d = self.execute("add")  # ... and the next goes to the pool
        self.assertNoResult(d)
        self.pool.run()
        self.successResultOf(d)
        runs = 0
        while self.pool.queue or runs == 0:
            self.pool.run()
            d = self.execute("add")
            runs += 1
            self.assertLess(runs, 30)
        self.successResultOf(d)
        self.assertGreater(runs, 1)  # fast runs in the pool brought it back

    def test_one_run_a_few_budgets_over_moves_back_to_the_pool(self):
        """The average alone would keep it inline; one run past OUTLIER_BUDGETS does not."""
        self.warm()
        self.cost["add"] = (OUTLIER_BUDGETS + 0.5) * INLINE_BUDGET
        self.successResultOf(self.execute("add"))  # inline, and over
        self.cost["add"] = 10e-6
        self.assertNoResult(self.execute("add"))
        self.assertEqual(len(self.pool.queue), 1)

    def test_one_run_just_over_the_budget_stays_inline(self):
        self.warm()
        self.cost["add"] = 2 * INLINE_BUDGET
        self.successResultOf(self.execute("add"))
        self.cost["add"] = 10e-6
        self.successResultOf(self.execute("add"))  # the average is still within
        self.assertEqual(self.pool.queue, [])

    def test_inline_errors_are_answered(self):
        self.warm("fail")
        self.assertEqual(self.calls, ["fail"])
        self.assertAnswer(self.execute("fail"), grpc.StatusCode.INTERNAL, "division by zero")
        # The pool run's traceback is logged; the inline one, within the
        # second, is counted for the next (FailureLog).
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.warm("reject")
        self.assertAnswer(self.execute("reject"), grpc.StatusCode.FAILED_PRECONDITION, "not today")
        self.assertEqual(self.pool.queue, [])

    def test_asynchronous_false_always_uses_the_pool(self):
        self.warm("pinned")
        self.assertNoResult(self.execute("pinned"))
        self.assertEqual(len(self.pool.queue), 1)
        self.assertNotIn(self.app.models["pinned", ""], self.execution.estimates)

    def test_large_requests_use_the_pool_and_teach_nothing(self):
        self.warm()
        model = self.app.models["add", ""]
        before = self.execution.estimates[model]
        self.cost["add"] = 0.01
        payload = infer_request("add", pad=INLINE_MAX_BYTES, a=np.array([1]), b=np.array([2]))
        d = self.execution.execute(payload)
        self.assertNoResult(d)
        self.pool.run()
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [3]})
        self.assertEqual(self.execution.estimates[model], before)

    def test_disabled_with_no_budget(self):
        self.execution.inline_budget = 0
        self.warm()
        self.assertNoResult(self.execute("add"))


class DrainTests(ExecutionTestCase):
    def test_idle_drains_at_once(self):
        self.assertIs(self.successResultOf(self.execution.drain(10)), True)

    def test_drain_waits_for_requests_in_flight(self):
        in_pool, on_loop = self.execute("add"), self.execute("later")
        drained = self.execution.drain(10)
        self.pool.run()
        self.successResultOf(in_pool)
        self.reactor.advance(0)
        self.assertNoResult(drained)
        self.pending["later"].callback(1)
        self.successResultOf(on_loop)
        self.assertNoResult(drained)  # the last answer goes out first
        self.reactor.advance(0)
        self.assertIs(self.successResultOf(drained), True)

    def test_drain_does_not_wait_for_a_request_given_up(self):
        """A request answered CANCELLED is owed nothing more: drain does not
        wait for the thread that would have run it."""
        d = self.execute("add")
        d.cancel()
        self.successResultOf(d)
        self.assertIs(self.successResultOf(self.execution.drain(10)), True)
        self.pool.run()
        self.assertEqual(self.calls, [])

    def test_drain_gives_up_after_grace(self):
        d = self.execute("add")
        drained = self.execution.drain(10)
        self.reactor.advance(9.9)
        self.assertNoResult(drained)
        self.reactor.advance(0.1)
        self.assertIs(self.successResultOf(drained), False)
        self.pool.run()  # finishing later disturbs nothing
        self.successResultOf(d)
        self.reactor.advance(0)

    def test_stop_stops_the_pool_once_drained(self):
        self.execute("add")
        stopped = self.execution.stop(5)
        self.pool.run()
        self.reactor.advance(0)
        self.assertIs(self.successResultOf(stopped), True)
        self.assertTrue(self.pool.stopped)

    def test_stop_leaves_a_stuck_pool_running(self):
        self.execute("add")
        stopped = self.execution.stop(5)
        self.reactor.advance(5)
        self.assertIs(self.successResultOf(stopped), False)
        self.assertFalse(self.pool.stopped)


class ThreadBudgetTests(ExecutionTestCase):
    """Each model's share of the pool's threads (4 here), and threads stuck
    in handlers whose requests were given up."""

    def setUp(self):
        super().setUp()
        #: Called, in order, by the ``hang`` handler while it runs.
        self.while_running = []

        def pinned(name):
            def handler(request):
                self.calls.append(name)
                return {"sum": request["a"]}

            self.app.model(name, asynchronous=False)(handler)

        for name in ("p1", "p2", "p3"):
            pinned(name)

        @self.app.model("hang", asynchronous=False)
        def hang(request):
            self.calls.append("hang")
            if self.while_running:
                self.while_running.pop(0)()
            self.calls.append("hang returns")
            return {"sum": request["a"]}

    def queued(self):
        """Names of the models whose handlers were handed to a thread."""
        names = []
        for _on_result, f, args, _kw in self.pool.queue:
            names.append(args[0].model.name)
        return names

    def test_one_model_holds_at_most_all_threads_but_one(self):
        requests = [self.execute("p1") for _ in range(6)]
        self.assertEqual(self.queued(), ["p1"] * 3)
        other = self.execute("p2")
        self.assertEqual(self.queued(), ["p1"] * 3 + ["p2"])
        self.pool.run(1)
        self.successResultOf(requests[0])
        # The free thread is kept for a model holding none: p1 holds two.
        self.assertEqual(self.queued(), ["p1"] * 2 + ["p2"])
        self.assertEqual(self.execution.threads.free, 1)
        self.pool.run(1)
        self.assertEqual(self.queued(), ["p1", "p2", "p1"])
        self.pool.run()
        for d in requests + [other]:
            self.successResultOf(d)
        self.assertEqual(self.execution.pending, 0)
        self.assertEqual(self.execution.threads.busy, {})

    def test_a_single_models_worker_keeps_no_thread_in_reserve(self):
        app = AnyServe()
        app.model("only", asynchronous=False)(lambda request: {"sum": request["a"]})
        self.execution = Execution(self.reactor, app, self.pool, timer=self.timer)
        requests = [self.execute("only") for _ in range(5)]
        self.assertEqual(self.queued(), ["only"] * 4)
        self.pool.run()
        for d in requests:
            self.successResultOf(d)

    def test_the_last_free_thread_is_kept_for_a_model_holding_none(self):
        self.execute("p1"), self.execute("p1"), self.execute("p2")
        self.execute("p1"), self.execute("p2")  # each holds one already
        self.assertEqual(self.queued(), ["p1", "p1", "p2"])
        self.execute("p3")
        self.assertEqual(self.queued(), ["p1", "p1", "p2", "p3"])

    def test_a_request_waiting_for_a_thread_leaves_at_its_deadline(self):
        for _ in range(3):
            self.execute("p1")
        late = self.execute("p1", timeout=1)
        self.assertEqual(self.queued(), ["p1"] * 3)
        self.reactor.advance(1)
        self.assertAnswer(late, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual(self.execution.threads.waiting, {})
        self.pool.run()
        self.assertEqual(self.calls, ["p1"] * 3)
        self.assertEqual(self.execution.pending, 0)

    def test_waiting_models_are_served_in_turn(self):
        for name in ("p3", "p3", "p3", "p1", "p1", "p1", "p2", "p2"):
            self.execute(name)
        self.assertEqual(self.queued(), ["p3", "p3", "p3", "p1"])
        self.pool.run(1)  # p2 holds none: its turn, though p1 waited first
        self.assertEqual(self.queued(), ["p3", "p3", "p1", "p2"])
        self.pool.run(2)
        self.assertEqual(self.queued(), ["p1", "p2", "p1"])
        self.pool.run(1)  # p2's turn again
        self.assertEqual(self.queued(), ["p2", "p1", "p2"])
        self.pool.run()
        self.assertEqual(self.execution.pending, 0)

    def test_a_deadline_passing_while_the_handler_runs_sticks_its_thread(self):
        """The thread is no longer counted: the pool may start another in
        its place, and the model's waiting requests get it."""
        threads = self.execution.threads
        stuck = self.execute("hang", timeout=1)
        waiting = [self.execute("p1") for _ in range(3)]
        self.assertEqual(self.queued(), ["hang", "p1", "p1"])

        def deadline_passes():
            self.reactor.advance(1)
            self.assertAnswer(stuck, grpc.StatusCode.DEADLINE_EXCEEDED)
            self.assertEqual((threads.stuck, threads.occupied, self.pool.max), (1, 4, 5))
            self.assertEqual(self.queued(), ["p1", "p1", "p1"])  # its place taken
            self.assertEqual(self.execution.pending, 3)  # owed: the three p1
            self.assertTrue(self.execution.healthy())

        self.while_running.append(deadline_passes)
        self.pool.run(1)
        self.assertEqual((threads.stuck, threads.occupied, self.pool.max), (0, 3, 4))
        self.pool.run()
        for d in waiting:
            self.successResultOf(d)
        self.assertEqual(self.calls, ["hang", "hang returns", "p1", "p1", "p1"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_cancel_while_the_handler_runs_sticks_its_thread(self):
        d = self.execute("hang")

        def cancelled():
            d.cancel()
            self.assertEqual(self.execution.threads.stuck, 1)
            self.assertEqual(self.execution.pending, 0)

        self.while_running.append(cancelled)
        self.pool.run()
        self.assertAnswer(d, grpc.StatusCode.CANCELLED)
        self.assertEqual((self.execution.threads.stuck, self.pool.max), (0, 4))

    def test_every_thread_stuck_is_unhealthy_and_refuses_at_once(self):
        """One thread, one stuck thread replaced: the second stuck one
        leaves none, so the worker is unhealthy and what needs a thread is
        UNAVAILABLE (waiting or new); what runs on the loop still answers.
        A stuck handler returning brings health back."""
        self.pool = QueuedPool(threads=1)
        self.execution = Execution(self.reactor, self.app, self.pool, timer=self.timer, max_stuck=1)
        threads = self.execution.threads
        first = self.execute("hang", timeout=1)
        seen = {}

        def first_stuck():
            self.reactor.advance(1)
            self.assertTrue(self.execution.healthy())
            self.assertEqual((threads.stuck, self.pool.max), (1, 2))
            seen["second"] = self.execute("hang", timeout=1)
            seen["waiting"] = self.execute("p1")
            self.assertEqual(self.queued(), ["hang"])
            self.pool.run(1)  # the second hang, in the replacement thread
            self.assertTrue(self.execution.healthy())  # its handler returned

        def second_stuck():
            self.reactor.advance(1)
            self.assertAnswer(seen["second"], grpc.StatusCode.DEADLINE_EXCEEDED)
            self.assertFalse(self.execution.healthy())
            self.assertEqual(self.execution.reason(),
                             "all 2 handler threads are stuck in handlers whose requests were "
                             "given up (deadline or cancel): 'hang': 2")
            self.assertEqual(self.pool.max, 2)  # not replaced
            self.assertAnswer(seen["waiting"], grpc.StatusCode.UNAVAILABLE, "'hang': 2")
            self.assertAnswer(self.execute("p2"), grpc.StatusCode.UNAVAILABLE, "stuck")
            self.assertEqual(outputs_of(self.successResultOf(self.execute("mirror"))), {"sum": [11, 22]})
            self.assertEqual(self.pool.queue, [])

        self.while_running.extend([first_stuck, second_stuck])
        self.pool.run(1)
        self.assertAnswer(first, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual((threads.stuck, threads.occupied, self.pool.max), (0, 0, 1))
        self.assertEqual(self.calls, ["hang", "hang", "mirror", "hang returns", "hang returns"])
        d = self.execute("p2")
        self.pool.run()
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [1, 2]})
        self.assertEqual(self.execution.pending, 0)

    def test_stuck_threads_past_the_cap_are_not_replaced(self):
        self.execution = Execution(self.reactor, self.app, self.pool, timer=self.timer, max_stuck=1)
        threads = self.execution.threads
        outer = self.execute("hang", timeout=1)

        def outer_stuck():
            self.reactor.advance(1)
            self.assertEqual((threads.stuck, threads.capacity, self.pool.max), (1, 4, 5))
            self.execute("hang", timeout=1)
            self.pool.run(1)

        def inner_stuck():
            self.reactor.advance(1)
            self.assertEqual((threads.stuck, threads.capacity, self.pool.max), (2, 3, 5))
            self.assertTrue(self.execution.healthy())

        self.while_running.extend([outer_stuck, inner_stuck])
        self.pool.run(1)
        self.assertAnswer(outer, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual((threads.stuck, threads.capacity, self.pool.max), (0, 4, 4))

    def test_drain_and_stop_leave_stuck_threads_behind(self):
        d = self.execute("hang", timeout=1)
        results = {}

        def stuck():
            self.reactor.advance(1)
            results["stopped"] = self.execution.stop(10)
            self.assertIs(self.successResultOf(results["stopped"]), True)
            self.assertFalse(self.pool.stopped)  # stopping would join the stuck thread

        self.while_running.append(stuck)
        self.pool.run()
        self.assertAnswer(d, grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_a_stuck_stream_handler_counts_too(self):
        @self.app.model("trickle")
        def trickle(request):
            self.calls.append("trickle")
            yield {"sum": np.array([1], dtype=np.int32)}
            self.while_running.pop(0)()
            yield {"sum": np.array([2], dtype=np.int32)}

        emitted = []
        d = self.execution.execute(infer_request("trickle", a=np.array([1]), b=np.array([1])), 1,
                                   framing.STREAM_REQUEST, emitted.append)

        def stuck():
            self.reactor.advance(1)
            self.assertEqual(self.execution.threads.stuck, 1)

        self.while_running.append(stuck)
        self.pool.run()
        self.assertAnswer(d, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual(len(emitted), 1)
        self.assertEqual((self.execution.threads.stuck, self.execution.pending), (0, 0))


class RealPoolTests(SynchronousTestCase):
    """make_pool's threads are daemons, so a stuck handler cannot hold the
    process at exit."""

    def test_daemon_threads(self):
        pool = execution.make_pool(2)
        self.assertTrue(pool.threadFactory(target=lambda: None).daemon)
        self.assertEqual(pool.max, 2)

    def test_a_stuck_thread_is_replaced(self):
        """With real threads: one thread, its handler blocked and its
        request given up, and the next request still runs in the thread
        started in its place."""
        import threading
        import time

        class Reactor(Clock):
            def callFromThread(self, f, *args):
                done.append((f, args))

        def finish(count):
            """Run the next ``count`` reports the threads sent the loop."""
            deadline = time.monotonic() + 10
            while len(done) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            for _ in range(count):
                f, args = done.pop(0)
                f(*args)

        done, results = [], []
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        pool = execution.make_pool(1)
        pool.start()
        threads = execution.HandlerThreads(Reactor(), pool, max_stuck=1)

        def hang():
            started.set()
            release.wait(10)
            return "late"

        class Model:
            def __init__(self, name):
                self.name = name

        blocked = threads.submit(Model("hang"), hang, lambda ok, r: results.append(("hang", r)))
        self.assertTrue(started.wait(10))
        threads.cancel(blocked)
        self.assertEqual((threads.stuck, pool.max), (1, 2))
        threads.submit(Model("quick"), lambda: "quick result", lambda ok, r: results.append(("quick", r)))
        finish(1)
        self.assertEqual(results, [("hang", None), ("quick", "quick result")])
        release.set()
        finish(1)
        self.assertEqual(results, [("hang", None), ("quick", "quick result")])
        self.assertEqual((threads.stuck, threads.occupied, pool.max), (0, 0, 1))
        pool.stop()


class RefusedTaskTests(SynchronousTestCase):
    def test_cancel_after_refusal_is_harmless(self):
        """A task refused while unhealthy was answered at once: cancelling
        it later (its request given up) does nothing, once."""
        threads = execution.HandlerThreads(Clock(), QueuedPool(threads=1))
        threads.healthy = lambda: False
        threads.reason = lambda: "all 1 handler threads are stuck"
        results = []

        class Model:
            name = "m"

        task = threads.submit(Model(), lambda: "never", lambda ok, r: results.append(ok))
        self.assertEqual(results, [False])
        threads.cancel(task)
        self.assertEqual(results, [False])
        self.assertEqual(threads.waiting, {})


class AnswerTests(SynchronousTestCase):
    def test_answers(self):
        e = Execution(FakeReactor(), AnyServe(), QueuedPool(), max_payload=4)
        self.assertEqual(e.answer(b"1234"), Answer(framing.RESPONSE, b"1234", 0))
        self.assertEqual(e.answer([b"12", memoryview(b"34")]).kind, framing.RESPONSE)
        self.assertEqual(e.answer(b"12345").code, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        self.assertEqual(e.answer([b"12", b"", bytearray(b"345")]).code,
                         grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        failed = e.answer(Failure(InferenceError(grpc.StatusCode.NOT_FOUND, "where")))
        self.assertEqual(failed, Answer(framing.ERROR, b"where", grpc.StatusCode.NOT_FOUND.value[0]))


class TimingTests(ExecutionTestCase):
    """Each answer carries the worker's own times (Triton's statistics)."""

    def test_pool_answer_times_queue_and_compute(self):
        self.cost["add"] = 0.003
        d = self.execute("add")
        self.timer.now += 0.002  # waits for a thread
        self.pool.run()
        timing = self.successResultOf(d).timing
        self.assertEqual(timing.queue_ns, 2000000)
        self.assertEqual(timing.infer_ns, 3000000)
        self.assertEqual(timing.batch_size, 1)

    def test_errors_carry_no_timing(self):
        d = self.execute("fail")
        self.pool.run()
        self.assertIsNone(self.successResultOf(d).timing)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_worker_id_rides_in_the_response_parameters(self):
        execution = Execution(self.reactor, self.app, self.pool, timer=self.timer, worker_id="w-7")
        d = execution.execute(infer_request("mirror", a=np.array([1]), b=np.array([2])))
        kind, payload, _, _ = self.successResultOf(d)
        response = _v2.ModelInferResponse.FromString(b"".join(bytes(p) for p in payload))
        self.assertEqual(response.parameters["anyserve_worker"].string_param, "w-7")
        self.assertEqual(np.frombuffer(response.raw_output_contents[0], "<i4").tolist(), [3])


class DecoupledTests(ExecutionTestCase):
    """Generator handlers stream their responses (Triton's decoupled models)."""

    def setUp(self):
        super().setUp()
        self.emitted = []

        @self.app.model("count")
        def count(request):
            for i in range(int(request["a"][0])):
                self.calls.append("yield %d" % i)
                yield {"sum": np.array([i], dtype=np.int32)}

        @self.app.model("acount")
        async def acount(request):
            for i in range(int(request["a"][0])):
                yield {"sum": np.array([i])}

        @self.app.model("breaks")
        def breaks(request):
            yield {"sum": np.array([1])}
            raise RuntimeError("broke mid-stream")

    def stream(self, model, n, flagged=False, timeout=None):
        message = _v2.ModelInferRequest.FromString(infer_request(model, a=np.array([n]), b=np.array([0])))
        if flagged:
            message.parameters["triton_enable_empty_final_response"].bool_param = True
        return self.execution.execute(message.SerializeToString(), timeout, framing.STREAM_REQUEST,
                                      self.emitted.append)

    def responses(self):
        return [_v2.ModelInferResponse.FromString(b"".join(bytes(p) for p in parts)) for parts in self.emitted]

    def test_each_yield_is_sent_then_an_empty_end(self):
        d = self.stream("count", 3)
        self.pool.run()
        answer = self.successResultOf(d)
        self.assertEqual((answer.kind, answer.payload), (framing.RESPONSE, b""))
        self.assertEqual([np.frombuffer(r.raw_output_contents[0], "<i4").tolist() for r in self.responses()],
                         [[0], [1], [2]])

    def test_empty_final_response_when_asked(self):
        d = self.stream("count", 2, flagged=True)
        self.pool.run()
        final = _v2.ModelInferResponse.FromString(self.successResultOf(d).payload)
        self.assertTrue(final.parameters["triton_final_response"].bool_param)
        self.assertEqual(len(final.outputs), 0)
        self.assertEqual([r.parameters["triton_final_response"].bool_param for r in self.responses()],
                         [False, False])

    def test_async_generator(self):
        d = self.stream("acount", 2)
        self.assertEqual(self.successResultOf(d).payload, b"")
        self.assertEqual(len(self.emitted), 2)

    def test_unary_call_of_a_decoupled_model_is_refused(self):
        self.assertAnswer(self.execute("count", a=np.array([2]), b=np.array([0])),
                          grpc.StatusCode.UNIMPLEMENTED, "ModelStreamInfer")
        self.assertEqual(self.pool.queue, [])

    def test_failure_mid_stream_ends_it_with_the_error(self):
        d = self.stream("breaks", 0)
        self.pool.run()
        self.assertAnswer(d, grpc.StatusCode.INTERNAL, "broke mid-stream")
        self.assertEqual(len(self.emitted), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cancel_stops_the_generator_and_sends_nothing_more(self):
        d = self.stream("count", 5)
        d.cancel()
        self.pool.run()
        self.assertAnswer(d, grpc.StatusCode.CANCELLED)
        self.assertEqual(self.emitted, [])
        self.assertLessEqual(len(self.calls), 1)
        self.assertEqual(self.execution.pending, 0)

    def test_non_decoupled_model_on_a_stream_answers_once(self):
        d = self.execution.execute(infer_request("mirror", a=np.array([1, 2]), b=np.array([10, 20])),
                                   None, framing.STREAM_REQUEST, self.emitted.append)
        self.assertEqual(outputs_of(self.successResultOf(d)), {"sum": [11, 22]})
        self.assertEqual(self.emitted, [])


class DecoupledBackpressureTests(SynchronousTestCase):
    """A generator in a thread gets at most MAX_UNSENT_RESPONSES ahead of
    the loop that sends its responses."""

    def test_a_fast_generator_waits_for_the_loop(self):
        import threading
        import time

        class HeldReactor(Clock):
            """callFromThread calls are held until the test runs them."""

            def __init__(self):
                super().__init__()
                self.held = []
                self.lock = threading.Lock()

            def callFromThread(self, f, *args):
                with self.lock:
                    self.held.append((f, args))

            def run_held(self):
                with self.lock:
                    held, self.held = self.held, []
                for f, args in held:
                    f(*args)
                return len(held)

        class ThreadPool(QueuedPool):
            def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
                def run():
                    try:
                        on_result(True, f(*args, **kwargs))
                    except BaseException:
                        on_result(False, Failure())
                threading.Thread(target=run, daemon=True).start()

        app = AnyServe()
        produced = []

        @app.model("flood")
        def flood(request):
            for i in range(1000):
                produced.append(i)
                yield {"sum": np.array([i], dtype=np.int32)}

        reactor = HeldReactor()
        runner = Execution(reactor, app, ThreadPool())
        emitted = []
        d = runner.execute(infer_request("flood", a=np.array([1]), b=np.array([1])), None,
                              framing.STREAM_REQUEST, emitted.append)
        deadline = time.monotonic() + 5
        while len(reactor.held) < execution.MAX_UNSENT_RESPONSES and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        self.assertEqual(len(reactor.held), execution.MAX_UNSENT_RESPONSES)
        self.assertLessEqual(len(produced), execution.MAX_UNSENT_RESPONSES + 1)
        self.assertEqual(reactor.run_held(), execution.MAX_UNSENT_RESPONSES)  # sent: room again
        deadline = time.monotonic() + 5
        while len(reactor.held) < execution.MAX_UNSENT_RESPONSES and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(emitted), execution.MAX_UNSENT_RESPONSES)
        d.cancel()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the thread notices within ROOM_WAIT and ends
            reactor.run_held()
            if runner.pending == 0:
                break
            time.sleep(0.02)
        self.assertEqual(runner.pending, 0)
        self.assertLess(len(produced), 1000)
        self.assertEqual(self.successResultOf(d).kind, framing.ERROR)

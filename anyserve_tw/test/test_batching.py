"""Tests for anyserve_tw.worker.batching: requests of a batching model
gathered on a fake clock, joined into one handler call and split back."""
import grpc
import numpy as np
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import framing, protos
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.worker import AnyServe, tensors
from anyserve_tw.worker.batching import Batcher, Served, join, signature
from anyserve_tw.worker.model import Model

_v2 = protos.inference


def payload(model="scale", id="", parameters=None, outputs=(), **arrays):
    """ModelInferRequest bytes: raw FP32 / INT64 tensors, or BYTES from lists of bytes."""
    request = _v2.ModelInferRequest(model_name=model, id=id)
    for key, value in (parameters or {}).items():
        request.parameters[key].string_param = value
    for name, value in arrays.items():
        if isinstance(value, np.ndarray):
            datatype = {"float32": "FP32", "int64": "INT64"}[value.dtype.name]
            request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
            request.raw_input_contents.append(value.tobytes())
        else:  # a list of rows of bytes
            tensor = request.inputs.add(name=name, datatype="BYTES",
                                        shape=[len(value), len(value[0])])
            tensor.contents.bytes_contents.extend(b for row in value for b in row)
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


def rows(*values, width=2):
    """FP32 rows [[v, v], ...], one per value."""
    return np.array([[v] * width for v in values], dtype=np.float32)


def output(served, name):
    """An output of a Served answer, decoded."""
    response = _v2.ModelInferResponse.FromString(b"".join(bytes(p) for p in served.parts))
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            array = tensors.from_raw(tensor.datatype, tuple(tensor.shape),
                                     response.raw_output_contents[index])
            if tensor.datatype == "BYTES":
                return array.ravel().tolist(), list(tensor.shape)
            return array
    raise AssertionError("no output %r" % name)


class Runs:
    """A ``run`` for the Batcher that holds each batch until the test lets it go."""

    def __init__(self):
        self.waiting = []  # (work, Deferred)
        self.cancelled = 0

    def __call__(self, work):
        d = Deferred(lambda _: self._cancel())
        self.waiting.append((work, d))
        return d

    def _cancel(self):
        self.cancelled += 1

    def finish(self, count=1):
        for _ in range(count):
            work, d = self.waiting.pop(0)
            if not d.called:
                d.callback(work())


class BatcherTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.calls = []  # rows the handler was called with, per call

    def model(self, handler=None, outputs=(("y", "FP32", [2]),), inputs=(("x", "FP32", [2]),),
              **batching):
        batching.setdefault("max_batch_size", 8)

        def double(request):
            x = request["x"]
            self.calls.append(x[:, 0].tolist())
            return {"y": x * 2}

        return Model(handler or double, "scale", inputs=list(inputs) if inputs is not None else None,
                     outputs=list(outputs) if outputs is not None else None, **batching)

    def batcher(self, model=None, run=None, **batching):
        self.runs = Runs()
        model = model or self.model(**batching)
        self.batcher_model = model
        return Batcher(model, self.clock, run or self.runs, timer=self.clock.seconds)

    def submit(self, batcher, data=None, **fields):
        """Submit a request; return the list its outcome lands in."""
        request = self.batcher_model.decode(payload(**fields) if data is None else data)
        outcome = []
        batcher.submit(request).addBoth(outcome.append)
        return outcome

    def expect(self, batcher, count):
        """Run and end a batch of ``count`` requests, so that ``count``
        requests are expected back; forget its calls."""
        for v in range(count):
            self.submit(batcher, x=rows(100 + v))
        self.clock.advance(0)
        self.runs.finish()
        del self.calls[:]

    def test_requests_arriving_together_make_one_call(self):
        """Submitted in one turn of the loop, with no queue delay: one call
        with every row, each request answered with its own rows."""
        batcher = self.batcher()
        outcomes = [self.submit(batcher, x=rows(v)) for v in (1, 2, 3)]
        outcomes.append(self.submit(batcher, x=rows(4, 5)))
        self.assertEqual(self.runs.waiting, [])
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[1, 2, 3, 4, 5]])
        np.testing.assert_array_equal(output(outcomes[1][0], "y"), rows(4))
        np.testing.assert_array_equal(output(outcomes[3][0], "y"), rows(8, 10))
        self.assertEqual([o[0].batch_size for o in outcomes], [4, 0, 0, 0])

    def test_a_request_at_an_idle_model_runs_at_once(self):
        """No queue delay for a model that expects nothing back: at one
        request in flight it would be pure latency."""
        batcher = self.batcher(max_queue_delay_ms=5, preferred_batch_sizes=[4])
        first = self.submit(batcher, x=rows(1))
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[1]])
        self.assertEqual(first[0].queue, 0)

    def test_after_a_batch_the_next_waits_for_as_many_requests_as_it_answered(self):
        batcher = self.batcher(max_queue_delay_ms=5)
        self.expect(batcher, 3)
        for v in (1, 2):
            self.submit(batcher, x=rows(v))
        self.clock.advance(0.001)
        self.assertEqual(self.runs.waiting, [])
        self.submit(batcher, x=rows(3))
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[1, 2, 3]])

    def test_answers_expected_back_are_waited_for_at_most_the_queue_delay(self):
        batcher = self.batcher(max_queue_delay_ms=5, preferred_batch_sizes=[4])
        self.expect(batcher, 3)
        self.clock.advance(0.003)
        first = self.submit(batcher, x=rows(1))
        self.clock.advance(0.0019)
        self.assertEqual(self.runs.waiting, [])
        self.clock.advance(0.0001)
        self.runs.finish()
        self.assertEqual(self.calls, [[1]])
        self.assertAlmostEqual(first[0].queue, 0.002)
        # The wait is over: the next request, one of those expected, runs
        # at once.
        self.submit(batcher, x=rows(2))
        self.clock.advance(0.005)
        self.assertEqual(len(self.runs.waiting), 1)

    def test_a_preferred_size_runs_at_once(self):
        batcher = self.batcher(max_queue_delay_ms=1000, preferred_batch_sizes=[2, 4])
        self.expect(batcher, 5)
        self.submit(batcher, x=rows(1))
        self.clock.advance(0)
        self.assertEqual(self.runs.waiting, [])
        self.submit(batcher, x=rows(2, 3))
        self.submit(batcher, x=rows(4))
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[1, 2, 3, 4]])

    def test_the_largest_preferred_size_reached_is_taken(self):
        batcher = self.batcher(max_queue_delay_ms=1000, preferred_batch_sizes=[2, 4])
        self.expect(batcher, 8)
        for v in range(5):
            self.submit(batcher, x=rows(v))
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[0, 1, 2, 3]])
        self.clock.advance(1)
        self.runs.finish()
        self.assertEqual(self.calls[1], [4])

    def test_max_batch_size_runs_at_once_and_the_rest_waits(self):
        batcher = self.batcher(max_batch_size=4, max_queue_delay_ms=1000)
        outcomes = [self.submit(batcher, x=rows(v)) for v in range(6)]
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[0, 1, 2, 3]])
        self.assertEqual(outcomes[5], [])
        self.clock.advance(1)
        self.runs.finish()
        self.assertEqual(self.calls[1], [4, 5])
        np.testing.assert_array_equal(output(outcomes[5][0], "y"), rows(10))

    def test_requests_gather_while_a_batch_runs(self):
        """One instance: while a batch runs the next one gathers, and once
        its oldest has waited its delay it takes every row up to the max."""
        batcher = self.batcher(max_queue_delay_ms=2, preferred_batch_sizes=[2])
        self.submit(batcher, x=rows(0))
        self.clock.advance(0.002)
        self.assertEqual(len(self.runs.waiting), 1)
        for v in (1, 2, 3):
            self.submit(batcher, x=rows(v))
        self.clock.advance(0.01)
        self.assertEqual(len(self.runs.waiting), 1)  # the instance is busy
        self.runs.finish()
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[0], [1, 2, 3]])

    def test_after_a_batch_the_delay_counts_from_the_free_instance(self):
        """A request that waited behind a running batch does not leave alone
        the moment the batch ends: those answered come back within the delay
        and join it (else batches alternate small, large)."""
        batcher = self.batcher(max_queue_delay_ms=2, preferred_batch_sizes=[4])
        self.submit(batcher, x=rows(0))
        self.clock.advance(0.002)
        self.submit(batcher, x=rows(1))
        self.clock.advance(0.01)
        self.runs.finish()  # the first batch ends; [1] has waited 10 ms
        self.clock.advance(0.001)
        self.assertEqual(self.runs.waiting, [])
        for v in (2, 3):
            self.submit(batcher, x=rows(v))
        self.clock.advance(0.001)
        self.assertEqual(len(self.runs.waiting), 1)
        self.runs.finish()
        self.assertEqual(self.calls, [[0], [1, 2, 3]])

    def test_a_bad_request_fails_alone(self):
        """Too many rows, or inputs that disagree on the batch dimension:
        INVALID_ARGUMENT for that request; its neighbours are served."""
        model = self.model(inputs=[("x", "FP32", [2]), ("w", "FP32", [1])], max_batch_size=2)
        batcher = self.batcher(model)
        good = self.submit(batcher, x=rows(1), w=np.ones((1, 1), np.float32))
        too_big = self.submit(batcher, x=rows(1, 2, 3), w=np.ones((3, 1), np.float32))
        disagree = self.submit(batcher, x=rows(1, 2), w=np.ones((1, 1), np.float32))
        self.clock.advance(0)
        self.runs.finish()
        self.assertIsInstance(good[0], Served)
        for outcome, text in ((too_big, "got a batch of 3 rows, more than its max_batch_size 2"),
                              (disagree, "must share their first (batch) dimension")):
            error = outcome[0].value
            self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(text, error.message)

    def test_a_request_cancelled_while_queued_is_dropped(self):
        batcher = self.batcher(max_queue_delay_ms=10)
        self.expect(batcher, 3)
        kept = []
        request = self.batcher_model.decode(payload(x=rows(1)))
        given_up = batcher.submit(request)
        given_up.addErrback(lambda f: kept.append(f.type))
        other = self.submit(batcher, x=rows(2))
        self.clock.advance(0.005)
        given_up.cancel()
        self.assertEqual(kept, [CancelledError])
        self.clock.advance(0.005)
        self.runs.finish()
        self.assertEqual(self.calls, [[2]])
        self.assertIsInstance(other[0], Served)

    def test_the_last_queued_request_cancelled_leaves_nothing_to_run(self):
        batcher = self.batcher(max_queue_delay_ms=10)
        self.expect(batcher, 2)
        d = batcher.submit(self.batcher_model.decode(payload(x=rows(1))))
        d.addErrback(lambda f: None)
        self.clock.advance(0)
        d.cancel()
        self.clock.advance(1)
        self.assertEqual((self.runs.waiting, batcher.queue, self.clock.getDelayedCalls()), ([], [], []))

    def test_a_request_cancelled_before_its_batch_starts_is_left_out(self):
        """Past its deadline (the caller cancels it) after the batch was
        formed but before the handler ran: the handler never sees it."""
        batcher = self.batcher()
        first = batcher.submit(self.batcher_model.decode(payload(x=rows(1))))
        first.addErrback(lambda f: None)
        second = self.submit(batcher, x=rows(2))
        self.clock.advance(0)
        first.cancel()
        self.runs.finish()
        self.assertEqual(self.calls, [[2]])
        self.assertEqual(second[0].batch_size, 1)

    def test_a_batch_whose_requests_were_all_given_up_frees_its_instance(self):
        """A handler that runs on after every request of its batch was
        answered does not hold the model up: its run is cancelled and the
        next batch runs."""
        batcher = self.batcher()
        stuck = batcher.submit(self.batcher_model.decode(payload(x=rows(1))))
        stuck.addErrback(lambda f: None)
        self.clock.advance(0)
        later = self.submit(batcher, x=rows(2))
        self.clock.advance(0)
        self.assertEqual(len(self.runs.waiting), 1)
        stuck.cancel()
        self.assertEqual(self.runs.cancelled, 1)
        self.clock.advance(0)
        self.assertEqual(len(self.runs.waiting), 2)
        self.runs.finish(2)
        self.assertEqual(self.calls, [[2]])  # the cancelled batch's work saw nobody left
        self.assertIsInstance(later[0], Served)
        self.assertEqual(batcher.running, 0)

    def test_inputs_that_cannot_be_joined_run_apart(self):
        """Other trailing shapes, or other request parameters: separate
        batches, oldest kind first."""
        model = self.model(inputs=[("x", "FP32", [-1])], outputs=[("y", "FP32", [-1])])
        batcher = self.batcher(model)
        a = self.submit(batcher, x=rows(1, width=2))
        b = self.submit(batcher, x=rows(2, width=3))
        c = self.submit(batcher, x=rows(3, width=2))
        d = self.submit(batcher, x=rows(4, width=2), parameters={"p": "other"})
        self.clock.advance(0)
        self.runs.finish()
        self.clock.advance(0)
        self.runs.finish()
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(self.calls, [[1, 3], [2], [4]])
        np.testing.assert_array_equal(output(b[0], "y"), rows(4, width=3))
        np.testing.assert_array_equal(output(c[0], "y"), rows(6, width=2))
        for outcome in (a, d):
            self.assertIsInstance(outcome[0], Served)

    def test_bytes_of_different_lengths_join(self):
        seen = []

        def upper(request):
            text = request["text"]
            seen.append((text.dtype, text.shape))
            return {"out": np.array([[t.upper() for t in row] for row in text], dtype=object)}

        model = Model(upper, "upper", inputs=[("text", "BYTES", [1])], outputs=[("out", "BYTES", [1])],
                      max_batch_size=4)
        batcher = self.batcher(model)
        short = self.submit(batcher, payload("upper", text=[[b"a"]]))
        long = self.submit(batcher, payload("upper", text=[[b"a much longer one"], [b"bc"]]))
        self.clock.advance(0)
        self.runs.finish()
        self.assertEqual(seen, [(np.dtype(object), (3, 1))])
        self.assertEqual(output(short[0], "out"), ([b"A"], [1, 1]))
        self.assertEqual(output(long[0], "out"), ([b"A MUCH LONGER ONE", b"BC"], [2, 1]))

    def test_an_output_without_one_row_per_input_row_fails_the_batch(self):
        model = self.model(handler=lambda request: {"y": np.zeros((1, 2), np.float32)})
        batcher = self.batcher(model)
        outcomes = [self.submit(batcher, x=rows(v)) for v in (1, 2)]
        self.clock.advance(0)
        self.runs.finish()
        for outcome in outcomes:
            error = outcome[0].value
            self.assertEqual(error.code, grpc.StatusCode.INTERNAL)
            self.assertIn("output 'y' of shape [1, 2] for a batch of 2 rows", error.message)

    def test_a_handler_error_fails_the_batch_as_internal(self):
        def broken(request):
            raise ValueError("no luck")

        batcher = self.batcher(self.model(handler=broken))
        outcomes = [self.submit(batcher, x=rows(v)) for v in (1, 2)]
        self.clock.advance(0)
        self.runs.finish()
        for outcome in outcomes:
            self.assertEqual(outcome[0].value.code, grpc.StatusCode.INTERNAL)
            self.assertIn("ValueError: no luck", outcome[0].value.message)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_a_response_that_cannot_be_encoded_fails_alone(self):
        """Encoding is per request: one asking for an output the handler
        does not produce fails; its batch mate is answered."""
        batcher = self.batcher(self.model(outputs=None))
        asks_all = self.submit(batcher, x=rows(1))
        asks_more = self.submit(batcher, x=rows(2), outputs=["y", "z"])
        self.clock.advance(0)
        self.runs.finish()
        np.testing.assert_array_equal(output(asks_all[0], "y"), rows(2))
        self.assertEqual(asks_more[0].value.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("produced no output(s): z", asks_more[0].value.message)
        self.assertEqual(self.calls, [[1, 2]])

    def test_requested_outputs_are_joined(self):
        requests = [self.model(outputs=None).decode(payload(x=rows(v), outputs=names))
                    for v, names in ((1, ["y"]), (2, ["z", "y"]), (3, []))]
        self.assertEqual(join(requests[:2]).requested_outputs, ["y", "z"])
        self.assertEqual(join(requests).requested_outputs, [])
        self.assertIs(join(requests[:1]), requests[0])

    def test_an_asynchronous_handler_batches_on_the_loop(self):
        pending = Deferred()

        async def later(request):
            self.calls.append(request["x"][:, 0].tolist())
            await pending
            return {"y": request["x"] + 1}

        batcher = self.batcher(self.model(handler=later))
        outcomes = [self.submit(batcher, x=rows(v)) for v in (1, 2)]
        self.clock.advance(0)
        self.assertEqual((self.calls, self.runs.waiting), ([[1, 2]], []))
        pending.callback(None)
        np.testing.assert_array_equal(output(outcomes[1][0], "y"), rows(3))

    def test_the_run_itself_failing_fails_its_requests(self):
        def refuse(work):
            from twisted.internet.defer import fail

            return fail(InferenceError(grpc.StatusCode.UNAVAILABLE, "no threads"))

        batcher = self.batcher(run=refuse)
        outcome = self.submit(batcher, x=rows(1))
        self.clock.advance(0)
        self.assertEqual(outcome[0].value.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(batcher.running, 0)

    def test_a_model_that_does_not_batch_has_no_batcher(self):
        self.assertRaises(ValueError, Batcher, Model(lambda r: {}, "m"), self.clock, succeed)

    def test_signature(self):
        model = self.model()
        rows_, key = signature(model.decode(payload(x=rows(1, 2))), 8)
        self.assertEqual(rows_, 2)
        self.assertEqual(key, ((("x", "FP32", (2,)),), ()))


class ModelSettingsTests(SynchronousTestCase):
    def test_the_decorator_carries_the_batching_settings(self):
        app = AnyServe()

        @app.model("m", inputs=[("x", "FP32", [3])], outputs=[("y", "FP32", [-1, 3])],
                   max_batch_size=32, max_queue_delay_ms=2, preferred_batch_sizes=[16, 8, 32])
        def handler(request):
            return {"y": request["x"]}

        model = app.models["m", ""]
        self.assertEqual((model.max_batch_size, model.preferred_batch_sizes, model.max_queue_delay_us),
                         (32, (8, 16, 32), 2000))
        # On the wire (and in ModelMetadata) the batch dimension comes first.
        self.assertEqual([tuple(s) for s in model.inputs + model.outputs],
                         [("x", "FP32", (-1, 3)), ("y", "FP32", (-1, -1, 3))])

    def test_no_batching_by_default(self):
        model = Model(lambda r: {}, "m", inputs=[("x", "FP32", [3])])
        self.assertEqual((model.max_batch_size, model.preferred_batch_sizes, model.max_queue_delay_us),
                         (0, (), 0))
        self.assertEqual(model.inputs[0].shape, (3,))

    def test_requests_bring_the_batch_dimension(self):
        model = Model(lambda r: {"y": r["x"]}, "m", inputs=[("x", "FP32", [2])],
                      outputs=[("y", "FP32", [2])], max_batch_size=4)
        response = _v2.ModelInferResponse.FromString(model.encode(*(lambda r: (r, model.handler(r)))(
            model.decode(payload("m", x=rows(1, 2, 3))))))
        self.assertEqual(list(response.outputs[0].shape), [3, 2])
        with self.assertRaises(InferenceError) as caught:
            model.decode(payload("m", x=np.ones(2, np.float32)))
        self.assertIn("shape [2], model 'm' expects [-1, 2]", caught.exception.message)

    def test_settings_are_checked(self):
        for settings, text in (
            (dict(max_batch_size=-1), "max_batch_size must be an int >= 0"),
            (dict(max_batch_size=2.5), "max_batch_size must be an int >= 0"),
            (dict(max_batch_size=4, preferred_batch_sizes=[8]), "preferred batch size 8 is not within"),
            (dict(max_batch_size=4, preferred_batch_sizes=[0]), "preferred batch size 0 is not within"),
            (dict(preferred_batch_sizes=[1]), "need max_batch_size > 0"),
            (dict(max_batch_size=4, max_queue_delay_ms=-1), "max_queue_delay_ms must be >= 0"),
            (dict(max_queue_delay_ms=1), "needs max_batch_size > 0"),
        ):
            with self.assertRaises(ValueError) as caught:
                Model(lambda r: {}, "m", **settings)
            self.assertIn(text, str(caught.exception))

    def test_a_streaming_model_cannot_batch(self):
        def stream(request):
            yield {}

        with self.assertRaises(ValueError) as caught:
            Model(stream, "s", max_batch_size=4)
        self.assertIn("can't batch", str(caught.exception))

    def test_the_sdk_names_import_from_the_package(self):
        from anyserve_tw import AnyServe as top_app, InferenceError as top_error, InferResponse

        from anyserve_tw.worker.model import InferResponse as model_response

        self.assertIs(InferResponse, model_response)
        self.assertIs(top_error, InferenceError)
        self.assertIs(top_app, AnyServe)


class ExecutionTests(SynchronousTestCase):
    """A batching model through the worker's Execution: decoded on the loop,
    batched, run in one pool job, answered per request with its timing."""

    def setUp(self):
        from anyserve_tw.test.test_execution import FakeReactor, FakeTimer, QueuedPool
        from anyserve_tw.worker.execution import Execution

        self.reactor = FakeReactor()
        self.pool = QueuedPool()
        self.timer = FakeTimer()
        self.app = AnyServe()
        self.calls = []

        @self.app.model("scale", inputs=[("x", "FP32", [2])], outputs=[("y", "FP32", [2])],
                        max_batch_size=8, max_queue_delay_ms=10)
        def double(request):
            self.calls.append(len(request["x"]))
            self.timer.now += 0.003
            return {"y": request["x"] * 2}

        self.execution = Execution(self.reactor, self.app, self.pool, timer=self.timer)
        self.execution.start()

    def execute(self, data, timeout=None):
        answers = []
        self.execution.execute(data, timeout=timeout).addCallback(answers.append)
        return answers

    def test_requests_share_one_pool_job(self):
        first = self.execute(payload(x=rows(1)))
        self.timer.now += 0.002
        second = self.execute(payload(x=rows(2, 3)))
        self.reactor.advance(0.01)
        self.assertEqual(len(self.pool.queue), 1)
        self.pool.run()
        self.assertEqual(self.calls, [3])
        response = _v2.ModelInferResponse.FromString(b"".join(bytes(p) for p in second[0].payload))
        np.testing.assert_array_equal(
            tensors.from_raw("FP32", tuple(response.outputs[0].shape), response.raw_output_contents[0]),
            rows(4, 6))
        self.assertEqual([a[0].timing.batch_size for a in (first, second)], [2, 0])
        self.assertEqual([a[0].timing.infer_ns for a in (first, second)], [3000000] * 2)
        self.assertEqual([a[0].timing.queue_ns for a in (first, second)], [2000000, 0])
        self.assertEqual(self.execution.pending, 0)

    def test_a_malformed_request_fails_at_once_and_alone(self):
        bad = self.execute(payload(x=np.ones((1, 3), np.float32)))
        good = self.execute(payload(x=rows(1)))
        self.assertEqual(bad[0].kind, framing.ERROR)
        self.assertEqual(bad[0].code, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        self.assertIn(b"expects [-1, 2]", bad[0].payload)
        self.reactor.advance(0.01)
        self.pool.run()
        self.assertEqual((self.calls, good[0].kind), ([1], framing.RESPONSE))

    def test_a_request_past_its_deadline_is_dropped_before_its_batch_runs(self):
        late = self.execute(payload(x=rows(1)), timeout=0.005)
        self.reactor.advance(0.004)
        kept = self.execute(payload(x=rows(2)))
        self.reactor.advance(0.001)
        self.assertEqual(late[0].code, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        self.reactor.advance(0.01)
        self.pool.run()
        self.assertEqual(self.calls, [1])
        self.assertEqual(kept[0].kind, framing.RESPONSE)
        self.assertEqual(self.execution.pending, 0)

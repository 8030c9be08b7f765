"""What each gRPC front guarantees, end to end: deadlines and client cancels
reach the worker, ``--max-concurrent-rpcs`` answers RESOURCE_EXHAUSTED, and on
the asyncio front requests waiting on a slow model hold no thread, so
everything else keeps answering."""
import time

import grpc
import numpy as np

from tests.harness import BackgroundInfer, PROBE_SERVER, KSERVE_SERVER, infer_inputs, wait_for
from tests.test_end_to_end import IngressTestCase, on_the_other_fronts, status_of

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def nap_request(seconds):
    """Serialized ModelInferRequest bytes for the probe's ``nap`` model."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="nap")
    tensor = request.inputs.add(name="seconds", datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.array([seconds], dtype="<f8").tobytes())
    del tensor
    return request.SerializeToString()


class FrontTests(IngressTestCase):
    workers = (KSERVE_SERVER, PROBE_SERVER)
    args = ("--max-concurrent-rpcs", "300")
    ready = ("add", "nap", "cancelled")

    def cancelled(self):
        """(waits the probe saw cancelled, CANCEL frames the ingress sent it)."""
        result = self.client.infer("cancelled", [])
        return int(result.as_numpy("count")[0]), int(result.as_numpy("frames")[0])

    def raw_infer(self, channel):
        return channel.unary_unary(MODEL_INFER)

    def test_client_cancel_reaches_the_worker(self):
        before = self.cancelled()
        with grpc.insecure_channel(self.ingress.address) as channel:
            future = self.raw_infer(channel).future(nap_request(30.0))
            time.sleep(0.5)  # on the worker by now
            self.assertTrue(future.cancel())
        wait_for(lambda: self.cancelled() == (before[0] + 1, before[1] + 1), timeout=5,
                 what="a CANCEL frame and the worker dropping the request")

    def test_malformed_request_bytes_are_invalid_argument(self):
        """Bytes that are no protobuf message, sent to a method whose request
        the ingress parses, are the client's INVALID_ARGUMENT (gRPC's own
        answer is UNKNOWN on grpc.aio, INTERNAL on the thread pool)."""
        garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length past the end
        with grpc.insecure_channel(self.ingress.address) as channel:
            for method in ("ModelMetadata", "ServerLive", "ModelConfig"):
                call = channel.unary_unary("/inference.GRPCInferenceService/" + method)
                with self.assertRaises(grpc.RpcError) as caught:
                    call(garbage, timeout=10)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, method)
                self.assertIn("malformed", caught.exception.details())
        with grpc.insecure_channel(self.ingress.mgmt_address) as channel:
            call = channel.unary_unary("/anyserve.management.WorkerManagement/Heartbeat")
            with self.assertRaises(grpc.RpcError) as caught:
                call(garbage, timeout=10, metadata=self.ingress.mgmt_metadata())
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertTrue(self.client.is_server_live())

    def test_deadline_reaches_the_worker(self):
        before = self.cancelled()
        started = time.monotonic()
        code, _ = status_of(lambda: self.client.infer(
            "nap", infer_inputs(seconds=np.array([30.0])), client_timeout=0.5))
        self.assertEqual(code, "StatusCode.DEADLINE_EXCEEDED")
        self.assertLess(time.monotonic() - started, 2.0)
        # The probe gives itself 5 s: only the ingress's CANCEL ends it sooner.
        wait_for(lambda: self.cancelled() == (before[0] + 1, before[1] + 1), timeout=3,
                 what="a CANCEL frame and the worker dropping the request")


class RequestTimeoutTests(IngressTestCase):
    workers = (PROBE_SERVER,)
    args = ("--request-timeout", "1")
    ready = ("nap", "cancelled")

    def test_no_client_deadline_is_bounded_by_the_request_timeout(self):
        frames = lambda: int(self.client.infer("cancelled", []).as_numpy("frames")[0])  # noqa: E731
        before = frames()
        started = time.monotonic()
        code, _ = status_of(lambda: self.client.infer("nap", infer_inputs(seconds=np.array([30.0]))))
        self.assertEqual(code, "StatusCode.DEADLINE_EXCEEDED")
        self.assertLess(time.monotonic() - started, 3.0)  # 1 s, swept once a second
        # The probe gives itself 10 s: the CANCEL frame is the ingress's doing.
        wait_for(lambda: frames() == before + 1, timeout=3, what="a CANCEL frame")


class ConcurrencyLimitTests(IngressTestCase):
    workers = (PROBE_SERVER,)
    args = ("--max-concurrent-rpcs", "3")
    ready = ("nap",)

    def test_past_the_limit_is_resource_exhausted(self):
        calls = [BackgroundInfer(self.ingress.address, "nap", seconds=np.array([2.0])) for _ in range(3)]
        time.sleep(0.5)
        code, _ = status_of(lambda: self.client.infer("nap", infer_inputs(seconds=np.array([0.0]))))
        self.assertEqual(code, "StatusCode.RESOURCE_EXHAUSTED")
        for call in calls:
            self.assertEqual(call.join()[0], "ok")
        # Below the limit again: served.
        self.client.infer("nap", infer_inputs(seconds=np.array([0.0])))


on_the_other_fronts(globals())


class NoStarvationTests(IngressTestCase):
    """Asyncio front: 200 requests wait on a slow model without holding a
    thread.  The thread front holds one per RPC in flight; its answer, a
    budget of threads for inference, is tested in tests/test_thread_isolation.py."""

    workers = (KSERVE_SERVER, PROBE_SERVER)
    ready = ("add", "nap")

    def test_slow_model_starves_nothing(self):
        with grpc.insecure_channel(self.ingress.address) as channel:
            infer = channel.unary_unary(MODEL_INFER)
            waiting = [infer.future(nap_request(8.0), timeout=30) for _ in range(200)]
            time.sleep(1.0)
            self.assertEqual([f for f in waiting if f.done()], [])  # all 200 still in flight
            a = np.arange(4, dtype=np.int32)
            for _ in range(10):
                started = time.monotonic()
                self.assertTrue(self.client.is_server_live(client_timeout=2))
                np.testing.assert_array_equal(self.client.infer("add", infer_inputs(a=a, b=a),
                                                                client_timeout=2).as_numpy("sum"), 2 * a)
                self.assertLess(time.monotonic() - started, 0.5)
            for future in waiting:
                future.cancel()


class NoStarvationTestsOnH2(NoStarvationTests):
    """The HTTP/2 front serves on the reactor thread alone: the 200 waiting
    requests hold no thread there either."""

    front = "h2"

    def test_waiting_requests_add_no_thread(self):
        import os

        threads = lambda: len(os.listdir("/proc/%d/task" % self.ingress.process.pid))  # noqa: E731
        before = threads()
        with grpc.insecure_channel(self.ingress.address) as channel:
            infer = channel.unary_unary(MODEL_INFER)
            waiting = [infer.future(nap_request(8.0), timeout=30) for _ in range(200)]
            time.sleep(1.0)
            self.assertEqual([f for f in waiting if f.done()], [])
            # A few for grpc's own pollers on the management port at most, not one per request.
            self.assertLess(threads(), before + 8)
            for future in waiting:
                future.cancel()

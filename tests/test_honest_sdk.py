"""End to end, the SDK's honesty and the small things of issue 8, with a
real ingress, real workers and real clients:

- a shape numpy cannot make ([2**63-1, 0]) is INVALID_ARGUMENT, with no
  traceback in any log (it was INTERNAL with one per request);
- a 4 MB model or input name is NOT_FOUND / INVALID_ARGUMENT with a short
  message (the status echoed it whole and became RESOURCE_EXHAUSTED);
- an output the handler returns that its declared datatype can't hold, or
  of another shape than declared, is INTERNAL naming it (FP32 200.0 went
  out as INT8 -56);
- a worker pointed at the inference port says once to use --mgmt.
"""
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import KSERVE_SERVER, ROOT, Ingress, infer_inputs, status_of, wait_for

DECLARED_SERVER = os.path.join(ROOT, "tests", "workers", "declared_server.py")
HUGE = 2**63 - 1
LONG = "m" * (4 * 1024 * 1024)


class HonestSDKTests(SynchronousTestCase):
    def setUp(self):
        self.ingress = Ingress((KSERVE_SERVER, DECLARED_SERVER))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("add", "echo", "to_int8", "pair")
        self.client = self.ingress.client()
        self.channel = grpc.insecure_channel(self.ingress.address, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.addCleanup(self.channel.close)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def infer_error(self, request):
        """(status code, message) of a ModelInfer that must fail."""
        try:
            self.stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details()
        raise AssertionError("expected an error, the call succeeded")

    def test_huge_shape_is_invalid_argument_without_traceback(self):
        for datatype, raw in (("INT32", True), ("FP64", False), ("BYTES", True)):
            request = service_pb2.ModelInferRequest(model_name="echo")
            request.inputs.add(name="a", datatype=datatype, shape=[HUGE, 0])
            if raw:
                request.raw_input_contents.append(b"")
            for _ in range(3):
                code, message = self.infer_error(request)
                self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, (datatype, message))
                self.assertIn("shape [9223372036854775807, 0] is too large", message)
        np.testing.assert_array_equal(self.client.infer("add", infer_inputs(
            a=np.int32([1]), b=np.int32([2]))).as_numpy("sum"), [3])
        log = self.ingress.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("too big", log)

    def test_long_model_name_is_not_found(self):
        request = service_pb2.ModelInferRequest(model_name=LONG)
        code, message = self.infer_error(request)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertLess(len(message), 300)
        self.assertIn("... (4194304 bytes)", message)
        code, message = self.infer_error(service_pb2.ModelInferRequest(model_name="add", model_version=LONG))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertLess(len(message), 300)

    def test_long_input_name_is_invalid_argument(self):
        request = service_pb2.ModelInferRequest(model_name="add")
        for name in ("a", LONG):
            request.inputs.add(name=name, datatype="INT32", shape=[1])
            request.raw_input_contents.append(np.int32([1]).tobytes())
        code, message = self.infer_error(request)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertLess(len(message), 300)
        self.assertIn("unexpected input 'mmmm", message)

    def test_lossy_output_cast_is_internal(self):
        y = self.client.infer("to_int8", infer_inputs(x=np.float32([100.0, -128.0]))).as_numpy("y")
        self.assertEqual((y.dtype, y.tolist()), (np.int8, [100, -128]))
        for value, why in ((200.0, "200.0 is out of range"), (1.5, "1.5 has a fractional part"),
                           (float("nan"), "nan")):
            status, message = status_of(lambda: self.client.infer(
                "to_int8", infer_inputs(x=np.float32([value]))))
            self.assertEqual(status, "StatusCode.INTERNAL")
            self.assertEqual(message, "model 'to_int8': output 'y' is declared INT8, but the "
                                      "handler returned float32 values it can't hold: " + why)

    def test_undeclared_output_shape_is_internal(self):
        y = self.client.infer("pair", infer_inputs(n=np.int64([2]))).as_numpy("y")
        self.assertEqual(y.tolist(), [0.0, 0.0])
        status, message = status_of(lambda: self.client.infer("pair", infer_inputs(n=np.int64([3]))))
        self.assertEqual(status, "StatusCode.INTERNAL")
        self.assertEqual(message, "model 'pair' returned output 'y' with shape [3], but it is declared [2]")


class MisdirectedWorkerTests(SynchronousTestCase):
    def test_worker_pointed_at_the_inference_port(self):
        """A standalone worker given the inference port logs one clear error
        (not a warning per attempt) and keeps trying."""
        ingress = Ingress()
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready()
        log_path = os.path.join(ingress.tmp, "worker.log")
        env = dict(os.environ, ANYSERVE_INGRESS=ingress.address,
                   ANYSERVE_SOCKET=os.path.join(ingress.tmp, "w.sock"),
                   ANYSERVE_HEARTBEAT_INTERVAL="0.1")
        with open(log_path, "wb") as out:
            worker = subprocess.Popen([sys.executable, KSERVE_SERVER], env=env, stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=subprocess.STDOUT)
        self.addCleanup(worker.wait, 20)
        self.addCleanup(worker.send_signal, signal.SIGKILL)

        def log():
            with open(log_path) as f:
                return f.read()

        hint = ("ANYSERVE_INGRESS=%s answers as an inference server (UNIMPLEMENTED RegisterModel): "
                "point it at the ingress's --mgmt port" % ingress.address)
        wait_for(lambda: hint in log(), 15, what="the hint in the worker's log")
        time.sleep(2.0)  # attempts at 0.1, 0.3, 0.7, 1.5 s... after the first
        self.assertIsNone(worker.poll())
        self.assertEqual(log().count(hint), 1)
        self.assertNotIn("cannot register", log())
        self.assertNotIn("Traceback", log())

"""A rogue process on the ingress's host against the management API (issue 8,
point 2): it cannot take over a served model's signature, and oversized
registrations are refused without costing the ingress memory, even when it
holds the management token (an insider: tests/test_management_security.py
has the outsider).

Real processes: the ingress under twistd serving examples/kserve_server.py,
and this test as the rogue, calling WorkerManagement with the same stub the
workers use."""
import os
import socket

import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress import management
from anyserve_tw.wire import protos, rpc
from tests.harness import Ingress, KSERVE_SERVER, infer_inputs, rss_bytes, wait_for

_m = protos.management


class RogueRegistrationTests(SynchronousTestCase):
    def setUp(self):
        self.ingress = Ingress([KSERVE_SERVER])
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("add")
        self.client = self.ingress.client()
        self.channel = grpc.insecure_channel(
            self.ingress.mgmt_address,
            options=[("grpc.max_send_message_length", 4 * 1024 * 1024)])
        self.addCleanup(self.channel.close)
        self.stub = rpc.Stub(self.channel, protos.MANAGEMENT_SERVICE)
        # The rogue listens at its address, as the real attack did, so that
        # only the ingress's refusal keeps it from being routed to.
        self.rogue_socket = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.rogue_socket.close)
        self.rogue_path = os.path.join(self.ingress.tmp, "rogue.sock")
        self.rogue_socket.bind(self.rogue_path)
        self.rogue_socket.listen(1024)

    def rogue(self, name="add", worker_id="rogue", **fields):
        request = _m.RegisterModelRequest(
            model_name=name, worker_id=worker_id,
            worker_address="unix://" + self.rogue_path, worker_key="rogue-key", **fields)
        with self.assertRaises(grpc.RpcError) as caught:
            self.stub.RegisterModel(request, timeout=10, metadata=self.ingress.mgmt_metadata())
        return caught.exception

    def add(self):
        result = self.client.infer("add", infer_inputs(a=np.array([1, 2], np.int32), b=np.array([3, 4], np.int32)))
        return result.as_numpy("sum").tolist()

    def test_rogue_signature_refused(self):
        """Registering ``add`` with other tensors at another socket is refused
        with FAILED_PRECONDITION, logged once; metadata and answers unchanged."""
        before = self.client.get_model_metadata("add", as_json=True)
        self.assertEqual(self.add(), [4, 6])
        for _ in range(3):
            e = self.rogue(platform="python",
                           inputs=[_m.TensorSpec(name="x", datatype="FP32", shape=[-1])],
                           outputs=[_m.TensorSpec(name="y", datatype="FP32", shape=[-1])])
            self.assertEqual(e.code(), grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn("model 'add'", e.details())
            self.assertIn("inputs, outputs differ", e.details())
        self.assertEqual(self.client.get_model_metadata("add", as_json=True), before)
        for _ in range(20):
            self.assertEqual(self.add(), [4, 6])
        wait_for(lambda: "registration from worker rogue refused" in self.ingress.log(), what="refusal logged")
        self.assertEqual(self.ingress.log().count("registration from worker rogue refused"), 1)

    def test_huge_name_refused_without_growing_memory(self):
        """200 registrations with 1 MB names: INVALID_ARGUMENT with a short
        message; the ingress keeps none of them (measured on today's main
        before this fix: 205 MB, never freed)."""
        name = "n" * (1024 * 1024)
        pid = self.ingress.process.pid
        for i in range(100):  # gRPC's and the allocator's buffers settle (about 60 MB)
            self.rogue(name, worker_id="rogue%d" % i)
        before = rss_bytes(pid)
        for i in range(200):
            e = self.rogue(name, worker_id="rogue%d" % i)
            self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("model name is 1048576 bytes, more than the %d allowed"
                          % management.MAX_NAME_BYTES, e.details())
            self.assertLess(len(e.details()), 400)
        grown = rss_bytes(pid) - before
        # Keeping the names would cost 200 MB; allocator noise is a few MB.
        self.assertLess(grown, 50 * 1024 * 1024, "ingress RSS grew by %d bytes" % grown)
        self.assertEqual(self.add(), [4, 6])

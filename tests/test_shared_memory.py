"""End to end: Triton's system shared-memory and classification extensions
through a real ingress and the example worker, with tritonclient.grpc.

The client's side of shared memory (create, fill, read, destroy a POSIX
object) uses ``multiprocessing.shared_memory``, as tritonclient's own
``tritonclient.utils.shared_memory`` does in its current releases (the
2.41 one imports ``pkg_resources``, which recent setuptools no longer has).
"""
import os
import shutil
import tempfile
import textwrap
import uuid
from multiprocessing import shared_memory

import numpy as np
import tritonclient.grpc as grpcclient
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import KSERVE_SERVER, Ingress, infer_inputs, status_of

#: A worker whose model declares class labels for its output.
LABELLED_WORKER = textwrap.dedent('''
    from anyserve_tw import AnyServe

    app = AnyServe()


    @app.model("scores", inputs=[("x", "FP32", [-1])], outputs=[("p", "FP32", [-1])],
               labels={"p": ["cat", "dog", "bird"]})
    def scores(request):
        return {"p": request["x"]}


    if __name__ == "__main__":
        app.run()
''')




class SharedMemoryTests(SynchronousTestCase):
    def setUp(self):
        scripts = tempfile.mkdtemp(prefix="as-shm-")
        self.addCleanup(shutil.rmtree, scripts, True)
        labelled = os.path.join(scripts, "labelled_server.py")
        with open(labelled, "w") as f:
            f.write(LABELLED_WORKER)
        self.ingress = Ingress((KSERVE_SERVER, labelled))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("add", "scores")
        self.client = self.ingress.client()

    def create(self, size, key=None):
        """A new POSIX shared-memory object: (key, block)."""
        name = key.lstrip("/") if key else "as-e2e-" + uuid.uuid4().hex[:12]
        block = shared_memory.SharedMemory(name=name, create=True, size=size)
        self.addCleanup(self.destroy, block)
        return "/" + name, block

    def destroy(self, block):
        block.close()
        try:
            block.unlink()
        except FileNotFoundError:
            pass

    def regions(self):
        return {name: (r.key, r.offset, r.byte_size)
                for name, r in self.client.get_system_shared_memory_status().regions.items()}

    def infer_add(self, a_region="in", a_offset=0, a_size=16, out_size=16, shape=(4,)):
        a = grpcclient.InferInput("a", list(shape), "INT32")
        a.set_shared_memory(a_region, a_size, a_offset)
        b = grpcclient.InferInput("b", list(shape), "INT32")
        b.set_shared_memory("in", 16, 16)
        out = grpcclient.InferRequestedOutput("sum")
        out.set_shared_memory("out", out_size)
        return self.client.infer("add", [a, b], outputs=[out])

    def register_add_regions(self):
        """Regions "in" (a at 0, b at 16) and "out" of one object, registered."""
        key, block = self.create(64)
        self.a = np.array([1, 2, 3, 4], dtype=np.int32)
        self.b = np.array([10, 20, 30, 40], dtype=np.int32)
        block.buf[0:16] = self.a.tobytes()
        block.buf[16:32] = self.b.tobytes()
        self.client.register_system_shared_memory("in", key, 32)
        self.client.register_system_shared_memory("out", key, 16, offset=48)
        return key, block

    def test_add_in_shared_memory(self):
        """Inputs read from the client's region, the sum written into it; the
        response names the output, shape and type but carries no bytes."""
        key, block = self.register_add_regions()
        self.assertEqual(self.regions(), {"in": (key, 0, 32), "out": (key, 48, 16)})
        result = self.infer_add()
        output = result.get_output("sum")
        self.assertEqual((output.datatype, list(output.shape)), ("INT32", [4]))
        self.assertEqual(output.parameters["shared_memory_region"].string_param, "out")
        self.assertEqual(list(result.get_response().raw_output_contents), [b""])
        np.testing.assert_array_equal(np.frombuffer(block.buf[48:64], dtype=np.int32), self.a + self.b)
        # The worker reads the region as it is now, not a copy from before.
        block.buf[0:16] = np.full(4, 100, dtype=np.int32).tobytes()
        self.infer_add()
        np.testing.assert_array_equal(np.frombuffer(block.buf[48:64], dtype=np.int32), 100 + self.b)
        np.testing.assert_array_equal(
            self.client.infer("add", infer_inputs(a=self.a, b=self.a)).as_numpy("sum"), 2 * self.a)

    def test_errors(self):
        """Each mistake fails its own request with Triton's status and
        words; the ingress and the worker carry on."""
        key, _ = self.register_add_regions()
        cases = [
            (lambda: self.infer_add(a_region="nowhere"), "StatusCode.NOT_FOUND",
             "Unable to find shared memory region: 'nowhere'"),
            (lambda: self.infer_add(a_offset=32), "StatusCode.INVALID_ARGUMENT",
             "Invalid offset for shared memory region: 'in'"),
            (lambda: self.infer_add(a_offset=20), "StatusCode.INVALID_ARGUMENT",
             "Invalid offset + byte size for shared memory region: 'in'"),
            (lambda: self.infer_add(a_size=12), "StatusCode.INVALID_ARGUMENT",
             "input byte size mismatch for input 'a' for model 'add'. Expected 16, got 12"),
            (lambda: self.infer_add(out_size=8), "StatusCode.INTERNAL",
             "should be at least 16 bytes to hold the results"),
            (lambda: self.client.register_system_shared_memory("in", key, 8), "StatusCode.ALREADY_EXISTS",
             "shared memory region 'in' already in manager"),
            (lambda: self.client.register_system_shared_memory("x", "/as-e2e-missing-" + uuid.uuid4().hex, 8),
             "StatusCode.INTERNAL", "Unable to open shared memory region"),
            (lambda: self.client.register_system_shared_memory("x", key, 64, offset=8),
             "StatusCode.INVALID_ARGUMENT", "failed to register shared memory region 'x'"),
            (lambda: self.client.get_system_shared_memory_status("x"), "StatusCode.NOT_FOUND",
             "Unable to find system shared memory region: 'x'"),
        ]
        for call, status, message in cases:
            got_status, got_message = status_of(call)
            self.assertEqual(got_status, status, got_message)
            self.assertIn(message, got_message)
        self.assertEqual(sorted(self.regions()), ["in", "out"])
        self.client.unregister_system_shared_memory("never-registered")  # Triton: no error
        self.infer_add()
        self.assertTrue(self.client.is_server_live())

    def test_unregister_all_then_register_anew(self):
        """Unregister-all empties the table workers read; a new object under
        the same key and names is then mapped afresh, not through the old
        mapping."""
        key, block = self.register_add_regions()
        self.infer_add()
        self.client.unregister_system_shared_memory()
        self.assertEqual(self.regions(), {})
        self.assertIn("Unable to find shared memory region: 'in'", status_of(self.infer_add)[1])
        self.destroy(block)
        key, block = self.create(64, key=key)
        block.buf[0:32] = np.arange(8, dtype=np.int32).tobytes()
        self.client.register_system_shared_memory("in", key, 32)
        self.client.register_system_shared_memory("out", key, 16, offset=48)
        self.infer_add()
        np.testing.assert_array_equal(np.frombuffer(block.buf[48:64], dtype=np.int32), [4, 6, 8, 10])

    def test_classification(self):
        """``class_count``: the top values as "value:index[:label]" BYTES."""
        out = grpcclient.InferRequestedOutput("sum", class_count=2)
        result = self.client.infer("add", infer_inputs(a=np.array([5, 1, 9], np.int32),
                                                       b=np.zeros(3, np.int32)), outputs=[out])
        self.assertEqual(result.get_output("sum").datatype, "BYTES")
        self.assertEqual(result.as_numpy("sum").tolist(), [b"9:2", b"5:0"])
        out = grpcclient.InferRequestedOutput("p", class_count=3)
        result = self.client.infer("scores", infer_inputs(x=np.array([0.25, 0.5, 0.125, 1.0], np.float32)),
                                   outputs=[out])
        self.assertEqual(result.as_numpy("p").tolist(),
                         [b"1.000000:3", b"0.500000:1:dog", b"0.250000:0:cat"])
        echo = grpcclient.InferRequestedOutput("t", class_count=1)
        status, message = status_of(lambda: self.client.infer(
            "echo", infer_inputs(t=np.array([b"x"], dtype=object)), outputs=[echo]))
        self.assertEqual(status, "StatusCode.INVALID_ARGUMENT")
        self.assertIn("unsupported type 'BYTES'", message)

"""Tests for Triton's system shared-memory and classification extensions:
the ingress's registry (anyserve_tw.ingress.sharedmemory), the worker's table
(anyserve_tw.worker.sharedmemory) and what Model makes of requests naming
regions or asking for classes.  Real POSIX shared-memory objects throughout;
requests are built by tritonclient, responses read back by it."""
import gc
import os
import shutil
import tempfile
import uuid
from multiprocessing import shared_memory

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import _utils as client_utils
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.sharedmemory import SharedMemoryRegistry
from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.payloads import Region, encode_shm_table
from anyserve_tw.worker.model import Model
from anyserve_tw.worker.sharedmemory import SharedMemoryTable

_v2 = protos.inference


class ShmObjects:
    """Creates POSIX shared-memory objects and removes them after the test."""

    def make_object(self, size, fill=None):
        """A new object of ``size`` bytes: (key, SharedMemory)."""
        block = shared_memory.SharedMemory(create=True, size=size, name="as-test-" + uuid.uuid4().hex[:12])
        self.addCleanup(self._remove, block)
        if fill is not None:
            block.buf[:len(fill)] = fill
        return "/" + block.name, block

    def _remove(self, block):
        try:
            block.close()
        except BufferError:  # a test's view still alive: gone with the test
            pass
        try:
            block.unlink()
        except FileNotFoundError:
            pass

    def assertStatus(self, call, code, *fragments):
        error = self.assertRaises(InferenceError, call)
        self.assertEqual(error.code, code, error.message)
        for fragment in fragments:
            self.assertIn(fragment, error.message)
        return error


class RegistryTests(ShmObjects, SynchronousTestCase):
    """The ingress's list of regions, as Triton's server answers."""

    def setUp(self):
        self.changes = []
        self.registry = SharedMemoryRegistry(on_change=self.changes.append)

    def test_register_status_table(self):
        key, _ = self.make_object(64)
        self.registry.register("in", key, 16, 32)
        self.assertEqual(self.registry.status(), {"in": Region(key, 16, 32)})
        self.assertEqual(self.registry.status("in"), {"in": Region(key, 16, 32)})
        self.assertEqual(self.registry.table(), {"in": Region(key, 16, 32)})
        self.assertEqual(self.changes, [{"in": Region(key, 16, 32)}])

    def test_window_up_to_the_end(self):
        """A window ending exactly at the object's end is fine; one byte
        further is INVALID_ARGUMENT naming the numbers."""
        key, _ = self.make_object(64)
        self.registry.register("a", key, 0, 64)
        self.registry.register("b", key.lstrip("/"), 63, 1)  # shm_open's leading slash is optional
        self.assertStatus(lambda: self.registry.register("c", key, 33, 32),
                          grpc.StatusCode.INVALID_ARGUMENT,
                          "failed to register shared memory region 'c'", "33", "32", "64 bytes")
        self.assertEqual(sorted(self.registry.status()), ["a", "b"])

    def test_name_taken(self):
        key, _ = self.make_object(8)
        self.registry.register("in", key, 0, 8)
        self.assertStatus(lambda: self.registry.register("in", key, 0, 4),
                          grpc.StatusCode.ALREADY_EXISTS,
                          "shared memory region 'in' already in manager")
        self.assertEqual(self.registry.status("in"), {"in": Region(key, 0, 8)})
        self.assertEqual(len(self.changes), 1)

    def test_no_such_object(self):
        """Triton's answer: INTERNAL, naming the key."""
        missing = "/as-test-missing-" + uuid.uuid4().hex
        self.assertStatus(lambda: self.registry.register("in", missing, 0, 8),
                          grpc.StatusCode.INTERNAL, "Unable to open shared memory region: '%s'" % missing)
        self.assertEqual((self.registry.status(), self.changes), ({}, []))

    def test_bad_names_and_keys(self):
        key, _ = self.make_object(8)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        for name, bad in (("", key), ("x", ""), ("x", "/"), ("x", "//"), ("x", "/.."),
                          ("x", "/../etc/passwd"), ("x", "dir/obj"), ("x", "/./" + key)):
            self.assertStatus(lambda: self.registry.register(name, bad, 0, 1), invalid)
        self.assertStatus(lambda: self.registry.register("x" * 257, key, 0, 1), invalid, "longer than 256")
        self.assertStatus(lambda: self.registry.register("x", "/" + "k" * 256, 0, 1), invalid)
        self.assertStatus(lambda: self.registry.register("x", key, -1, 1), invalid)
        self.assertEqual(self.registry.status(), {})

    def test_symlinks_and_directories_are_not_objects(self):
        """A symlink in the shm directory does not lead elsewhere (shm_open
        does not follow them either), nor is a directory an object."""
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: (os.unlink(os.path.join(directory, "link")),
                                 os.rmdir(os.path.join(directory, "sub")),
                                 os.unlink(os.path.join(directory, "real")), os.rmdir(directory)))
        with open(os.path.join(directory, "real"), "wb") as f:
            f.write(b"\0" * 16)
        os.symlink(os.path.join(directory, "real"), os.path.join(directory, "link"))
        os.mkdir(os.path.join(directory, "sub"))
        registry = SharedMemoryRegistry(directory=directory)
        registry.register("real", "/real", 0, 16)
        self.assertStatus(lambda: registry.register("l", "/link", 0, 16), grpc.StatusCode.INTERNAL)
        self.assertStatus(lambda: registry.register("d", "/sub", 0, 0), grpc.StatusCode.INVALID_ARGUMENT,
                          "not a shared memory object")

    def test_cap_on_regions(self):
        key, _ = self.make_object(8)
        registry = SharedMemoryRegistry(max_regions=2)
        registry.register("a", key, 0, 8)
        registry.register("b", key, 0, 8)
        self.assertStatus(lambda: registry.register("c", key, 0, 8), grpc.StatusCode.RESOURCE_EXHAUSTED)
        registry.unregister("a")
        registry.register("c", key, 0, 8)

    def test_unregister(self):
        """One name, an unknown name (success, no change), then all."""
        key, _ = self.make_object(8)
        for name in ("a", "b", "c"):
            self.registry.register(name, key, 0, 8)
        self.registry.unregister("b")
        self.assertEqual(sorted(self.registry.status()), ["a", "c"])
        self.assertEqual(sorted(self.changes[-1]), ["a", "c"])
        changes = len(self.changes)
        self.registry.unregister("b")
        self.registry.unregister("never")
        self.assertEqual(len(self.changes), changes)
        self.registry.unregister("")
        self.assertEqual((self.registry.status(), self.changes[-1]), ({}, {}))
        self.registry.unregister("")
        self.assertEqual(len(self.changes), changes + 1)

    def test_status_of_unknown_region(self):
        self.assertStatus(lambda: self.registry.status("nope"), grpc.StatusCode.NOT_FOUND,
                          "Unable to find system shared memory region: 'nope'")


class TableTests(ShmObjects, SynchronousTestCase):
    """The worker's regions and its mappings of them."""

    def setUp(self):
        self.table = SharedMemoryTable()

    def test_read_views_the_clients_memory(self):
        key, block = self.make_object(64, fill=bytes(range(64)))
        self.table.update(encode_shm_table({"r": Region(key, 8, 32)}))
        view = self.table.read("r", 4, 8)
        self.assertEqual(bytes(view), bytes(range(12, 20)))
        self.assertTrue(view.readonly)
        block.buf[12] = 200  # the client writes: no copy in between
        self.assertEqual(view[0], 200)
        self.assertEqual(bytes(self.table.read("r", 0, 0)), b"")

    def test_empty_payload_is_an_empty_table(self):
        key, _ = self.make_object(8)
        self.table.update(encode_shm_table({"r": Region(key, 0, 8)}))
        self.table.update(b"")
        self.assertEqual(self.table.regions(), {})
        self.assertStatus(lambda: self.table.read("r", 0, 8), grpc.StatusCode.NOT_FOUND,
                          "Unable to find shared memory region: 'r'")

    def test_bounds(self):
        """Triton's messages, with the numbers."""
        key, _ = self.make_object(64)
        self.table.update(encode_shm_table({"r": Region(key, 16, 32)}))
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        self.assertStatus(lambda: self.table.read("r", 32, 1), invalid,
                          "Invalid offset for shared memory region: 'r'", "offset 32", "32 bytes")
        self.assertStatus(lambda: self.table.read("r", 8, 25), invalid,
                          "Invalid offset + byte size for shared memory region: 'r'", "offset 8", "25")
        self.assertStatus(lambda: self.table.read("r", -1, 4), invalid)
        self.assertEqual(len(self.table.read("r", 8, 24)), 24)

    def test_write(self):
        key, block = self.make_object(32)
        self.table.update(encode_shm_table({"out": Region(key, 4, 16)}))
        written = self.table.write("out", 2, 12, [b"abcd", np.arange(2, dtype="<i4")])
        self.assertEqual(written, 12)
        self.assertEqual(bytes(block.buf[6:18]), b"abcd" + np.arange(2, dtype="<i4").tobytes())
        self.assertStatus(lambda: self.table.write("out", 0, 4, [b"12345"]),
                          grpc.StatusCode.INVALID_ARGUMENT, "5 bytes", "4-byte")
        self.assertStatus(lambda: self.table.write("out", 0, 17, [b"x"]), grpc.StatusCode.INVALID_ARGUMENT)

    def test_one_mapping_per_object(self):
        key, _ = self.make_object(64)
        self.table.update(encode_shm_table({"a": Region(key, 0, 32), "b": Region(key, 32, 32)}))
        self.table.read("a", 0, 1)
        self.table.read("b", 0, 1)
        self.assertEqual(list(self.table._maps), [key])

    def test_unregistered_while_viewed(self):
        """An array made from a region outlives the region's registration,
        and the object being replaced under the same key: it keeps the old
        mapping, and the table maps the new object."""
        key, block = self.make_object(16, fill=b"\x01" * 16)
        self.table.update(encode_shm_table({"r": Region(key, 0, 16)}))
        held = np.frombuffer(self.table.read("r", 0, 16), dtype=np.uint8)
        self.table.update(b"")
        self.assertEqual(self.table._maps, {})
        gc.collect()
        self.assertEqual(held.tolist(), [1] * 16)
        # The client destroys the object and makes a new one with that key.
        block.close()
        block.unlink()
        replacement = shared_memory.SharedMemory(name=key.lstrip("/"), create=True, size=16)
        self.addCleanup(self._remove, replacement)
        replacement.buf[:16] = b"\x02" * 16
        self.table.update(encode_shm_table({"r": Region(key, 0, 16)}))
        self.assertEqual(bytes(self.table.read("r", 0, 16)), b"\x02" * 16)
        self.assertEqual(held.tolist(), [1] * 16)

    def test_replaced_object_while_still_listed(self):
        """A key whose object was replaced between two tables that both list
        it is mapped again, not read through the stale mapping."""
        key, block = self.make_object(8, fill=b"\x01" * 8)
        table = encode_shm_table({"r": Region(key, 0, 8)})
        self.table.update(table)
        self.assertEqual(bytes(self.table.read("r", 0, 8)), b"\x01" * 8)
        block.close()
        block.unlink()
        replacement = shared_memory.SharedMemory(name=key.lstrip("/"), create=True, size=8)
        self.addCleanup(self._remove, replacement)
        replacement.buf[:8] = b"\x03" * 8
        self.table.update(table)
        self.assertEqual(bytes(self.table.read("r", 0, 8)), b"\x03" * 8)

    def test_object_gone_or_shrunk_before_mapping(self):
        key, block = self.make_object(64)
        self.table.update(encode_shm_table({"r": Region(key, 0, 64)}))
        os.ftruncate(block._fd, 16)
        self.assertStatus(lambda: self.table.read("r", 0, 64), grpc.StatusCode.INVALID_ARGUMENT,
                          "now 16 bytes")
        missing = "/as-test-missing-" + uuid.uuid4().hex
        self.table.update(encode_shm_table({"r": Region(missing, 0, 8)}))
        self.assertStatus(lambda: self.table.read("r", 0, 8), grpc.StatusCode.INTERNAL,
                          "Unable to open shared memory region: '%s'" % missing)

    def test_tables_per_source(self):
        """Frames on different connections are not ordered: each connection's
        requests read through that connection's last table."""
        key, _ = self.make_object(16, fill=b"abcdefghijklmnop")
        old = encode_shm_table({"r": Region(key, 0, 8)})
        new = encode_shm_table({"r": Region(key, 8, 8)})
        self.table.update(new, source="fast")
        self.table.update(old, source="slow")  # late, on the other connection
        self.assertEqual(bytes(self.table.view("fast").read("r", 0, 8)), b"ijklmnop")
        self.assertEqual(bytes(self.table.view("slow").read("r", 0, 8)), b"abcdefgh")
        self.table.forget("slow")
        self.table.forget("fast")
        self.assertEqual(self.table._maps, {})
        self.assertStatus(lambda: self.table.view("fast").read("r", 0, 8), grpc.StatusCode.NOT_FOUND)


def add_model(**kwargs):
    return Model(lambda request: {"sum": request["a"] + request["b"]}, "add",
                 inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])],
                 outputs=[("sum", "INT32", [-1])], **kwargs)


def echo_model():
    return Model(lambda request: {n: t.as_numpy() for n, t in request.inputs.items()}, "echo")


def client_request(model, inputs, outputs=None, raw=None):
    """A request as tritonclient.grpc builds it, serialized; ``raw``
    replaces its raw_input_contents."""
    request = client_utils._get_inference_request(model, inputs, "", "", outputs, 0, False, False, 0,
                                                  None, None)
    if raw is not None:
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(raw)
    return request.SerializeToString()


def client_input(name, array, datatype="INT32"):
    tensor = grpcclient.InferInput(name, list(np.shape(array)), datatype)
    tensor.set_data_from_numpy(np.asarray(array))
    return tensor


def shm_input(name, shape, region, byte_size, offset=0, datatype="INT32"):
    tensor = grpcclient.InferInput(name, list(shape), datatype)
    tensor.set_shared_memory(region, byte_size, offset)
    return tensor


def result_of(parts):
    """tritonclient's InferResult of a worker's response parts."""
    from tritonclient.grpc import service_pb2

    return grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(b"".join(parts)))


class ModelSharedMemoryTests(ShmObjects, SynchronousTestCase):
    """Inputs read from and outputs written into registered regions."""

    def setUp(self):
        self.key, self.block = self.make_object(256)
        self.table = SharedMemoryTable()
        self.table.update(encode_shm_table({
            "in": Region(self.key, 0, 128), "out": Region(self.key, 128, 128)}))
        self.a = np.arange(4, dtype="<i4")
        self.b = np.array([10, 20, 30, 40], dtype="<i4")
        self.block.buf[0:16] = self.a.tobytes()
        self.block.buf[32:48] = self.b.tobytes()

    def out(self, count=4):
        return np.frombuffer(self.block.buf[128:128 + 4 * count], dtype="<i4").copy()

    def test_inputs_and_output_in_shared_memory(self):
        """No tensor bytes in either message: the inputs are views of the
        region, the sum is written into it, and the response names it."""
        seen = {}

        def add(request):
            seen["a"] = request["a"]
            return {"sum": request["a"] + request["b"]}

        model = Model(add, "add", inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])],
                      outputs=[("sum", "INT32", [-1])])
        output = grpcclient.InferRequestedOutput("sum")
        output.set_shared_memory("out", 16)
        payload = client_request("add", [shm_input("a", [4], "in", 16),
                                         shm_input("b", [4], "in", 16, offset=32)], [output])
        self.assertNotIn(self.a.tobytes(), payload)
        parts = model.serve(payload, shared_memory=self.table)
        self.assertFalse(seen["a"].flags.writeable)
        self.block.buf[0:4] = np.int32(99).tobytes()  # a view of the region, not a copy
        self.assertEqual(seen["a"][0], 99)
        np.testing.assert_array_equal(self.out(), self.a + self.b)
        response = _v2.ModelInferResponse.FromString(b"".join(parts))
        tensor = response.outputs[0]
        self.assertEqual((tensor.name, tensor.datatype, list(tensor.shape)), ("sum", "INT32", [4]))
        self.assertEqual((tensor.parameters["shared_memory_region"].string_param,
                          tensor.parameters["shared_memory_byte_size"].int64_param),
                         ("out", 16))
        self.assertEqual(list(response.raw_output_contents), [b""])

    def test_mixed_raw_and_shared_memory(self):
        """tritonclient sends raw contents only for the inputs not in shared
        memory; one entry per input (empty for those in shared memory) is
        read the same."""
        inputs = [shm_input("a", [4], "in", 16), client_input("b", self.b)]
        compact = client_request("add", inputs)
        aligned = client_request("add", inputs, raw=[b"", self.b.tobytes()])
        for payload in (compact, aligned):
            result = result_of(add_model().serve(payload, shared_memory=self.table))
            np.testing.assert_array_equal(result.as_numpy("sum"), self.a + self.b)
        clash = client_request("add", inputs, raw=[self.a.tobytes(), self.b.tobytes()])
        self.assertStatus(lambda: add_model().serve(clash, shared_memory=self.table),
                          grpc.StatusCode.INVALID_ARGUMENT, "input 'a' is in shared memory")
        too_many = client_request("add", inputs, raw=[b"", b"", b""])
        self.assertStatus(lambda: add_model().serve(too_many, shared_memory=self.table),
                          grpc.StatusCode.INVALID_ARGUMENT, "3 raw_input_contents for 2 inputs, 1 of them")

    def test_outputs_keep_their_positions(self):
        """An output in shared memory leaves an empty raw entry, so
        tritonclient still finds the others' bytes by position."""
        model = Model(lambda r: {"x": r["a"] * 2, "y": r["a"] + 1}, "two")
        x = grpcclient.InferRequestedOutput("x")
        x.set_shared_memory("out", 16)
        payload = client_request("two", [client_input("a", self.a)],
                                 [x, grpcclient.InferRequestedOutput("y")])
        result = result_of(model.serve(payload, shared_memory=self.table))
        np.testing.assert_array_equal(self.out(), self.a * 2)
        np.testing.assert_array_equal(result.as_numpy("y"), self.a + 1)
        self.assertEqual(list(result.get_output("x").shape), [4])

    def test_byte_size_must_match(self):
        payload = client_request("add", [shm_input("a", [4], "in", 20), client_input("b", self.b)])
        self.assertStatus(lambda: add_model().decode(payload, shared_memory=self.table),
                          grpc.StatusCode.INVALID_ARGUMENT,
                          "input byte size mismatch for input 'a' for model 'add'. Expected 16, got 20")

    def test_region_errors(self):
        for region, offset, code, message in (
                ("nope", 0, grpc.StatusCode.NOT_FOUND, "Unable to find shared memory region: 'nope'"),
                ("in", 128, grpc.StatusCode.INVALID_ARGUMENT, "Invalid offset for shared memory region: 'in'"),
                ("in", 120, grpc.StatusCode.INVALID_ARGUMENT, "Invalid offset + byte size")):
            payload = client_request("add", [shm_input("a", [4], region, 16, offset),
                                             client_input("b", self.b)])
            self.assertStatus(lambda: add_model().decode(payload, shared_memory=self.table), code, message)
        payload = client_request("add", [shm_input("a", [4], "in", 16), client_input("b", self.b)])
        self.assertStatus(lambda: add_model().decode(payload), grpc.StatusCode.INVALID_ARGUMENT,
                          "no shared-memory table")

    def test_malformed_parameters(self):
        """Triton's rules: region and byte size together, of the right types."""
        request = _v2.ModelInferRequest(model_name="add")
        a = request.inputs.add(name="a", datatype="INT32", shape=[4])
        request.inputs.add(name="b", datatype="INT32", shape=[4], contents=_v2.InferTensorContents(
            int_contents=[1, 2, 3, 4]))
        cases = [
            ({"shared_memory_region": "in"}, "'shared_memory_byte_size' must be given"),
            ({"shared_memory_byte_size": 16}, "can not be given without 'shared_memory_region'"),
            ({"shared_memory_region": 5, "shared_memory_byte_size": 16}, "expected string_param"),
            ({"shared_memory_region": "in", "shared_memory_byte_size": "16"}, "expected int64_param"),
        ]
        for parameters, message in cases:
            a.ClearField("parameters")
            for key, value in parameters.items():
                if isinstance(value, str):
                    a.parameters[key].string_param = value
                else:
                    a.parameters[key].int64_param = value
            payload = request.SerializeToString()
            self.assertStatus(lambda: add_model().decode(payload, shared_memory=self.table),
                              grpc.StatusCode.INVALID_ARGUMENT, message)
        a.ClearField("parameters")
        a.parameters["shared_memory_region"].string_param = "in"
        a.parameters["shared_memory_byte_size"].int64_param = 16
        a.contents.int_contents.extend([1, 2, 3, 4])
        payload = request.SerializeToString()
        self.assertStatus(lambda: add_model().decode(payload, shared_memory=self.table),
                          grpc.StatusCode.INVALID_ARGUMENT, "unexpected 'contents'")

    def test_bytes_in_shared_memory(self):
        """BYTES tensors go as tritonclient serializes them: length-prefixed."""
        from tritonclient.utils import serialize_byte_tensor

        words = np.array([b"hello", b"shared", b"memory"], dtype=object)
        data = serialize_byte_tensor(words).item()
        self.block.buf[0:len(data)] = data
        output = grpcclient.InferRequestedOutput("w")
        output.set_shared_memory("out", 64)
        payload = client_request("echo", [shm_input("w", [3], "in", len(data), datatype="BYTES")], [output])
        response = _v2.ModelInferResponse.FromString(b"".join(echo_model().serve(payload, shared_memory=self.table)))
        self.assertEqual(response.outputs[0].datatype, "BYTES")
        self.assertEqual(bytes(self.block.buf[128:128 + len(data)]), data)

    def test_output_larger_than_its_window(self):
        output = grpcclient.InferRequestedOutput("sum")
        output.set_shared_memory("out", 12)
        payload = client_request("add", [client_input("a", self.a), client_input("b", self.b)], [output])
        self.assertStatus(lambda: add_model().serve(payload, shared_memory=self.table),
                          grpc.StatusCode.INTERNAL,
                          "shared memory size specified with the request for output 'sum' (12 bytes) "
                          "should be at least 16 bytes")
        np.testing.assert_array_equal(self.out(3), [0, 0, 0])

    def test_output_region_resolved_when_decoded(self):
        """A region the client unregisters while its request runs is still
        written (Triton keeps it too); a region unknown at decode fails the
        request before the handler runs."""
        output = grpcclient.InferRequestedOutput("sum")
        output.set_shared_memory("out", 16)
        payload = client_request("add", [client_input("a", self.a), client_input("b", self.b)], [output])
        model = add_model()
        request = model.decode(payload, shared_memory=self.table)
        self.table.update(b"")
        gc.collect()
        model.respond(request, model.call(request))
        np.testing.assert_array_equal(self.out(), self.a + self.b)
        calls = []
        model = Model(lambda r: calls.append(r), "add")
        self.assertStatus(lambda: model.serve(payload, shared_memory=self.table), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(calls, [])


def classify_request(name, count, inputs=None):
    return client_request("m", inputs or [client_input("x", np.zeros(1, np.float32), "FP32")],
                          [grpcclient.InferRequestedOutput(name, class_count=count)])


class ClassificationTests(ShmObjects, SynchronousTestCase):
    """Top-k "value:index[:label]" strings instead of an output's values."""

    def classes(self, model, name, count):
        result = result_of(model.serve(classify_request(name, count)))
        tensor = result.get_output(name)
        self.assertEqual(tensor.datatype, "BYTES")
        return result.as_numpy(name)

    def test_triton_docs_example(self):
        """The extension's own example: [1.1, 3.3, 0.5, 2.4], two classes."""
        scores = np.array([1.1, 3.3, 0.5, 2.4], dtype=np.float32)
        model = Model(lambda r: {"out": scores}, "m")
        self.assertEqual(self.classes(model, "out", 2).tolist(), [b"3.300000:1", b"2.400000:3"])
        labelled = Model(lambda r: {"out": scores}, "m", labels={"out": ["a", "b", "c"]})
        self.assertEqual(self.classes(labelled, "out", 4).tolist(),
                         [b"3.300000:1:b", b"2.400000:3", b"1.100000:0:a", b"0.500000:2:c"])

    def test_integers_ties_and_more_classes_than_values(self):
        model = Model(lambda r: {"out": np.array([1, 5, 10, 5], dtype=np.int32)}, "m",
                      outputs=[("out", "INT32", [-1])])
        self.assertEqual(self.classes(model, "out", 9).tolist(), [b"10:2", b"5:1", b"5:3", b"1:0"])
        unsigned = Model(lambda r: {"out": np.array([3, 250], dtype=np.uint8)}, "m")
        self.assertEqual(self.classes(unsigned, "out", 1).tolist(), [b"250:1"])

    def test_batch_dimension(self):
        """Per batch entry, shape [batch, k], when the model batches; over
        the whole tensor, shape [k], when it does not."""
        scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], dtype=np.float32)
        model = Model(lambda r: {"out": scores}, "m")
        model.max_batch_size = 8
        self.assertEqual(self.classes(model, "out", 2).tolist(),
                         [[b"0.900000:1", b"0.500000:2"], [b"0.700000:0", b"0.300000:2"]])
        model.max_batch_size = 0
        self.assertEqual(self.classes(model, "out", 2).tolist(), [b"0.900000:1", b"0.700000:3"])

    def test_only_the_requested_output_is_classified(self):
        model = Model(lambda r: {"p": np.array([0.2, 0.8], np.float32), "q": np.array([7, 8], np.int64)}, "m")
        payload = client_request("m", [client_input("x", np.zeros(1, np.float32), "FP32")],
                                 [grpcclient.InferRequestedOutput("p", class_count=1),
                                  grpcclient.InferRequestedOutput("q")])
        result = result_of(model.serve(payload))
        self.assertEqual(result.as_numpy("p").tolist(), [b"0.800000:1"])
        self.assertEqual(result.as_numpy("q").tolist(), [7, 8])

    def test_not_numeric(self):
        """BYTES and BOOL outputs have no classes: INVALID_ARGUMENT, before
        the handler runs when the output is declared so."""
        model = Model(lambda r: {"out": np.array([b"a"], dtype=object)}, "m")
        self.assertStatus(lambda: model.serve(classify_request("out", 1)), grpc.StatusCode.INVALID_ARGUMENT,
                          "class result not available for output 'out' due to unsupported type 'BYTES'")
        calls = []
        declared = Model(lambda r: calls.append(r), "m", outputs=[("out", "BOOL", [-1])])
        self.assertStatus(lambda: declared.serve(classify_request("out", 1)), grpc.StatusCode.INVALID_ARGUMENT,
                          "unsupported type 'BOOL'")
        self.assertEqual(calls, [])

    def test_bad_parameters(self):
        model = Model(lambda r: {"out": np.zeros(2, np.float32)}, "m")
        request = _v2.ModelInferRequest(model_name="m")
        output = request.outputs.add(name="out")
        for set_value, message in ((lambda p: setattr(p, "int64_param", 0), "expected > 0"),
                                   (lambda p: setattr(p, "string_param", "2"), "expected int64_param")):
            output.ClearField("parameters")
            set_value(output.parameters["classification"])
            payload = request.SerializeToString()
            self.assertStatus(lambda: model.serve(payload), grpc.StatusCode.INVALID_ARGUMENT, message)
        output.ClearField("parameters")
        output.parameters["classification"].int64_param = 1
        output.parameters["shared_memory_region"].string_param = "out"
        output.parameters["shared_memory_byte_size"].int64_param = 8
        payload = request.SerializeToString()
        self.assertStatus(lambda: model.serve(payload, shared_memory=SharedMemoryTable()),
                          grpc.StatusCode.INVALID_ARGUMENT, "can't set both")

    def test_labels_are_checked(self):
        self.assertRaises(ValueError, Model, lambda r: None, "m", outputs=[("out", "FP32", [-1])],
                          labels={"other": ["a"]})
        self.assertRaises(TypeError, Model, lambda r: None, "m", labels={"out": "abc"})
        self.assertRaises(TypeError, Model, lambda r: None, "m", labels=["a"])


class HandlerFailureTests(SynchronousTestCase):
    def test_traceback_is_logged(self):
        """A handler's exception is INTERNAL to the client and its traceback,
        naming the model, is in the worker's log."""
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def broken(request):
            raise KeyError("missing thing")

        model = Model(broken, "brittle")
        payload = client_request("brittle", [client_input("a", np.zeros(1, np.int32))])
        error = self.assertRaises(InferenceError, model.serve, payload)
        self.assertEqual(error.code, grpc.StatusCode.INTERNAL)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["model"], "brittle")
        self.assertIn("broken", failures[0]["log_failure"].getTraceback())
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class FifoTests(SynchronousTestCase):
    """A FIFO planted under a key is refused at once, never waited on."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="as-fifo-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        os.mkfifo(os.path.join(self.directory, "pipe"))

    def test_registry_refuses_without_blocking(self):
        registry = SharedMemoryRegistry(directory=self.directory)
        error = self.assertRaises(InferenceError, registry.register, "r", "/pipe", 0, 16)
        self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)

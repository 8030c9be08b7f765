"""End to end over REST: a real ingress (twistd) with its HTTP port, the
example worker, tritonclient.http and plain HTTP requests."""
import gzip
import http.client
import json
import uuid
from multiprocessing import shared_memory

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import KSERVE_SERVER, Ingress

#: --max-message-size for these tests: small enough to exceed cheaply.
LIMIT = 256 * 1024


def _inputs(binary, **arrays):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    return inputs


class RestTests(SynchronousTestCase):
    def setUp(self):
        import tritonclient.http as httpclient

        self.ingress = Ingress([KSERVE_SERVER], http=True, args=("--max-message-size", str(LIMIT)))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("add", "echo")
        self.client = httpclient.InferenceServerClient(self.ingress.http_address)
        self.addCleanup(self.client.close)
        self.connection = http.client.HTTPConnection("127.0.0.1", self.ingress.http_port, timeout=10)
        self.addCleanup(self.connection.close)

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body) over one kept-alive connection."""
        self.connection.request(method, path, body, headers or {})
        response = self.connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def assertServing(self):
        """``add`` still answers, on the same connection."""
        body = json.dumps({"inputs": [{"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]},
                                      {"name": "b", "datatype": "INT32", "shape": [2], "data": [10, 20]}]})
        status, headers, data = self.request("POST", "/v2/models/add/infer", body)
        self.assertEqual((status, headers["content-type"]), (200, "application/json"), data)
        self.assertEqual(json.loads(data)["outputs"][0]["data"], [11, 22])

    def test_tritonclient_http(self):
        import tritonclient.http as httpclient
        from tritonclient.http import InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        client = self.client
        self.assertTrue(client.is_server_live())
        self.assertTrue(client.is_server_ready())
        self.assertTrue(client.is_model_ready("add"))
        self.assertFalse(client.is_model_ready("nope"))
        metadata = client.get_server_metadata()
        self.assertEqual(metadata["name"], "anyserve")
        self.assertIn("binary_tensor_data", metadata["extensions"])
        self.assertEqual(client.get_model_metadata("add")["inputs"],
                         [{"name": "a", "datatype": "INT32", "shape": [-1]},
                          {"name": "b", "datatype": "INT32", "shape": [-1]}])
        config = client.get_model_config("add")
        self.assertEqual([(i["name"], i["data_type"], i["dims"]) for i in config["input"]],
                         [("a", "TYPE_INT32", [-1]), ("b", "TYPE_INT32", [-1])])

        a = np.arange(16, dtype=np.int32)
        b = np.arange(16, dtype=np.int32) * 100
        calls = 0
        for binary_in in (True, False):
            for binary_out in (True, False):
                result = client.infer("add", _inputs(binary_in, a=a, b=b), request_id="r%d" % calls,
                                      outputs=[InferRequestedOutput("sum", binary_data=binary_out)])
                calls += 1
                np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
                self.assertEqual("data" in result.get_output("sum"), not binary_out)
                self.assertEqual(result.get_response()["id"], "r%d" % (calls - 1))
        # no outputs named: tritonclient asks for binary_data_output
        result = client.infer("add", _inputs(False, a=a, b=b))
        calls += 1
        self.assertEqual(result.get_output("sum")["parameters"], {"binary_data_size": 64})
        result = client.infer("add", _inputs(True, a=a, b=b), request_compression_algorithm="gzip")
        calls += 1
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)

        words = np.array([b"hello", "wörld".encode(), b"\xff"], dtype=object)
        matrix = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
        for binary in (True, False):
            result = client.infer("echo", _inputs(binary, w=words[:2], m=matrix, f=np.array([True, False])),
                                  outputs=[InferRequestedOutput(n, binary_data=binary) for n in "wmf"])
            self.assertEqual(result.as_numpy("w").tolist(), [b"hello", "wörld".encode()] if binary
                             else ["hello", "wörld"])
            np.testing.assert_array_equal(result.as_numpy("m"), matrix)
            self.assertEqual(result.as_numpy("f").tolist(), [True, False])
        result = client.infer("echo", _inputs(True, w=words), outputs=[InferRequestedOutput("w", binary_data=False)])
        self.assertEqual(result.as_numpy("w").tolist(), list(words))  # not UTF-8: came back binary

        # classification and system shared memory, which the worker does for REST as for gRPC
        result = client.infer("add", _inputs(False, a=a, b=b),
                              outputs=[InferRequestedOutput("sum", binary_data=False, class_count=2)])
        calls += 1
        self.assertEqual(result.get_output("sum")["data"], ["1515:15", "1414:14"])
        regions = {}
        for name, size in (("in", 128), ("out", 64)):
            regions[name] = shared_memory.SharedMemory("as-rest-%s-%s" % (name, uuid.uuid4().hex), True, size)
            self.addCleanup(regions[name].unlink)
            self.addCleanup(regions[name].close)
            client.register_system_shared_memory(name, "/" + regions[name].name, size)
        np.ndarray((32,), np.int32, regions["in"].buf)[:] = np.concatenate([a, b])
        in_a, in_b = httpclient.InferInput("a", [16], "INT32"), httpclient.InferInput("b", [16], "INT32")
        in_a.set_shared_memory("in", 64)
        in_b.set_shared_memory("in", 64, offset=64)
        out = InferRequestedOutput("sum", binary_data=False)
        out.set_shared_memory("out", 64)
        result = client.infer("add", [in_a, in_b], outputs=[out])
        calls += 1
        self.assertNotIn("data", result.get_output("sum"))
        np.testing.assert_array_equal(np.ndarray((16,), np.int32, regions["out"].buf), a + b)
        self.assertEqual(sorted(r["name"] for r in client.get_system_shared_memory_status()), ["in", "out"])
        client.unregister_system_shared_memory()
        self.assertEqual(client.get_system_shared_memory_status(), [])

        stats = client.get_inference_statistics("add")["model_stats"]
        self.assertEqual([(s["name"], s["inference_count"]) for s in stats], [("add", calls)])
        self.assertEqual(stats[0]["inference_stats"]["success"]["count"], calls)
        self.assertIn("add", [s["name"] for s in client.get_inference_statistics()["model_stats"]])
        index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        self.assertEqual(index, {"add": "READY", "echo": "READY"})

        with self.assertRaises(InferenceServerException) as caught:
            client.infer("nope", _inputs(True, a=a))
        self.assertEqual(caught.exception.status(), "404")
        with self.assertRaises(InferenceServerException) as caught:
            client.infer("add", _inputs(True, a=a, b=b[:3]))
        self.assertEqual(caught.exception.status(), "400")
        self.assertIn("same shape", caught.exception.message())
        # unloaded: not ready, and inferences are UNAVAILABLE until it is loaded again
        self.client.unload_model("add")
        self.assertFalse(self.client.is_model_ready("add"))
        status, _, data = self.request("POST", "/v2/models/add/infer", b'{"inputs": []}')
        self.assertEqual(status, 503, data)
        self.client.load_model("add")
        self.assertTrue(self.client.is_model_ready("add"))
        self.assertServing()

    def test_bad_requests_and_the_server_goes_on(self):
        ok = {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]}
        two = {"name": "b", "datatype": "INT32", "shape": [2], "data": [3, 4]}
        cases = [
            ("malformed JSON", b'{"inputs": [', {}, 400, "malformed JSON"),
            ("not an object", b"[1]", {}, 400, "JSON object"),
            ("wrong count", json.dumps({"inputs": [dict(ok, data=[1]), two]}), {}, 400, "needs 2"),
            ("wrong type", json.dumps({"inputs": [dict(ok, data=[1.5, 2]), two]}), {}, 400, "integers"),
            ("model's datatype", json.dumps({"inputs": [dict(ok, datatype="FP32"), dict(two, datatype="FP32")]}),
             {}, 400, "expects INT32"),
            ("missing input", json.dumps({"inputs": [ok]}), {}, 400, "missing input"),
            ("binary past the end", json.dumps({"inputs": [
                {"name": "a", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}}, two]}),
             {}, 400, "binary_data_size 8"),
            ("binary left over", b'{"inputs": []}' + b"\x00" * 4, {"Inference-Header-Content-Length": "14"},
             400, "4 bytes of binary data"),
            ("header past the body", b"{}", {"Inference-Header-Content-Length": "99"}, 400,
             "Inference-Header-Content-Length"),
            ("too large", b"{" + b" " * LIMIT + b"}", {}, 413, "limit"),
            ("gzip bomb", gzip.compress(b" " * (LIMIT + 1)), {"Content-Encoding": "gzip"}, 413, "limit"),
            ("unknown encoding", b"{}", {"Content-Encoding": "br"}, 415, "br"),
        ]
        for what, body, headers, status, fragment in cases:
            got, response_headers, data = self.request("POST", "/v2/models/add/infer", body, headers)
            self.assertEqual((got, response_headers.get("content-type")), (status, "application/json"), what)
            self.assertIn(fragment, json.loads(data)["error"], what)
            self.assertServing()
        for path, status in (("/v2/models/nope/infer", 404), ("/v2/models/add/versions/9/infer", 404),
                             ("/v2/nothing", 404)):
            got, _, data = self.request("POST", path, b'{"inputs": []}')
            self.assertEqual(got, status, path)
            self.assertTrue(json.loads(data)["error"])
        self.assertServing()

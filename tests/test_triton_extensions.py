"""End to end: Triton's control-plane extensions through tritonclient.grpc,
against a real ingress and the example workers (model configuration,
statistics, the model repository, shared-memory status, what is refused).

Each test starts its own ingress; some of the example-model tests also run
on the thread front (see the end).
"""
import base64
import os
import signal
import time
from multiprocessing import shared_memory

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import (
    BackgroundInfer, CLASSIFIER_SERVER, KSERVE_SERVER, PROBE_SERVER, Ingress, Worker, infer_inputs, status_of,
    wait_for,
)




class ExtensionsTestCase(SynchronousTestCase):
    workers = ()
    ready = ()
    front = "aio"

    def setUp(self):
        self.ingress = Ingress(self.workers, args=("--front", self.front))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready(*self.ready)
        self.client = self.ingress.client()

    def index(self):
        return [(m.name, m.version, m.state, m.reason) for m in self.client.get_model_repository_index().models]


class ExampleModelsTests(ExtensionsTestCase):
    workers = (KSERVE_SERVER, CLASSIFIER_SERVER)
    ready = ("add", "echo", ("cls", "v1"), ("cls", "v2"))

    def add(self, a, b):
        return self.client.infer("add", infer_inputs(a=a, b=b))

    def test_model_config(self):
        """Every example model's configuration, from what its worker declared."""
        from tritonclient.grpc import model_config_pb2 as mc

        def tensors(items):
            return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in items]

        add = self.client.get_model_config("add").config
        self.assertEqual((add.name, add.platform, add.backend, add.max_batch_size), ("add", "", "python", 0))
        self.assertEqual(tensors(add.input), [("a", "TYPE_INT32", [-1]), ("b", "TYPE_INT32", [-1])])
        self.assertEqual(tensors(add.output), [("sum", "TYPE_INT32", [-1])])
        self.assertEqual([(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in add.instance_group],
                         [(1, "KIND_CPU")])
        self.assertFalse(add.model_transaction_policy.decoupled)
        self.assertEqual(add.version_policy.WhichOneof("policy_choice"), "all")

        echo = self.client.get_model_config("echo").config
        self.assertEqual((echo.name, list(echo.input), list(echo.output)), ("echo", [], []))

        for version in ("v1", "v2", ""):
            cls = self.client.get_model_config("cls", version).config
            self.assertEqual(cls.name, "cls")
            self.assertEqual(tensors(cls.input), [("x", "TYPE_FP32", [-1, 4])])
            self.assertEqual(tensors(cls.output), [("label", "TYPE_INT64", [-1])])

        # As JSON, the way perf_analyzer reads it.
        as_json = self.client.get_model_config("add", as_json=True)["config"]
        self.assertEqual(as_json["backend"], "python")
        self.assertEqual([t["data_type"] for t in as_json["input"]], ["TYPE_INT32", "TYPE_INT32"])

    def test_statistics(self):
        """Counts move with successes and failures; the worker's timings
        fill queue and compute; all versions of a name are listed."""
        def add_stats():
            [stats] = self.client.get_inference_statistics("add").model_stats
            return stats

        before = add_stats()
        self.assertEqual((before.name, before.version), ("add", "1"))
        self.assertEqual((before.inference_stats.success.count, before.inference_stats.fail.count), (0, 0))
        started = time.time()
        a = np.arange(8, dtype=np.int32)
        for _ in range(3):
            self.add(a, a)
        # A request the handler refuses is a failure.
        self.assertEqual(status_of(lambda: self.add(a, a[:2]))[0], "StatusCode.INVALID_ARGUMENT")

        after = add_stats()
        infer = after.inference_stats
        self.assertEqual((infer.success.count, infer.fail.count), (3, 1))
        self.assertGreater(infer.success.ns, 0)
        self.assertGreater(infer.fail.ns, 0)
        self.assertEqual(after.inference_count, 3)
        self.assertGreaterEqual(after.last_inference, int(started * 1000) - 1000)
        self.assertLessEqual(after.last_inference, int(time.time() * 1000) + 1000)
        # The worker's own times for each successful request, each its own
        # execution of one request.
        for field in ("queue", "compute_input", "compute_infer", "compute_output"):
            self.assertEqual(getattr(infer, field).count, 3, field)
        self.assertGreater(infer.compute_infer.ns, 0)
        self.assertEqual(after.execution_count, 3)
        self.assertEqual([(b.batch_size, b.compute_infer.count) for b in after.batch_stats], [(1, 3)])

        # Other models did not move; every model and version is listed.
        everything = {(s.name, s.version): s for s in self.client.get_inference_statistics().model_stats}
        self.assertEqual(sorted(everything), [("add", "1"), ("cls", "v1"), ("cls", "v2"), ("echo", "1")])
        self.assertEqual(everything[("echo", "1")].inference_stats.success.count, 0)
        self.assertEqual([(s.name, s.version) for s in self.client.get_inference_statistics("cls").model_stats],
                         [("cls", "v1"), ("cls", "v2")])
        x = np.eye(4, dtype=np.float32)[:2]
        self.client.infer("cls", infer_inputs(x=x))  # the default version, v2
        [v2] = self.client.get_inference_statistics("cls", "v2").model_stats
        [v1] = self.client.get_inference_statistics("cls", "v1").model_stats
        self.assertEqual((v1.inference_stats.success.count, v2.inference_stats.success.count), (0, 1))

    def test_repository_unload_and_load(self):
        """The index lists each version with its workers; an unloaded model
        is not ready and its requests are UNAVAILABLE, the rest carry on;
        loading it routes it again."""
        index = self.index()
        self.assertEqual([entry[:3] for entry in index], [
            ("add", "", "READY"), ("cls", "v1", "READY"), ("cls", "v2", "READY"), ("echo", "", "READY")])
        for entry in index:
            self.assertTrue(entry[3].startswith("1 worker: "), entry)
        self.assertIn("classifier_server", index[1][3])

        self.client.unload_model("cls")
        for version in ("", "v1", "v2"):
            self.assertFalse(self.client.is_model_ready("cls", version))
        x = np.eye(4, dtype=np.float32)[:2]
        self.assertEqual(status_of(lambda: self.client.infer("cls", infer_inputs(x=x), model_version="v1")),
                         ("StatusCode.UNAVAILABLE", "model 'cls' is unloaded"))
        self.assertTrue(self.client.is_server_ready())
        self.assertTrue(self.client.is_model_ready("add"))
        self.add(np.ones(2, dtype=np.int32), np.ones(2, dtype=np.int32))
        cls = [entry for entry in self.index() if entry[0] == "cls"]
        self.assertEqual([entry[2] for entry in cls], ["UNAVAILABLE", "UNAVAILABLE"])
        self.assertTrue(cls[0][3].startswith("unloaded; 1 worker registered: classifier_server"), cls)
        # Its configuration still answers.
        self.assertEqual(self.client.get_model_config("cls", "v1").config.name, "cls")

        self.client.load_model("cls")
        for version in ("", "v1", "v2"):
            self.assertTrue(self.client.is_model_ready("cls", version))
        labels = self.client.infer("cls", infer_inputs(x=x), model_version="v1").as_numpy("label")
        self.assertEqual(labels.tolist(), [0, 1])

    def test_server_metadata_and_shared_memory(self):
        """The extensions listed are the ones served: system shared memory
        answers exactly when it is listed."""
        extensions = list(self.client.get_server_metadata().extensions)
        for name in ("model_repository", "model_configuration", "statistics"):
            self.assertIn(name, extensions)
        for name in ("cuda_shared_memory", "trace", "logging", "sequence"):
            self.assertNotIn(name, extensions)
        if "system_shared_memory" not in extensions:
            self.assertEqual(status_of(self.client.get_system_shared_memory_status)[0],
                             "StatusCode.UNIMPLEMENTED")
            return
        region = shared_memory.SharedMemory(name="as-ext-%d" % os.getpid(), create=True, size=64)
        self.addCleanup(region.unlink)
        self.addCleanup(region.close)
        self.assertEqual(list(self.client.get_system_shared_memory_status().regions), [])
        self.client.register_system_shared_memory("in", "/" + region.name, 32, offset=16)
        [status] = self.client.get_system_shared_memory_status("in").regions.values()
        self.assertEqual((status.name, status.key, status.offset, status.byte_size),
                         ("in", "/" + region.name, 16, 32))
        self.assertEqual(status_of(lambda: self.client.get_system_shared_memory_status("nope"))[0],
                         "StatusCode.NOT_FOUND")
        self.client.unregister_system_shared_memory()
        self.assertEqual(list(self.client.get_system_shared_memory_status().regions), [])

    def test_refused_and_unknown(self):
        """CUDA shared memory, trace and log settings: UNIMPLEMENTED with the
        reason; unknown models: NOT_FOUND on every RPC; the server carries on."""
        status, message = status_of(lambda: self.client.register_cuda_shared_memory(
            "g", base64.b64encode(b"a cudaIpcMemHandle"), 0, 64))
        self.assertEqual(status, "StatusCode.UNIMPLEMENTED")
        self.assertIn("no GPU memory support", message)
        self.assertEqual(status_of(self.client.get_cuda_shared_memory_status)[0], "StatusCode.UNIMPLEMENTED")
        status, message = status_of(lambda: self.client.get_trace_settings("add"))
        self.assertEqual(status, "StatusCode.UNIMPLEMENTED")
        self.assertIn("--access-log", message)
        self.assertEqual(status_of(self.client.get_log_settings)[0], "StatusCode.UNIMPLEMENTED")

        for call in (lambda: self.client.get_model_config("nope"),
                     lambda: self.client.get_model_config("cls", "v9"),
                     lambda: self.client.get_inference_statistics("nope"),
                     lambda: self.client.get_inference_statistics("cls", "v9"),
                     lambda: self.client.unload_model("nope"),
                     lambda: self.client.load_model("nope")):
            self.assertEqual(status_of(call)[0], "StatusCode.NOT_FOUND")
        self.assertEqual(status_of(lambda: self.client.load_model("cls", config="{}"))[0],
                         "StatusCode.UNIMPLEMENTED")
        self.assertTrue(self.client.is_server_ready())
        self.assertEqual(self.add(np.array([2], dtype=np.int32), np.array([3], dtype=np.int32))
                         .as_numpy("sum").tolist(), [5])


class UnloadTests(ExtensionsTestCase):
    """Unloading while requests are in flight and workers keep registering."""

    workers = (PROBE_SERVER,)
    ready = ("nap", "seen")

    def seen(self):
        return int(self.client.infer("seen", []).as_numpy("count")[0])

    def nap(self):
        return self.client.infer("nap", infer_inputs(seconds=np.array([0.0])))

    def test_unload_in_flight_and_new_registrations(self):
        seen = self.seen()
        call = BackgroundInfer(self.ingress.address, "nap", seconds=np.array([1.0]))
        # Reached the worker once the worker has seen it besides our probes.
        wait_for(lambda: self.seen() >= seen + 3, timeout=10, what="nap in flight")
        self.client.unload_model("nap")
        self.assertEqual(status_of(self.nap), ("StatusCode.UNAVAILABLE", "model 'nap' is unloaded"))
        status, result = call.join()[:2]
        self.assertEqual(status, "ok", result)  # already forwarded: it finished

        # A second worker registering the model is recorded, not routed to.
        worker = Worker(PROBE_SERVER, self.ingress.mgmt_address, os.path.join(self.ingress.tmp, "second.sock"))
        self.addCleanup(worker.stop, signal.SIGKILL)
        wait_for(lambda: "2 workers registered" in dict((e[0], e[3]) for e in self.index())["nap"],
                 timeout=20, what="second worker registered")
        self.assertFalse(self.client.is_model_ready("nap"))
        self.assertEqual(status_of(self.nap)[0], "StatusCode.UNAVAILABLE")
        self.assertTrue(self.client.is_model_ready("seen"))

        self.client.load_model("nap")
        self.assertTrue(self.client.is_model_ready("nap"))
        self.assertEqual(self.nap().as_numpy("seconds").tolist(), [0.0])
        self.assertEqual(dict((e[0], e[3]) for e in self.index())["nap"][:11], "2 workers: ")


class ExampleModelsTestsOnThreads(ExtensionsTestCase):
    """Some of the same on ``--front threads``: RPCs answered through the
    reactor (config, statistics, NOT_FOUND) and in the gRPC thread
    (UNIMPLEMENTED ones); the others take the reactor path as config does."""

    front = "threads"
    workers = ExampleModelsTests.workers
    ready = ExampleModelsTests.ready
    add = ExampleModelsTests.add
    test_model_config = ExampleModelsTests.test_model_config
    test_statistics = ExampleModelsTests.test_statistics
    test_refused_and_unknown = ExampleModelsTests.test_refused_and_unknown

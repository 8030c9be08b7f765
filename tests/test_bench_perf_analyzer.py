"""Tests for bench/perf_analyzer.py's own logic: the perf_analyzer command
lines it builds, how it reads perf_analyzer's CSV, the environment it starts
Triton in and the bound on a perf_analyzer run (no perf_analyzer needed)."""
import os
import sys
import time
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from bench import perf_analyzer as pa

# Headers as perf_analyzer 2.45 writes them: with server statistics, for a
# decoupled model (Response Throughput), and without server statistics.
PLAIN = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
         "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
         "p50 latency,p90 latency,p95 latency,p99 latency\n")
DECOUPLED = ("Concurrency,Inferences/Second,Response Throughput,Client Send,"
             "Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,"
             "Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,"
             "p99 latency\n")
NO_SERVER = "Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"


class CsvTests(SynchronousTestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_row_of_the_concurrency(self):
        path = self.write(PLAIN + "1,386.972,7,1913,55,32,360,200,3,2279,3619,4096,6256\n"
                                  "16,900.5,7,1913,55,32,360,200,3,9000,9100,9200,9900\n")
        row = pa.parse_csv(path, 16)
        self.assertEqual((row["Inferences/Second"], row["p50 latency"], row["p99 latency"]),
                         (900.5, 9000.0, 9900.0))
        self.assertNotIn("Response Throughput", row)
        self.assertIsNone(pa.parse_csv(path, 4))

    def test_decoupled_and_no_server_columns(self):
        row = pa.parse_csv(self.write(DECOUPLED + "1,391.887,1175.66,0,637,42,25,1424,11,0,"
                                                  "1963,2727,3285,5524\n"), 1)
        self.assertEqual((row["Response Throughput"], row["p50 latency"]), (1175.66, 1963.0))
        row = pa.parse_csv(self.write(NO_SERVER + "1,462.187,6,2,1867,2979,3149,5335\n"), 1)
        self.assertEqual((row["Inferences/Second"], row["p99 latency"]), (462.187, 5335.0))


class CommandLineTests(SynchronousTestCase):
    def args(self, *extra):
        args = pa.parse_args(["--perf-analyzer", "/x/perf_analyzer", "--elements", "8",
                              "--pa-args=--async -v"] + list(extra))
        args.countdown_data = "/tmp/n.json"
        return args

    def target(self):
        return pa.Target(server=None, grpc_port=1001, http_port=1002, models=("add",))

    def test_add_over_http(self):
        case = pa.Case(pa.MODES["http"], 16)
        argv = pa.pa_argv(self.args(), self.target(), case, "/tmp/o.csv")
        self.assertEqual(argv[:7], ["/x/perf_analyzer", "-m", "add", "-u", "127.0.0.1:1002",
                                    "-i", "http"])
        joined = " ".join(argv)
        self.assertIn("--concurrency-range 16 ", joined)
        self.assertIn("--shape a:8 --shape b:8", joined)
        self.assertIn("-f /tmp/o.csv", joined)
        self.assertEqual(argv[-2:], ["--async", "-v"])

    def test_countdown_streams_its_input_file(self):
        case = pa.Case(pa.MODES["countdown"], 1)
        argv = pa.pa_argv(self.args(), self.target(), case, "/tmp/o.csv")
        self.assertEqual(argv[2:7], ["countdown", "-u", "127.0.0.1:1001", "-i", "grpc"])
        self.assertIn("--streaming", argv)
        self.assertEqual(argv[argv.index("--input-data") + 1], "/tmp/n.json")
        self.assertNotIn("--shape", argv)

    def test_cases_and_modes(self):
        args = self.args("--modes", "shm,grpc", "--concurrency", "1,4")
        self.assertEqual([c.name for c in pa.build_cases(args)],
                         ["shm-1", "shm-4", "grpc-1", "grpc-4"])
        self.assertEqual(self.args().modes, list(pa.DEFAULT_MODES))
        with mock.patch("sys.stderr"), self.assertRaises(SystemExit):
            self.args("--modes", "grpc,carrier-pigeon")


class TritonEnvironmentTests(SynchronousTestCase):
    def test_venv_bin_leaves_path(self):
        venv_bin = os.path.dirname(os.path.abspath(sys.executable))
        env = {"PATH": os.pathsep.join([venv_bin, "/usr/bin", "/bin"]), "VIRTUAL_ENV": "/v"}
        with mock.patch.dict(os.environ, env):
            got = pa.outside_venv()
        self.assertEqual(got, {"PATH": os.pathsep.join(["/usr/bin", "/bin"]), "VIRTUAL_ENV": ""})


class TimeoutTests(SynchronousTestCase):
    def test_run_is_killed_at_the_timeout(self):
        args = pa.parse_args(["--pa-timeout", "2", "--pa-library-path", ""])
        log = self.mktemp()
        started = time.monotonic()
        rc, text = pa.run_pa(args, [sys.executable, "-c",
                                    "import time; print('waiting', flush=True); time.sleep(60)"],
                             log)
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(rc, "killed after 2 s")
        self.assertIn("waiting", text)

    def test_exit_status_and_output(self):
        args = pa.parse_args(["--pa-library-path", "/nowhere"])
        rc, text = pa.run_pa(args, [sys.executable, "-c",
                                    "import os; print(os.environ['LD_LIBRARY_PATH']); exit(3)"],
                             self.mktemp())
        self.assertEqual(rc, 3)
        self.assertTrue(text.startswith("/nowhere"), text)

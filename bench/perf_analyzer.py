"""Triton's perf_analyzer against AnyServe, optionally against Triton itself.

Run ``python bench/perf_analyzer.py`` from a checkout. It starts one AnyServe
ingress with the ``add`` worker (examples/kserve_server.py) and the
``countdown`` worker (examples/stream_server.py) as a single ``twistd -n
anyserve`` command, and drives it with perf_analyzer, the load generator
Triton users already have: ``add`` over gRPC, over HTTP, over a gRPC stream
and with system shared memory, and the decoupled ``countdown`` over a stream,
each at every ``--concurrency``. With ``--peer triton`` the same runs go to a
tritonserver (its Python backend) in the same interleaved rounds.

It prints every run's req/s and p50/p99 latency (perf_analyzer's own
figures, from its ``-f`` CSV, kept in the output directory), CPU time per
request of the ingress and the workers, and the medians and ratios over the
rounds. perf_analyzer does not look at the answers, so every run is preceded
by a tritonclient call whose answer is compared.

This is a benchmark, not a test: it exits non-zero only when a server failed
to start, a check failed or perf_analyzer failed. The process helpers and
CPU accounting are bench/bench.py's.
"""
import argparse
import csv
import glob
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
# Run as a script, sys.path[0] is bench/ itself, where "bench" is bench.py:
# put the checkout first so "bench" is this package.
sys.path.insert(0, REPO)

from bench.bench import (  # noqa: E402  (after the path fix above)
    Server, case_inputs, check_inference, cpu_ticks, env_items, fmt, free_port, indent,
    median_of, on_sigterm, print_aligned, start_servers)

BESIDE = os.path.dirname(REPO)  # where ../shared, ../pa-venv and ../triton-venv live


# --------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Mode:
    """How perf_analyzer talks to the server for one kind of run."""

    name: str
    model: str
    pa_args: tuple
    http: bool = False  # goes to the HTTP port


MODES = {
    "grpc": Mode("grpc", "add", ("-i", "grpc")),
    "http": Mode("http", "add", ("-i", "http"), http=True),
    "stream": Mode("stream", "add", ("-i", "grpc", "--streaming")),
    "shm": Mode("shm", "add", ("-i", "grpc", "--shared-memory", "system")),
    "countdown": Mode("countdown", "countdown", ("-i", "grpc", "--streaming")),
    "http-shm": Mode("http-shm", "add", ("-i", "http", "--shared-memory", "system"), http=True),
}

#: What runs unless ``--modes`` says otherwise.
DEFAULT_MODES = ("grpc", "http", "stream", "shm", "http-shm", "countdown")


@dataclass(frozen=True)
class Case:
    mode: Mode
    concurrency: int

    @property
    def name(self):
        return "%s-%d" % (self.mode.name, self.concurrency)


@dataclass
class Result:
    """perf_analyzer's figures for one run, and the server's CPU around it."""

    round: int
    server: str
    case: Case
    req_per_s: float = None
    resp_per_s: float = None  # decoupled models only
    p50_us: float = None
    p90_us: float = None
    p99_us: float = None
    requests: int = None  # the server's success count over the whole run
    ingress_us: float = None
    worker_us: float = None
    csv_path: str = None
    problems: list = field(default_factory=list)

    @property
    def total_us(self):
        parts = [v for v in (self.ingress_us, self.worker_us) if v is not None]
        return sum(parts) if parts else None


def build_cases(args):
    """Every mode in ``--modes`` at every ``--concurrency``, mode-major."""
    return [Case(MODES[m], c) for m in args.modes for c in args.concurrency]


# --------------------------------------------------------------------------
# Servers


class Target:
    """A started server and the ports perf_analyzer reaches it on."""

    def __init__(self, server, grpc_port, http_port, models):
        self.server = server
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.models = models

    @property
    def label(self):
        return self.server.label

    def url(self, mode):
        return "127.0.0.1:%d" % (self.http_port if mode.http else self.grpc_port)


def start_anyserve(args, logdir):
    """The ingress with both example workers, as one twistd command."""
    grpc_port, mgmt, http_port = free_port(), free_port(), free_port()
    argv = [args.twistd, "-n", "--pidfile=", "anyserve", "--port", str(grpc_port),
            "--mgmt", str(mgmt), "--http-port", str(http_port),
            "--worker", args.worker_script, "--worker", args.stream_script]
    argv += args.ingress_argv
    server = Server("anyserve", argv, grpc_port, logdir, env_items(args.ingress_env),
                    args.ready_timeout)
    return Target(server, grpc_port, http_port, ("add", "countdown"))


# Triton's Python-backend version of examples/stream_server.py's countdown:
# n responses counting n-1 down to 0, then the final flag.
TRITON_COUNTDOWN_CONFIG = """\
name: "countdown"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "n" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "value" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

TRITON_COUNTDOWN_MODEL = '''\
"""countdown on Triton's Python backend, for bench/perf_analyzer.py."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy()[0])
            for value in range(n - 1, -1, -1):
                out = pb_utils.Tensor("value", np.array([value], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse([out]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def triton_repository(args, logdir):
    """A model repository of the peer's ``add`` (linked, not copied) and the
    countdown above; the shared repository also has ``minilm``, whose
    dependencies a plain setup lacks (Triton then refuses to start)."""
    repo = os.path.join(logdir, "triton-models")
    os.makedirs(os.path.join(repo, "countdown", "1"))
    os.symlink(os.path.abspath(os.path.join(args.triton_models, "add")),
               os.path.join(repo, "add"))
    with open(os.path.join(repo, "countdown", "config.pbtxt"), "w") as f:
        f.write(TRITON_COUNTDOWN_CONFIG)
    with open(os.path.join(repo, "countdown", "1", "model.py"), "w") as f:
        f.write(TRITON_COUNTDOWN_MODEL)
    return repo


def outside_venv():
    """PATH without our venv's bin, VIRTUAL_ENV emptied: the Python backend's
    stub embeds Debian's python3.11, which finds its prefix through the
    ``python3`` on PATH; in our venv it imports the venv's numpy 2, and then
    every output of ``add`` comes back empty (measured)."""
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != venv_bin]
    if os.environ.get("VIRTUAL_ENV"):
        venv_env_bin = os.path.join(os.environ["VIRTUAL_ENV"], "bin")
        path = [p for p in path if os.path.abspath(p) != os.path.abspath(venv_env_bin)]
    return {"PATH": os.pathsep.join(path), "VIRTUAL_ENV": ""}


def start_triton(args, logdir):
    """tritonserver through the peer's start.sh (which execs it, so its pid
    is the server's and the Python backend stubs are its children)."""
    grpc_port, http_port = free_port(), free_port()
    argv = ["bash", args.triton_start, args.triton_venv, triton_repository(args, logdir),
            str(grpc_port), str(http_port), "0"]
    server = Server("triton", argv, grpc_port, logdir, outside_venv(),
                    ready_timeout=args.peer_ready_timeout)
    return Target(server, grpc_port, http_port, ("add", "countdown"))


def ready(target, need_http):
    """True when every model answers ready over gRPC (and HTTP if needed)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    client = grpcclient.InferenceServerClient(url="127.0.0.1:%d" % target.grpc_port)
    try:
        if not all(client.is_model_ready(m, client_timeout=2) for m in target.models):
            return False
    except Exception:
        return False
    finally:
        client.close()
    if not need_http:
        return True
    client = httpclient.InferenceServerClient(url="127.0.0.1:%d" % target.http_port,
                                              connection_timeout=2, network_timeout=2)
    try:
        return client.is_model_ready("add")
    except Exception:
        return False
    finally:
        client.close()


def wait_until_ready(target, need_http):
    """Block until ready; RuntimeError, with the log's tail, if it never is."""
    server = target.server
    deadline = time.monotonic() + server.ready_timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError("%s exited with code %s before ready; log: %s"
                               % (server.label, server.proc.returncode, server.log_tail()))
        if ready(target, need_http):
            print("%s ready: gRPC %d, HTTP %d (pid %d, children %s)"
                  % (server.label, target.grpc_port, target.http_port, server.pid,
                     server.tree()), flush=True)
            return
        time.sleep(0.25)
    raise RuntimeError("%s: models %s not ready after %.0f s; log: %s"
                       % (server.label, ", ".join(target.models), server.ready_timeout,
                          server.log_tail()))


# --------------------------------------------------------------------------
# Checks (perf_analyzer itself never looks at the answers)


def check_http(port, elements):
    """One ``add`` over HTTP with tritonclient; an error string or None."""
    import numpy as np
    import tritonclient.http as httpclient

    a, b = case_inputs(elements)
    client = httpclient.InferenceServerClient(url="127.0.0.1:%d" % port, network_timeout=30)
    try:
        inputs = []
        for name, arr in (("a", a), ("b", b)):
            inp = httpclient.InferInput(name, [elements], "INT32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        got = client.infer("add", inputs).as_numpy("sum")
    except Exception as e:
        return "HTTP infer failed: %s" % (str(e).splitlines() or [repr(e)])[0]
    finally:
        client.close()
    if got is None or not np.array_equal(got.reshape(-1), a + b):
        return "HTTP: wrong or missing sum"
    return None


def check_countdown(port, n, timeout=30.0):
    """One ``countdown`` over a gRPC stream: n values n-1..0, then the
    final flag; an error string or None."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(url="127.0.0.1:%d" % port)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        inp = grpcclient.InferInput("n", [1], "INT32")
        inp.set_data_from_numpy(np.array([n], dtype=np.int32))
        client.async_stream_infer("countdown", [inp], enable_empty_final_response=True)
        values, deadline = [], time.monotonic() + timeout
        while True:
            try:
                result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return "countdown: no final response after %.0f s (got %s)" % (timeout, values)
            if error is not None:
                return "countdown failed: %s" % (str(error).splitlines() or [repr(error)])[0]
            response = result.get_response()
            if response.outputs:
                values.extend(int(v) for v in result.as_numpy("value").reshape(-1))
            if response.parameters["triton_final_response"].bool_param:
                break
    except Exception as e:
        return "countdown failed: %s" % (str(e).splitlines() or [repr(e)])[0]
    finally:
        client.stop_stream()
        client.close()
    if values != list(range(n - 1, -1, -1)):
        return "countdown: got %s for n=%d" % (values, n)
    return None


def check(args, target, case):
    """The check matching a case's transport and model."""
    if case.mode.model == "countdown":
        return check_countdown(target.grpc_port, args.countdown_n)
    if case.mode.http:
        return check_http(target.http_port, args.elements)
    return check_inference(target.grpc_port, args.elements)


def served_requests(target, model):
    """The server's own count of successful requests for ``model`` (all
    versions), from ModelStatistics; None if it cannot say."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url="127.0.0.1:%d" % target.grpc_port)
    try:
        stats = client.get_inference_statistics(model, client_timeout=5)
        return sum(s.inference_stats.success.count for s in stats.model_stats)
    except Exception:
        return None
    finally:
        client.close()


# --------------------------------------------------------------------------
# Running perf_analyzer


def pa_argv(args, target, case, csv_path):
    """perf_analyzer's command line for one run."""
    mode = case.mode
    argv = [args.perf_analyzer, "-m", mode.model, "-u", target.url(mode), *mode.pa_args,
            "--concurrency-range", str(case.concurrency),
            "--measurement-interval", str(args.interval_ms),
            "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials),
            "-f", csv_path]
    if mode.model == "add":
        argv += ["--shape", "a:%d" % args.elements, "--shape", "b:%d" % args.elements]
    else:
        argv += ["--input-data", args.countdown_data]
    return argv + args.pa_argv


def pa_env(args):
    """Our environment with perf_analyzer's library directory in front."""
    env = dict(os.environ)
    if args.pa_library_path:
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = args.pa_library_path + (":" + old if old else "")
    return env


def run_pa(args, argv, log_path):
    """perf_analyzer to completion, output to ``log_path``; (rc, output).

    perf_analyzer does not give up when a stream dies or a decoupled request
    never ends (it keeps reporting empty windows), so each run is bounded by
    ``--pa-timeout``; it is then killed (its own process group, nobody else's).
    """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=pa_env(args),
                                start_new_session=True)
        try:
            rc = proc.wait(args.pa_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "killed after %.0f s" % args.pa_timeout
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    with open(log_path, "rb") as f:
        return rc, f.read().decode("utf-8", "replace")


def parse_csv(path, concurrency):
    """perf_analyzer's ``-f`` row for the concurrency as {column: float}."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Concurrency") and int(float(row["Concurrency"])) == concurrency:
                return {k: float(v) for k, v in row.items() if k and v not in (None, "")}
    return None


def measure(args, target, case, round_no, outdir):
    """Check, then one perf_analyzer run with the server's CPU and request
    count sampled around it."""
    res = Result(round_no, target.label, case)
    err = check(args, target, case)
    if err:
        res.problems.append("pre-run check: " + err)
        return res
    stem = "r%d-%s-%s" % (round_no, target.label, case.name)
    res.csv_path = os.path.join(outdir, stem + ".csv")
    argv = pa_argv(args, target, case, res.csv_path)

    server = target.server
    ingress = [server.pid]
    workers = server.tree()
    count0 = served_requests(target, case.mode.model)
    t_ing, t_work = cpu_ticks(ingress), cpu_ticks(workers)
    rc, text = run_pa(args, argv, os.path.join(outdir, stem + ".log"))
    d_ing, d_work = cpu_ticks(ingress) - t_ing, cpu_ticks(workers) - t_work
    count1 = served_requests(target, case.mode.model)

    if rc != 0:
        res.problems.append("perf_analyzer rc=%s: %s\n%s"
                            % (rc, " ".join(shlex.quote(a) for a in argv),
                               indent("\n".join(text.strip().splitlines()[-8:]) or "(no output)")))
    row = parse_csv(res.csv_path, case.concurrency) if os.path.exists(res.csv_path) else None
    if row is not None:
        res.req_per_s = row.get("Inferences/Second")
        res.resp_per_s = row.get("Response Throughput")
        res.p50_us, res.p90_us, res.p99_us = (row.get("p%d latency" % p) for p in (50, 90, 99))
    elif rc == 0:
        res.problems.append("no row for concurrency %d in %s" % (case.concurrency, res.csv_path))
    if rc == 0 and count0 is not None and count1 is not None and count1 > count0:
        res.requests = count1 - count0
        per_req = 1e6 / os.sysconf("SC_CLK_TCK") / res.requests
        res.ingress_us = d_ing * per_req
        res.worker_us = d_work * per_req if workers else None
    if set(workers) != set(server.tree()):
        res.problems.append("process tree changed during the run (crash or restart?)")
    if not server.alive():
        res.problems.append("server exited with code %s" % server.proc.returncode)
    return res


def run_rounds(args, targets, cases, outdir):
    """Every case against every server, interleaved, ``--rounds`` times; each
    round starts one server further down the list (see bench.run_rounds)."""
    results = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(targets) if targets else 0
        order = targets[shift:] + targets[:shift]
        for case in cases:
            for target in order:
                if not target.server.alive():
                    continue
                print("  round %d %s: %s ..." % (round_no, target.label, case.name),
                      end="", flush=True)
                res = measure(args, target, case, round_no, outdir)
                print(" %s req/s%s" % (fmt(res.req_per_s, ".0f"),
                                       "  PROBLEMS" if res.problems else ""), flush=True)
                results.append(res)
    return results


# --------------------------------------------------------------------------
# Output


FIGURES = [("req_per_s", "req/s", ".1f"), ("resp_per_s", "resp/s", ".1f"),
           ("p50_us", "p50 us", ".0f"), ("p99_us", "p99 us", ".0f"),
           ("ingress_us", "ingress CPU us/req", ".1f"), ("worker_us", "worker CPU us/req", ".1f"),
           ("total_us", "total CPU us/req", ".1f")]


def print_table(results):
    """Every run, in the order run."""
    if not results:
        return
    head = ["round", "server", "case", "conc", "requests"] + [h for _, h, _ in FIGURES]
    rows = [[str(r.round), r.server, r.case.name, str(r.case.concurrency), fmt(r.requests, "d")]
            + [fmt(getattr(r, a), spec) for a, _, spec in FIGURES] for r in results]
    print_aligned(head, rows, left={1, 2})


def clean_runs(results):
    by_key = {}
    for r in results:
        if r.req_per_s is not None and not r.problems:
            by_key.setdefault((r.server, r.case.name), []).append(r)
    return by_key


def print_medians(results, labels, cases):
    by_key = clean_runs(results)
    rows = [[case.name, label, str(len(by_key[label, case.name]))]
            + [fmt(median_of(by_key[label, case.name], a), spec) for a, _, spec in FIGURES]
            for case in cases for label in labels if (label, case.name) in by_key]
    if rows:
        print("\nmedians over the rounds without problems:", end="")
        print_aligned(["case", "server", "rounds"] + [h for _, h, _ in FIGURES], rows, left={0, 1})


def print_ratios(results, cases, mine="anyserve", theirs="triton"):
    """AnyServe over Triton per case: req/s and p50 (ratios of the medians,
    each round's own req/s ratio in brackets)."""
    by_key = clean_runs(results)
    lines = []
    for case in cases:
        a_runs, b_runs = by_key.get((mine, case.name)), by_key.get((theirs, case.name))
        if not a_runs or not b_runs:
            continue
        a, b = median_of(a_runs, "req_per_s"), median_of(b_runs, "req_per_s")
        a50, b50 = median_of(a_runs, "p50_us"), median_of(b_runs, "p50_us")
        theirs_by_round = {r.round: r.req_per_s for r in b_runs}
        per_round = ["%.2f" % (r.req_per_s / theirs_by_round[r.round]) for r in a_runs
                     if theirs_by_round.get(r.round)]
        lines.append("  %-12s req/s %8.1f / %8.1f = %5.2fx   p50 %6.0f / %6.0f us = %5.2fx%s"
                     % (case.name, a, b, a / b if b else float("nan"), a50, b50,
                        a50 / b50 if b50 else float("nan"),
                        "  [%s]" % ", ".join(per_round) if len(per_round) > 1 else ""))
    if lines:
        print("\n%s / %s (medians; each round's req/s ratio in brackets):" % (mine, theirs))
        print("\n".join(lines))


def print_problems(results, setup_errors):
    lines = list(setup_errors)
    for r in results:
        lines.extend("round %d %s %s: %s" % (r.round, r.server, r.case.name, p) for p in r.problems)
    if lines:
        print("\nPROBLEMS:")
        for line in lines:
            print("  " + line)
    return bool(lines)


# --------------------------------------------------------------------------
# Command line


PA_VENV = os.path.join(BESIDE, "pa-venv")


def default_perf_analyzer():
    """../pa-venv's (where get-perf-analyzer.sh is told to put it), else the
    PATH's (tritonclient's wheels put one in the venv's bin that may lack
    its libraries)."""
    mine = os.path.join(PA_VENV, "bin", "perf_analyzer")
    return mine if os.path.exists(mine) else shutil.which("perf_analyzer") or mine


def default_library_path(perf_analyzer):
    """libcudart's directory in the venv perf_analyzer sits in, else in
    ../pa-venv (get-perf-analyzer.sh installs it there); None if neither."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(perf_analyzer)))
    for root in (venv, PA_VENV):
        found = sorted(glob.glob(os.path.join(
            root, "lib", "python3*", "site-packages", "nvidia", "cuda_runtime", "lib")))
        if found:
            return found[-1]
    return None


def int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("want comma-separated integers, got %r" % text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("want positive integers, got %r" % text)
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python bench/perf_analyzer.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--perf-analyzer", default=default_perf_analyzer(),
                   help="perf_analyzer binary (../shared/tools/get-perf-analyzer.sh VENV "
                        "installs one as VENV/bin/perf_analyzer)")
    p.add_argument("--pa-library-path", default=None,
                   help="directory put in front of LD_LIBRARY_PATH for perf_analyzer "
                        "(libcudart); default: the nvidia/cuda_runtime/lib of the venv the "
                        "binary sits in, when there is one")
    p.add_argument("--pa-args", action="append", default=[], metavar="ARGS",
                   help="extra perf_analyzer arguments, split like a shell would "
                        "(repeatable), e.g. --pa-args='--async'")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated subset of: grpc (add, -i grpc), http (add, -i http), "
                        "stream (add, --streaming), shm (add, --shared-memory system over "
                        "gRPC), countdown (decoupled countdown, --streaming), http-shm "
                        "(add, --shared-memory system over HTTP)")
    p.add_argument("--concurrency", type=int_list, default=[1, 16],
                   help="comma-separated concurrency levels, one run each")
    p.add_argument("--rounds", type=int, default=2,
                   help="times every case runs against every server, interleaved")
    p.add_argument("--interval-ms", type=int, default=1000,
                   help="perf_analyzer --measurement-interval (each window lasts 1.2x this)")
    p.add_argument("--stability", type=float, default=50.0,
                   help="perf_analyzer --stability-percentage: three windows within this "
                        "much of each other end a run")
    p.add_argument("--max-trials", type=int, default=10,
                   help="perf_analyzer --max-trials: windows before giving up as unstable")
    p.add_argument("--pa-timeout", type=float, default=120.0,
                   help="seconds after which one perf_analyzer run is killed")
    p.add_argument("--elements", type=int, default=16,
                   help="INT32 elements per input of add (--shape a:N --shape b:N)")
    p.add_argument("--countdown-n", type=int, default=4,
                   help="n sent to countdown: responses per request")
    p.add_argument("--worker-script", default=os.path.join(REPO, "examples", "kserve_server.py"))
    p.add_argument("--stream-script", default=os.path.join(REPO, "examples", "stream_server.py"))
    p.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"))
    p.add_argument("--ingress-args", action="append", default=[], metavar="ARGS",
                   help="extra arguments for the ingress, split like a shell would "
                        "(repeatable), e.g. --ingress-args='--front threads'")
    p.add_argument("--ingress-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the ingress (repeatable)")
    p.add_argument("--peer", choices=["triton"], help="also run against tritonserver")
    p.add_argument("--triton-venv", default=os.path.join(BESIDE, "triton-venv"),
                   help="venv set up by ../shared/peers/tritonserver/setup.sh")
    p.add_argument("--triton-start",
                   default=os.path.join(BESIDE, "shared", "peers", "tritonserver", "start.sh"))
    p.add_argument("--triton-models",
                   default=os.path.join(BESIDE, "shared", "peers", "tritonserver", "models"),
                   help="repository whose 'add' model Triton serves")
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--peer-ready-timeout", type=float, default=120.0)
    p.add_argument("--out", default=None,
                   help="directory for perf_analyzer's CSVs and output (default: a new "
                        "temporary directory, printed at the end)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the servers' logs even when nothing went wrong")
    args = p.parse_args(argv)
    args.modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        p.error("unknown or no mode(s) %s; known: %s" % (", ".join(unknown), ", ".join(MODES)))
    for item in args.ingress_env:
        if "=" not in item or not item.partition("=")[0]:
            p.error("--ingress-env wants NAME=VALUE, got %r" % item)
    if args.pa_library_path is None:
        args.pa_library_path = default_library_path(args.perf_analyzer)
    try:
        args.ingress_argv = [a for chunk in args.ingress_args for a in shlex.split(chunk)]
        args.pa_argv = [a for chunk in args.pa_args for a in shlex.split(chunk)]
    except ValueError as e:
        p.error(str(e))
    return args


def preflight(args):
    """Fail with a clear message before starting anything that would."""
    need = [("--perf-analyzer", args.perf_analyzer), ("--twistd", args.twistd),
            ("--worker-script", args.worker_script), ("--stream-script", args.stream_script)]
    if args.peer == "triton":
        need += [("--triton-start", args.triton_start),
                 ("--triton-models", os.path.join(args.triton_models, "add"))]
        if not os.path.exists(os.path.join(args.triton_venv, "bin", "python")):
            raise SystemExit("--triton-venv %s does not exist; set it up with %s %s"
                             % (args.triton_venv, os.path.join(os.path.dirname(
                                 args.triton_start), "setup.sh"), args.triton_venv))
    for what, path in need:
        if not os.path.exists(path):
            raise SystemExit("%s not found: %s" % (what, path))
    try:
        out = subprocess.run([args.perf_analyzer, "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=pa_env(args), timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit("%s --version failed: %s" % (args.perf_analyzer, e))
    text = out.stdout.decode("utf-8", "replace").strip()
    if out.returncode != 0:
        raise SystemExit("%s --version failed (rc %d; LD_LIBRARY_PATH front: %s):\n%s"
                         % (args.perf_analyzer, out.returncode, args.pa_library_path, text))
    return text


def main(argv=None):
    args = parse_args(argv)
    version = preflight(args)
    cases = build_cases(args)
    signal.signal(signal.SIGTERM, on_sigterm)
    logdir = tempfile.mkdtemp(prefix="anyserve-pa-logs-")
    outdir = args.out or tempfile.mkdtemp(prefix="anyserve-perf-analyzer-")
    os.makedirs(outdir, exist_ok=True)
    if any(c.mode.model == "countdown" for c in cases):
        args.countdown_data = os.path.join(outdir, "countdown-input.json")
        with open(args.countdown_data, "w") as f:
            json.dump({"data": [{"n": [args.countdown_n]}]}, f)
    print("%s; %d CPUs, load average %.2f (other load skews the figures)"
          % (version, os.cpu_count(), os.getloadavg()[0]), flush=True)
    starters = [start_anyserve] + ([start_triton] if args.peer == "triton" else [])
    need_http = any(c.mode.http for c in cases)
    targets, results, setup_errors, notes = [], [], [], []
    try:
        start_servers(targets, starters, (args, logdir), lambda target: wait_until_ready(target, need_http),
                      lambda target: target.server.stop(), setup_errors, notes)
        results.extend(run_rounds(args, targets, cases, outdir))
    except KeyboardInterrupt:
        setup_errors.append("interrupted")
    finally:
        for target in targets:
            notes.extend(target.server.stop())
        labels = ["anyserve"] + (["triton"] if args.peer else [])
        print_table(results)
        print_medians(results, labels, cases)
        print_ratios(results, cases)
        bad = print_problems(results, setup_errors)
        if notes:
            print("\nNOTES:\n  " + "\n  ".join(notes))
        print("\nperf_analyzer CSVs and output in", outdir)
        if args.keep_logs or bad:
            print("server logs kept in", logdir)
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

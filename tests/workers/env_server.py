"""A worker for tests/test_worker_env.py and tests/test_recycling.py: models
that report what the supervising ingress gave this process.

- ``env``: a JSON object (output ``info``, BYTES [1]) with this process's
  pid, its interpreter's command line (``sys.orig_argv``) and the
  environment variables the supervisor sets (math threads, GPU, a marker
  a --worker-python wrapper exports);
- ``work``: returns ``x`` (INT32 [-1]) and this process's pid (``pid``,
  INT64 [1]) after a millisecond's work, so that requests are in flight
  while a worker is recycled;
- ``slow``: sleeps ``seconds`` (FP64 [1]) then returns this process's pid,
  a request still in flight when its worker is drained.

The SDK is imported first, so that an interpreter without it fails on
that import, not on numpy's.
"""
from anyserve_tw import AnyServe

import json
import os
import sys
import time

import numpy as np

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "CUDA_VISIBLE_DEVICES", "WRAPPED_BY", "ANYSERVE_TOKEN")

app = AnyServe()


@app.model("env", outputs=[("info", "BYTES", [1])])
def env(request):
    info = {"pid": os.getpid(), "argv": list(sys.orig_argv),
            "env": {name: os.environ.get(name) for name in VARIABLES}}
    return {"info": np.array([json.dumps(info).encode()], dtype=object)}


@app.model("work", inputs=[("x", "INT32", [-1])],
           outputs=[("x", "INT32", [-1]), ("pid", "INT64", [1])])
def work(request):
    time.sleep(0.001)
    return {"x": request["x"], "pid": np.array([os.getpid()], dtype=np.int64)}


@app.model("slow", inputs=[("seconds", "FP64", [1])], outputs=[("pid", "INT64", [1])])
def slow(request):
    time.sleep(float(request["seconds"][0]))
    return {"pid": np.array([os.getpid()], dtype=np.int64)}


if __name__ == "__main__":
    app.run()

"""A worker for tests/test_batching.py: a batching numpy model that records
the batch sizes it is called with, and a load hook it depends on.

- ``double`` (FP32 x [4] -> y [4], batches of up to 8 rows): y = 2x; each
  call takes 20 ms, so requests arriving meanwhile gather;
- ``batch_sizes``: the rows of every call of ``double`` so far, in order;
- the on_load hook takes 0.5 s; ``double`` fails if called before it ended.
  With BATCHING_SERVER_FAIL_LOAD set, the hook raises instead; with
  BATCHING_SERVER_LOAD_MARK set, it first creates that file.
"""
import os
import time

import numpy as np

from anyserve_tw import AnyServe

app = AnyServe()
sizes = []
loaded = []


@app.on_load
def load():
    mark = os.environ.get("BATCHING_SERVER_LOAD_MARK")
    if mark:  # tells a test the hook has started
        open(mark, "w").close()
    time.sleep(0.5)
    if os.environ.get("BATCHING_SERVER_FAIL_LOAD"):
        raise RuntimeError("no weights at /nowhere")
    loaded.append(True)


@app.model("double", inputs=[("x", "FP32", [4])], outputs=[("y", "FP32", [4])],
           max_batch_size=8, max_queue_delay_ms=20, preferred_batch_sizes=[4, 8])
def double(request):
    if not loaded:
        raise RuntimeError("called before the on_load hook finished")
    x = request["x"]
    sizes.append(len(x))
    time.sleep(0.02)
    return {"y": x * 2}


@app.model("batch_sizes", outputs=[("sizes", "INT64", [-1])])
def batch_sizes(request):
    return {"sizes": np.array(sizes, dtype=np.int64)}


if __name__ == "__main__":
    app.run()

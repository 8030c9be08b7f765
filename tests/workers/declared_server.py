"""A worker for tests/test_honest_sdk.py: models whose handlers break their
declarations when asked to.

- ``to_int8``: returns its FP32 input ``x`` as is for the INT8 output ``y``
  (100.0 fits exactly, 200.0 and 1.5 do not);
- ``pair``: returns ``n`` (INT64 [1]) zeros for the FP32 output ``y``,
  declared of shape [2].
"""
import numpy as np

from anyserve_tw import AnyServe

app = AnyServe()


@app.model("to_int8", inputs=[("x", "FP32", [-1])], outputs=[("y", "INT8", [-1])])
def to_int8(request):
    return {"y": request["x"]}


@app.model("pair", inputs=[("n", "INT64", [1])], outputs=[("y", "FP32", [2])])
def pair(request):
    return {"y": np.zeros(int(request["n"][0]), dtype=np.float32)}


if __name__ == "__main__":
    app.run()

"""A worker for tests/test_fuzz.py: the fuzz app of
anyserve_tw/test/fuzzapp.py (one model of each kind a handler can be)."""
from anyserve_tw.test.fuzzapp import fuzz_app

app = fuzz_app()

if __name__ == "__main__":
    app.run()

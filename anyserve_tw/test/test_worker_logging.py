"""Tests for the worker's log lines: a supervising ingress stamps each line it
relays, so a supervised worker must not stamp them again."""
import io
import re

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.worker.main import log_observer

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT")


def log_line(environ):
    out = io.StringIO()
    Logger(namespace="anyserve.test", observer=log_observer(out, environ)).info(
        "serving {model}", model="add")
    return out.getvalue()


class WorkerLogTests(SynchronousTestCase):
    def test_standalone_lines_are_timestamped(self):
        line = log_line({})
        self.assertRegex(line, STAMP)
        self.assertTrue(line.endswith("[anyserve.test#info] serving add\n"), line)

    def test_supervised_lines_are_not(self):
        self.assertEqual(log_line({"ANYSERVE_SUPERVISED": "1"}),
                         "[anyserve.test#info] serving add\n")

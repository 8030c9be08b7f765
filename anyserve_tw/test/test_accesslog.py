"""Tests for anyserve_tw.ingress.accesslog."""
import io
import json
import os
import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.accesslog import AccessLog, field

#: 2025-01-31T12:00:00Z
NOON = 1738324800.0


class FieldTests(SynchronousTestCase):
    def test_plain_values_as_they_are(self):
        self.assertEqual(field("add"), "add")
        self.assertEqual(field("kserve_server-0-1234"), "kserve_server-0-1234")
        self.assertEqual(field("näme"), "näme")

    def test_empty_is_a_dash(self):
        self.assertEqual(field(""), "-")
        self.assertEqual(field(None), "-")

    def test_numbers(self):
        self.assertEqual(field(42), "42")
        self.assertEqual(field(0), "0")

    def test_spaces_quotes_and_control_characters_are_quoted(self):
        for value in ("a b", 'a"b', "line\nforged 1 2 3", "tab\there", "back\\slash", "\x7f"):
            quoted = field(value)
            self.assertTrue(quoted.startswith('"') and quoted.endswith('"'), quoted)
            self.assertNotIn("\n", quoted)
            self.assertEqual(json.loads(quoted), value)


class FileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="as-accesslog-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "access.log")
        self.clock = Clock()
        self.clock.advance(NOON)

    def read(self):
        with open(self.path) as f:
            return f.read()

    def test_one_line_per_request(self):
        log = AccessLog(self.path, self.clock)
        log.startService()
        log.record("add", "", "OK", 0.000812, "kserve_server-0-1234", "req-7")
        self.clock.advance(1.25)
        log.record("cls", "v2", "DEADLINE_EXCEEDED", 2.5, "w2", "")
        log.stopService()
        self.assertEqual(self.read().splitlines(), [
            "2025-01-31T12:00:00.000Z add - OK 0.812 kserve_server-0-1234 req-7",
            "2025-01-31T12:00:01.250Z cls v2 DEADLINE_EXCEEDED 2500.000 w2 -",
        ])

    def test_buffered_then_flushed_on_a_timer(self):
        log = AccessLog(self.path, self.clock, flush_interval=1.0)
        log.startService()
        self.addCleanup(log.stopService)
        log.record("add", "", "OK", 0.001, "w", "1")
        self.assertEqual(self.read(), "")  # no write per request
        self.clock.advance(1.0)
        self.assertEqual(len(self.read().splitlines()), 1)

    def test_appends_and_keeps_its_path_absolute(self):
        with open(self.path, "w") as f:
            f.write("earlier\n")
        here = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, here)
        log = AccessLog("access.log", self.clock)
        os.chdir(here)  # as twistd may, after makeService
        log.startService()
        log.record("add", "", "OK", 0.001, "w", "1")
        log.stopService()
        self.assertEqual(self.read().splitlines()[0], "earlier")
        self.assertEqual(len(self.read().splitlines()), 2)

    def test_a_client_request_id_cannot_forge_a_line(self):
        log = AccessLog(self.path, self.clock)
        log.startService()
        log.record("add", "", "OK", 0.001, "w", "x\n2025-01-31T12:00:00.000Z add - OK 0.1 w y")
        log.stopService()
        lines = self.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertEqual(len(lines[0].split(" ")), 7 + 6)  # the id is one quoted field with spaces in it
        self.assertTrue(lines[0].endswith('"x\\n2025-01-31T12:00:00.000Z add - OK 0.1 w y"'))

    def test_an_open_file_is_left_open(self):
        out = io.StringIO()
        log = AccessLog(out, self.clock)
        log.startService()
        log.record("add", "1", "NOT_FOUND", 0.0, "w", "r")
        log.stopService()
        self.assertFalse(out.closed)
        self.assertEqual(out.getvalue(), "2025-01-31T12:00:00.000Z add 1 NOT_FOUND 0.000 w r\n")

    def test_an_unwritable_path_fails_at_start(self):
        log = AccessLog(os.path.join(self.dir, "missing", "access.log"), self.clock)
        self.assertRaises(OSError, log.startService)


class TwistdLogTests(SynchronousTestCase):
    def test_dash_logs_through_twisted_logger(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log = AccessLog("-", Clock())
        log.startService()
        log.record("add", "v1", "OK", 0.0015, "w1", "a b")
        log.stopService()
        [event] = [e for e in events if e.get("log_namespace") == "anyserve.access"]
        from twisted.logger import formatEvent

        self.assertEqual(formatEvent(event), 'add v1 OK 1.500 w1 "a b"')
        self.assertEqual((event["model"], event["code"]), ("add", "OK"))

"""Tests for the thread front's admission of inference calls
(:class:`anyserve_tw.ingress.threadfront.InferenceBudget`)."""
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.threadfront import InferenceBudget, reserved_threads


class ReservedThreadsTests(SynchronousTestCase):
    def test_sizes(self):
        """Two threads at least, one in eight of a big pool, and never the
        whole pool."""
        self.assertEqual([reserved_threads(n) for n in (1, 2, 3, 16, 64, 128)], [0, 1, 2, 2, 8, 16])


class InferenceBudgetTests(SynchronousTestCase):
    def test_one_model_takes_half(self):
        budget = InferenceBudget(16)
        self.assertEqual((budget.total, budget.per_model), (14, 7))
        self.assertEqual([budget.admit("slow") for _ in range(8)], [True] * 7 + [False])
        self.assertEqual([budget.admit("add") for _ in range(8)], [True] * 7 + [False])
        self.assertFalse(budget.admit(None))  # every inference thread taken: a stream too
        budget.release("slow")
        self.assertTrue(budget.admit(None))
        budget.release(None)
        self.assertTrue(budget.admit("slow"))

    def test_release_forgets_idle_models(self):
        budget = InferenceBudget(4)
        self.assertTrue(budget.admit("m"))
        budget.release("m")
        self.assertEqual((budget.in_flight, budget.by_model), (0, {}))

    def test_a_pool_of_one(self):
        budget = InferenceBudget(1)
        self.assertTrue(budget.admit("m"))
        self.assertFalse(budget.admit("n"))

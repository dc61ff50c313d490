"""Training-step progress from the global step numbers telemetry mentions.

Tolaria publishes no step counter; Tamiyo's per-decision packets carry the step they decided on
(``step_index``) and the run (``training_run_id``). The steps a run advanced between two such
packets are the steps it trained, whether or not each got a decision, so the training SLO counts
steps, not decisions.
"""

from __future__ import annotations

from collections import OrderedDict


class StepTracker:
    """Highest step seen per run (the ``capacity`` most recent runs); :meth:`advance` returns the new
    steps. The first sighting of a run counts one step: what came before Nissa started is unknown.
    A step at or below the highest seen (out-of-order replicas, redelivery) counts nothing."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._last: OrderedDict[str, int] = OrderedDict()

    def advance(self, run_id: str, step: int) -> int:
        last = self._last.get(run_id)
        if last is None:
            new = 1
        elif step > last:
            new = step - last
        else:
            self._last.move_to_end(run_id)
            return 0
        self._last[run_id] = step
        self._last.move_to_end(run_id)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)
        return new

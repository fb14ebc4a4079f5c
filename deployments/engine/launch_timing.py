"""When to launch the next pass on an asynchronous device (CUDA): just before the running one ends.

Launching pass N+1 the moment pass N is launched keeps the device busy, but it fixes N+1's contents a whole
pass early: a query that arrives while N runs then waits for N, for N+1 (planned before it came) and for
its own pass. With full-size NV-Embed-v2 on a GPU a 16k-token pass takes 0.5-0.8 s (the anchors in
docs/performance.md), so that is up to 0.8 s more for a retriever's query during an index build, to save
a host gap of a few milliseconds a pass. Waiting to read N back before planning N+1 gives the query its
place in N+1 but leaves the device idle while the host reads back, plans, copies and launches.

So the model thread launches N+1 a *lead* before N is expected to end: long enough for the host to plan
and queue it (twice its measured time to do so) plus a share of the pass (``LEAD_SHARE``) for the
estimate's error. A call that arrives while N runs joins N+1 unless it comes within that lead; the device
still finds N+1 queued when N ends. The expected end comes from the device's own time per token of work
over the recent passes (``seconds = per_token x (padded tokens + the pass's fixed cost in tokens)``, the
planner's cost model). Both ways of being wrong are bounded: late, the device idles for the error (the
read-back-first behaviour); early, a query waits as it would with launch-at-once. Until a pass has been
timed there is no estimate and the next pass launches at once.
"""

from __future__ import annotations

from dataclasses import dataclass

# Share of the expected pass time launched early, for the estimate's error (passes of one token count
# vary by a few per cent; more with length mixes). A query arriving in the last LEAD_SHARE of a pass waits
# one pass more.
LEAD_SHARE = 0.1
# Weight of the newest pass in the running estimates.
SMOOTHING = 0.25
# Poll interval while waiting for the launch point (the pass's done-check is a CUDA event query: cheap).
POLL_S = 0.002


@dataclass
class LaunchTiming:
    """Running estimates of a pass's device time and the host's time to plan and launch one."""

    overhead_tokens: int  # a pass's fixed cost in tokens of work (batching.forward_overhead_tokens)
    host_launch_s: float = 0.0
    # Smoothed device seconds and tokens of work of recent passes: their ratio is the time per token, so
    # a pass weighs by its size (a query's short pass barely moves the estimate for the bulk passes).
    _seconds: float = 0.0
    _work: float = 0.0

    @property
    def seconds_per_token(self) -> float | None:
        return self._seconds / self._work if self._work > 0 else None

    def observe_pass(self, padded_tokens: int, seconds: float) -> None:
        """A pass that ran alone (not split after a failure) took ``seconds`` of device time."""
        if seconds <= 0:
            return
        work = padded_tokens + self.overhead_tokens
        if self._work == 0:
            self._seconds, self._work = seconds, float(work)
        else:
            self._seconds += SMOOTHING * (seconds - self._seconds)
            self._work += SMOOTHING * (work - self._work)

    def observe_launch(self, seconds: float) -> None:
        """The host took ``seconds`` to plan and launch a pass."""
        self.host_launch_s += SMOOTHING * (seconds - self.host_launch_s)

    def expected_seconds(self, padded_tokens: int) -> float | None:
        if self.seconds_per_token is None:
            return None
        return self.seconds_per_token * (padded_tokens + self.overhead_tokens)

    def launch_point(self, started_at: float, padded_tokens: int) -> float | None:
        """When to launch the pass after one of ``padded_tokens`` that began on the device at
        ``started_at``: its expected end less the lead. None: no estimate yet (launch at once)."""
        expected = self.expected_seconds(padded_tokens)
        if expected is None:
            return None
        return started_at + expected - (2 * self.host_launch_s + LEAD_SHARE * expected)

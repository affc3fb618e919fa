"""Whether a replica's engine still works, and error ids: plain Python, no model.

The generation thread records each iteration in a `StepHealth`; health checks read it (Serve's `check_health`,
`/health`, `submit`). A step that raises fails only the requests in it, but `max_consecutive_failed_steps` failed
steps in a row, or one error that leaves the device unusable, mark the engine failed for good; and a step still
running `stall_timeout_s` after the previous one ended, while requests wait or run (a hung device, a deadlock), makes
the engine unhealthy while it lasts. Either way Serve's health check fails and Serve replaces the replica.

Clients never see an exception's text (it can carry tensor shapes, device memory statistics, file paths): they get
`internal error (id <error id>)`, and the replica's log has the full error under the same id.
"""

from __future__ import annotations

import logging
import time
import uuid

log = logging.getLogger("llm_platform.serve.engine")


def error_id() -> str:
    """A short random id that ties a client's generic error message to the full error in the log."""
    return uuid.uuid4().hex[:12]


def leaves_device_unusable(exc: BaseException) -> bool:
    """A CUDA error other than running out of memory (an illegal address, a device-side assert) poisons the
    process's CUDA context: every later call fails too, so retrying steps cannot help."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in str(exc)


class StepHealth:
    """What the engine's iterations have done lately.

    Args:
        stall_timeout_s: seconds a step may run, with requests waiting or running, before the engine counts as
            stalled (None: never).
        max_consecutive_failed_steps: failed steps in a row that mark the engine failed.
    """

    def __init__(self, stall_timeout_s: float | None = None, max_consecutive_failed_steps: int = 3):
        self.stall_timeout_s, self.max_consecutive_failed_steps = stall_timeout_s, max_consecutive_failed_steps
        self.last_step_s = time.monotonic()
        """When the generation thread last finished an iteration (monotonic seconds)."""
        self.consecutive_failures = 0
        self.last_error: str | None = None
        """`<id>: <exception>` of the latest failed step (for the log and health check, never for clients)."""
        self.fatal_error: str | None = None
        """Set once the engine cannot be trusted with more work; never cleared."""

    def iteration_done(self, did_work: bool) -> None:
        """An iteration ended without raising; one that ran the model (`did_work`) ends a run of failures."""
        self.last_step_s = time.monotonic()
        if did_work:
            self.consecutive_failures = 0

    def step_failed(self, exc: BaseException) -> str:
        """Record a step that raised `exc` (logged in full with a new error id); returns the id."""
        eid = error_id()
        log.error("engine step failed (error id %s)", eid, exc_info=exc)
        self.last_step_s = time.monotonic()
        self.consecutive_failures += 1
        self.last_error = f"{eid}: {type(exc).__name__}: {exc}"
        if self.fatal_error is None:
            if leaves_device_unusable(exc):
                self.fatal_error = f"the device is unusable after error {self.last_error}"
            elif self.consecutive_failures >= self.max_consecutive_failed_steps:
                self.fatal_error = (f"{self.consecutive_failures} engine steps in a row failed "
                                    f"(serve.engine.max_consecutive_failed_steps); last: {self.last_error}")
            if self.fatal_error is not None:
                log.error("engine failed, the replica reports unhealthy from now on: %s", self.fatal_error)
        return eid

    def problem(self, work_pending: bool) -> str | None:
        """Why the engine is unhealthy (None: it is not): failed for good, or stalled with work pending."""
        if self.fatal_error is not None:
            return self.fatal_error
        if work_pending and self.stall_timeout_s is not None:
            running_s = time.monotonic() - self.last_step_s
            if running_s > self.stall_timeout_s:
                return (f"no engine step has finished for {running_s:.1f} s while requests are pending "
                        f"(serve.engine.stall_timeout_s={self.stall_timeout_s})")
        return None

"""Live tensor bytes on the CPU, exactly: the CPU counterpart of ``torch.cuda.max_memory_allocated``.

PyTorch's CPU allocator keeps no statistics, and a process's resident set also holds what the C
allocator keeps after a free (heap pages not returned, fragmentation), which varies with the
allocation pattern. ``TensorMemoryTrace`` records every CPU tensor allocation and free through
``torch.profiler`` (``profile_memory=True``) and replays them in order; started before the model is
built, it sees every block's allocation, so the running sum is the live tensor bytes.

    with TensorMemoryTrace() as trace:
        trainer = Trainer(cfg)
        trainer.train_step()
        with trace.window():
            trainer.train_step()
    trace.peak  # the most live tensor bytes during the window

Profiling slows every op; use it to measure, not while timing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_WINDOW = "fleetlm.tensor_memory_window"


class TensorMemoryTrace:
    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak = 0  # during the window(s)
        self.live_at_window = 0  # at the start of the first window

    def __enter__(self) -> TensorMemoryTrace:
        self._prof.__enter__()
        return self

    @contextmanager
    def window(self):
        """The span whose peak is measured (several spans: the peak over all)."""
        from torch.profiler import record_function

        with record_function(_WINDOW):
            yield

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self._replay()

    def _replay(self) -> None:
        events = list(self._prof.profiler.kineto_results.events())
        spans = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == _WINDOW]
        if not spans:
            raise ValueError("TensorMemoryTrace: no window() was entered inside the trace")
        cpu = torch.autograd.DeviceType.CPU
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu)
        live, first = 0, None
        for t, nbytes in changes:
            if first is None and t >= spans[0][0]:
                first = live
            live += nbytes
            if any(a <= t <= b for a, b in spans):
                self.peak = max(self.peak, live)
        self.live_at_window = live if first is None else first

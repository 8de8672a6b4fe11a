"""Peak memory of live CPU tensors while a function runs, from torch's profiler
(profile_memory=True): the running sum, in time order, of what each op allocated minus what it
freed. Unlike the process's peak RSS it sees only tensors (no allocator caching, no libraries);
an op's own transient peak inside it is not seen, which only makes the figure smaller."""

from __future__ import annotations


def peak_tensor_memory(fn) -> int:
    """Peak bytes of live CPU tensors allocated while fn() runs (relative to its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for _, change in sorted(
        (e.time_range.end, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    ):
        now += change
        peak = max(peak, now)
    return peak

"""Memory a run holds, measured the same way everywhere: from the process, not guessed from tensors.

:class:`PeakMemory` gives one run's peak: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (weights, cache and activations; not the caching allocator's reserved
slack); on CPU the process's peak resident set size (``VmHWM``), reset before each run by writing 5
to ``/proc/self/clear_refs`` after the garbage collector and ``malloc_trim`` have returned freed
memory, so each run's peak is its own, not the process-lifetime high-water mark that ``ru_maxrss``
reports. It includes the weights, the libraries and the interpreter, as a user's process would.
``uncomp generate --json`` and ``uncomp bench`` both report this per-run peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import torch


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: free GPU memory, or ``MemAvailable`` on a Linux CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")



def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: make the process's peak RSS (VmHWM) its current RSS. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


_LIBC: ctypes.CDLL | None | bool = False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next run's RSS starts from what is in use."""
    global _LIBC
    if _LIBC is False:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else None
        except OSError:
            _LIBC = None
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory of one run, measured the same way for the table and for the memory-cap search."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = device.type == "cuda" or _reset_peak_rss()

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats (weights + cache + activations)"
        if self.available:
            return ("process peak RSS (VmHWM), reset before each run via /proc/self/clear_refs after gc and "
                    "malloc_trim; includes weights, libraries and the interpreter")
        return "unavailable: per-run peak RSS needs Linux /proc/self/clear_refs"

    def start(self) -> int | None:
        """Reset the peak; returns the memory in use now (bytes)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if not self.available:
            return None
        _malloc_trim()
        _reset_peak_rss()
        return _proc_status_bytes("VmRSS")

    def peak(self) -> int | None:
        """The highest memory in use since :meth:`start` (bytes)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _proc_status_bytes("VmHWM") if self.available else None

    def capacity(self) -> int | None:
        """All the memory a run could use: the GPU's total memory, or what this process holds plus what the
        machine still has available. None where unknown."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        return available_memory_bytes(self.device) + (_proc_status_bytes("VmRSS") or 0)



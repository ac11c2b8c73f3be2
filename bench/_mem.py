"""Peak-memory helpers for benchmarks (Linux): reset and read the process's resident-set high-water mark."""

from __future__ import annotations

from pathlib import Path


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (writes 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024**2  # kB -> GiB
    raise KeyError(key)


def rss_gb() -> float:
    return _status("VmRSS")


def peak_gb() -> float:
    return _status("VmHWM")

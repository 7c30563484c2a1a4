"""Peak resident memory of this process, as the Linux kernel counts it (for the benches)."""

from __future__ import annotations

from pathlib import Path


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB: ``VmRSS`` (resident now), ``VmHWM`` (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset VmHWM to the current resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")

"""CPU time and memory of processes and of the host, read from ``/proc`` (Linux only)."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # the command name (field 2) may hold spaces: split after its closing parenthesis
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    return sum(cpu_split(pid))


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def memory_mb(pid: int) -> dict[str, float]:
    """RSS (``VmRSS``), PSS and USS (private pages) of ``pid`` in MB.

    PSS and USS come from ``/proc/<pid>/smaps_rollup``. RSS counts shared libraries in full
    for every process; PSS splits them among the processes that map them; USS is what one
    more sidecar really adds.
    """
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                kb[parts[0].rstrip(":")] = int(parts[1])
    uss = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"rss": round(rss_mb(pid), 1), "pss": round(kb["Pss"] / 1024, 1),
            "uss": round(uss / 1024, 1)}


def host_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the first line of ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have been waited for (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWindow:
    """CPU used between ``start()`` and ``stop()`` by named processes, by the child processes
    that finished meanwhile (``wrk``), and by the whole host."""

    pids: dict[str, int]
    _cpu0: dict[str, float] | None = None
    _children0: float = 0.0
    _host0: tuple[int, int] = (0, 0)
    _t0: float = 0.0

    def start(self) -> None:
        """Take the first readings."""
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._children0 = children_cpu_seconds()
        self._host0 = host_busy_ticks()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """vCPU (CPU seconds per wall second) per process name, ``wrk``, ``host`` (cores busy)
        and ``other``: the host minus everything named, i.e. other users of the machine."""
        assert self._cpu0 is not None, "start() first"
        wall = time.monotonic() - self._t0
        out = {name: (cpu_seconds(pid) - self._cpu0[name]) / wall for name, pid in self.pids.items()}
        out["wrk"] = (children_cpu_seconds() - self._children0) / wall
        busy, total = host_busy_ticks()
        share = (busy - self._host0[0]) / max(1, total - self._host0[1])
        out["host"] = share * (os.cpu_count() or 1)
        out["other"] = max(0.0, out["host"] - sum(v for k, v in out.items() if k != "host"))
        return out

"""What this machine has -- the GPUs it shows (index, name, total and free memory) and its memory: what the
doctor's checks measure against.

Its own module so that the shared :class:`~r3_rl.doctor.base.Context` can list them without importing the
checks that use them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass
class GpuInfo:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes


def visible_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, torch.cuda.get_device_properties(i).name, int(total), int(free)))
    return out


def physical_memory(cgroup: Path = Path("/sys/fs/cgroup/memory.max")) -> int:
    """Bytes of memory this machine gives the run: its physical memory, or a container's cgroup limit (v2)
    where that is lower (a container on a 2 TB node may have 200 GB)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = cgroup.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total

"""What machine a benchmark ran on, and where its result goes: shared by the scripts in ``benchmarks/``.

Figures from this project's CPUs differ by more than the levers they measure (the same 2-core cloud
machine was once an AMD EPYC with AVX-512 and native bfloat16, once one without), so each result
file records the CPU model, its family / model numbers, AVX-512 and native bfloat16, the cores this
process may use, the load average when the benchmark started and, when torch is already imported,
its version, thread count and GPU.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in first.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine as a JSON-ready dict; ``extra`` (e.g. ``shared="yes: ..."``) is added as given."""
    fields = _cpuinfo()
    flags = set(fields.get("flags", "").split())
    info: dict[str, Any] = {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if fields:
        info.update(cpu_family=fields.get("cpu family"), cpu_model_number=fields.get("model"),
                    avx512="avx512f" in flags, native_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}))
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        pass
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this system
        pass
    torch = sys.modules.get("torch")  # described only when the benchmark uses it: importing it here costs seconds
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    info.update(extra)
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for a benchmark's printout: CPU model, AVX-512, cores, torch threads, GPU."""
    parts = [str(info.get("cpu_model", "?"))]
    if "avx512" in info:
        parts.append("AVX-512" if info["avx512"] else "no AVX-512")
    parts.append(f"{info.get('usable_cpus', info.get('cpu_count'))} usable cores")
    if "torch" in info:
        parts.append(f"torch {info['torch']}, {info['torch_threads']} thread(s), {info['gpu'] or 'no GPU'}")
    return ", ".join(parts)


def save_result(stem: str, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``benchmarks/results/<stem>_<date-time>.json``, say so, and return the path."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(__file__).resolve().parent / "results" / f"{stem}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {path}")
    return path

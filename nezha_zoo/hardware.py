"""Run-time CPU feature detection (framework-free): which int8 / bfloat16 units this machine has.

The integer kernels (I-BERT's quant mode) and the benchmark reports ask :func:`cpu_features`, which
reads ``/proc/cpuinfo`` on Linux and ``sysctl`` on macOS, once per process.  What a framework's own
dispatch does with the units (oneDNN, XLA, Eigen) is its business; these flags say what the CPU
offers, so a report can be read against the machine it was measured on.

Flag names are Linux's ``/proc/cpuinfo`` names: ``avx2``, ``avx512f``, ``avx512_vnni`` (AVX-512
int8 dot products), ``avx_vnni`` (the VEX-encoded twin on AVX2-only cores), ``avx512_bf16``,
``amx_tile`` / ``amx_int8`` / ``amx_bf16`` (Intel AMX tiles).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["CpuFeatures", "parse_cpuinfo", "parse_sysctl", "cpu_features", "machine_info"]


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's model name and the vector / matrix units the kernels care about (all ``bool``)."""

    model: str = "unknown"
    avx2: bool = False
    avx512f: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    avx512_bf16: bool = False
    amx_tile: bool = False
    amx_int8: bool = False
    amx_bf16: bool = False

    @property
    def int8_dot(self) -> bool:
        """True when the CPU has an int8 x int8 -> int32 dot-product unit (VNNI or AMX-INT8)."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    @property
    def bf16_dot(self) -> bool:
        """True when the CPU has a bfloat16 dot-product unit (AVX512-BF16 or AMX-BF16)."""
        return self.avx512_bf16 or self.amx_bf16

    def flags(self) -> list[str]:
        """Names of the units present, in declaration order (e.g. ``['avx2', 'avx512f', 'avx512_vnni']``)."""
        return [f.name for f in fields(self) if f.name != "model" and getattr(self, f.name)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"model": str, <flag>: bool, ...}``."""
        return asdict(self)

    def summary(self) -> str:
        """One line for a report: ``"AMD EPYC (avx2, avx512f, avx512_vnni, avx512_bf16)"``."""
        return f"{self.model} ({', '.join(self.flags()) or 'none of ' + ', '.join(_FLAG_NAMES)})"


_FLAG_NAMES = tuple(f.name for f in fields(CpuFeatures) if f.name != "model")

#: macOS ``sysctl machdep.cpu.*features`` spelling (upper case, no underscore) -> our flag name.
_SYSCTL_NAMES = {name.upper().replace("_", ""): name for name in _FLAG_NAMES}


def parse_cpuinfo(text: str) -> CpuFeatures:
    """Features of the first processor listed in a Linux ``/proc/cpuinfo`` text.

    Args:
        text (str): the file's contents (x86: ``model name`` and ``flags`` lines; other architectures
            have ``Features`` and maybe no model name, so every x86 flag is False there).
    Returns:
        :class:`CpuFeatures`.
    """
    model, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif flags is None and key in ("flags", "features"):
            flags = set(value.split())
        if model is not None and flags is not None:
            break
    flags = flags or set()
    return CpuFeatures(model=model or "unknown", **{name: name in flags for name in _FLAG_NAMES})


def parse_sysctl(text: str) -> CpuFeatures:
    """Features from macOS ``sysctl machdep.cpu`` output (``key: value`` lines).

    ``machdep.cpu.brand_string`` is the model; ``machdep.cpu.features`` and
    ``machdep.cpu.leaf7_features`` list upper-case names (``AVX2``, ``AVX512F``, ``AVX512VNNI``...).
    Apple silicon has neither feature line, so every flag is False.
    """
    model, names = None, set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "machdep.cpu.brand_string":
            model = value.strip()
        elif key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            names.update(_SYSCTL_NAMES.get(v.upper().replace("_", ""), "") for v in value.split())
    return CpuFeatures(model=model or "unknown", **{name: name in names for name in _FLAG_NAMES})


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (read once per process; all False where the OS says nothing)."""
    system = platform.system()
    try:
        if system == "Linux":
            with open("/proc/cpuinfo") as f:
                found = parse_cpuinfo(f.read())
        elif system == "Darwin":
            out = subprocess.run(["sysctl", "machdep.cpu"], capture_output=True, text=True, timeout=10, check=False)
            found = parse_sysctl(out.stdout)
        else:
            found = CpuFeatures()
    except (OSError, subprocess.SubprocessError):
        found = CpuFeatures()
    if found.model == "unknown":
        found = CpuFeatures(**{**found.as_dict(), "model": platform.processor() or platform.machine() or "unknown"})
    return found


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """The ``machine`` section of a benchmark report: model, cores, threads, platform and CPU flags.

    Returns:
        ``{"cpu": str, "cores": int | None, "threads": int | None, "platform": str, "cpu_flags": [str],
        "cpu_features": {flag: bool}}``.
    """
    feats = cpu_features()
    return {
        "cpu": feats.model,
        "cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "cpu_flags": feats.flags(),
        "cpu_features": feats.as_dict(),
    }

"""Shared helpers of the benchmarks: measured child processes, machine facts, tensor reads.

Nothing here imports jaxmerge, jax or torch at module level, so a benchmark driver
stays light and its children (the things being measured) own all the heavy imports.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np


@dataclasses.dataclass
class Measured:
    """One measured run of a child process."""

    label: str
    command: list[str]
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    returncode: int
    log: str
    load_at_start: float

    def ok(self) -> bool:
        return self.returncode == 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Linux charges the peak RSS of the *spawning* process's address space to a child's
# ru_maxrss when the child execs (the old mm's high-water mark goes into signal->maxrss,
# and Python's subprocess uses vfork), so a child of a big parent reports at least the
# parent's peak. Measured commands are therefore started by this tiny launcher (python -S,
# ~10 MB): it does Popen + os.wait4 on the real command and reports the numbers as JSON.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
command, log_path, result_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(log_path, "ab") as log:
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
child.returncode = os.waitstatus_to_exitcode(status)
with open(result_path, "w") as out:
    json.dump({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "maxrss_kib": usage.ru_maxrss, "returncode": child.returncode}, out)
"""


def measure(command: list[str], log_path: pathlib.Path, env: dict | None = None,
            label: str = "", cwd: str | None = None) -> Measured:
    """Runs ``command``; wall time and the child's peak RSS (``os.wait4``'s ru_maxrss).

    On Linux ru_maxrss is in KiB; it covers the child process only (both tools run
    their work in a single process). cpu_seconds = the child's user + system time, less
    sensitive than wall time to other load on the machine; load_at_start = the 1-minute
    load average when the child started. stdout and stderr go to ``log_path``. The
    command is started from a small launcher process (see ``_LAUNCHER``) so that this
    process's own memory never leaks into the child's ru_maxrss.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = log_path.with_suffix(".rusage.json")
    result_path.unlink(missing_ok=True)
    log_path.write_bytes(("$ " + " ".join(command) + "\n").encode())
    load = os.getloadavg()[0]
    launcher = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, json.dumps(command), str(log_path),
         str(result_path)], env=env, cwd=cwd, check=False)
    if launcher.returncode != 0 or not result_path.exists():
        return Measured(label=label, command=command, seconds=math.nan,
                        cpu_seconds=math.nan, peak_rss_mb=math.nan,
                        returncode=launcher.returncode or -1, log=str(log_path),
                        load_at_start=load)
    usage = json.loads(result_path.read_text())
    return Measured(label=label, command=command, seconds=usage["seconds"],
                    cpu_seconds=usage["cpu_seconds"],
                    peak_rss_mb=usage["maxrss_kib"] * 1024 / 1e6,
                    returncode=usage["returncode"], log=str(log_path), load_at_start=load)


def log_tail(path: str | pathlib.Path, lines: int = 25) -> str:
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError as error:
        return f"<no log: {error}>"
    return "\n".join(text.splitlines()[-lines:])


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict:
    """Cores, CPU model, memory and the versions of everything measured."""
    cpu_model = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in (
            "jaxmerge", "jax", "jaxlib", "torch", "mergekit", "transformers", "safetensors",
            "numpy")},
    }


# ---------------------------------------------------------------------------
# Reading checkpoints tensor by tensor


class Checkpoint:
    """Read access to the tensors of a safetensors checkpoint directory, one at a time."""

    def __init__(self, directory: str | pathlib.Path):
        from safetensors import safe_open

        self.directory = pathlib.Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if len(files) != 1:
                raise FileNotFoundError(f"{self.directory}: expected one .safetensors file "
                                        f"or an index, found {len(files)} files")
            weight_map = None
            single = files[0].name
        self._handles = {}
        self.files = {}
        names = weight_map.values() if weight_map else [single]
        for file in sorted(set(names)):
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        if weight_map:
            self.files = dict(weight_map)
        else:
            self.files = {name: single for name in self._handles[single].keys()}

    def names(self) -> list[str]:
        return list(self.files)

    def torch(self, name: str):
        return self._handles[self.files[name]].get_tensor(name)

    def float32(self, name: str) -> np.ndarray:
        import torch

        return self.torch(name).to(torch.float32).numpy()


def ordered_bits(tensor) -> np.ndarray | None:
    """bf16 bit patterns mapped to integers in float order (difference = ulp distance)."""
    import torch

    if tensor.dtype != torch.bfloat16:
        return None
    bits = tensor.view(torch.int16).numpy().astype(np.int32)
    return np.where(bits < 0, -(bits & 0x7FFF), bits)

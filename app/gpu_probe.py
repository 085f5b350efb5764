"""Start-up check: a GPU the container can see must be one torch can use.

PyPI's torch 2.13 is the CUDA 13.0 build, which needs a host driver >= 580. On an older driver
`torch.cuda.is_available()` is just False, so `DEVICE=auto` would quietly load a 7B pair on the
CPU (100x slower, or out of memory) with nothing in the log saying why. `check` turns that into
one line naming the driver and the CUDA version the image needs; `python -m app` prints it and
exits with `EXIT_CODE`, the loader raises it (`/health` then answers 503 `load_failed`).

A GPU is "visible" when the NVIDIA runtime put a GPU device file (/dev/nvidia0, ...) in the
container or `nvidia-smi` lists one; a CPU-only torch on such a host is refused too. DEVICE=cpu
(and mps) skip the check; CUDA_VISIBLE_DEVICES set empty (or -1) counts as asking for the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

EXIT_CODE = 3
DEV_DIR = Path("/dev")
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")

# The oldest Linux driver each CUDA major version runs on. PyTorch's wheels bring their own CUDA
# runtime and rely on NVIDIA's minor version compatibility, so the floor is per major version:
# 12.x on >= 525, 13.x on >= 580 (NVIDIA, "CUDA Compatibility", minor version compatibility table,
# docs.nvidia.com/deploy/cuda-compatibility/). The full toolkits list newer drivers (CUDA Toolkit
# release notes: 12.6 GA >= 560.28.03, 13.0 GA >= 580.65.06); torch needs only the floor.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}

# The published image's CUDA 12 variant (torch 2.13's CUDA 12 build is cu126: PyTorch dropped 12.8
# in 2.12), suggested to hosts whose driver is too old for the default CUDA 13 image. The tag is
# the workflow's (tests/test_deploy_files.py holds them equal).
CUDA12_TAG, CUDA12_VERSION = "cu126", "12.6"


class GpuUnusable(RuntimeError):
    """A GPU is visible (or DEVICE asks for one) but torch cannot use it."""


@dataclass(frozen=True)
class Probe:
    device_files: tuple[str, ...]  # /dev/nvidia0, ... in the container
    driver: str | None  # host driver version, e.g. "550.54.15"
    gpus: tuple[str, ...]  # GPU names from nvidia-smi
    torch_version: str
    torch_cuda: str | None  # the CUDA version torch was built for; None: a CPU-only build
    usable: bool  # torch.cuda.is_available()
    device_count: int
    torch_warning: str | None  # what torch said while trying, if anything

    @property
    def visible(self) -> bool:
        return bool(self.device_files or self.gpus)


def device_files() -> tuple[str, ...]:
    """GPU device nodes; /dev/nvidiactl alone (driver mounted, no GPU given) does not count."""
    try:
        names = os.listdir(DEV_DIR)
    except OSError:
        return ()
    return tuple(sorted(str(DEV_DIR / n) for n in names if re.fullmatch(r"nvidia\d+", n)))


def nvidia_smi() -> list[tuple[str, str]]:
    """(driver version, GPU name) per GPU that nvidia-smi lists; [] when it is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        proc = subprocess.run(
            [binary, "--query-gpu=driver_version,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:  # "No devices were found", or it cannot talk to the driver
        return []
    rows = (line.split(",", 1) for line in proc.stdout.splitlines() if "," in line)
    return [(driver.strip(), name.strip()) for driver, name in rows]


def proc_driver_version() -> str | None:
    """The kernel module's version, for containers that have the device files but no nvidia-smi."""
    try:
        text = PROC_DRIVER_VERSION.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def torch_status() -> tuple[str, str | None, bool, int, str | None]:
    """torch's version, its CUDA build, whether CUDA works, the device count, and its warning."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
        count = torch.cuda.device_count() if usable else 0
    said = next((str(w.message) for w in caught if "CUDA" in str(w.message)), None)
    return torch.__version__, torch.version.cuda, usable, count, said


def probe() -> Probe:
    smi = nvidia_smi()
    version, cuda, usable, count, said = torch_status()
    return Probe(
        device_files=device_files(),
        driver=smi[0][0] if smi else proc_driver_version(),
        gpus=tuple(name for _, name in smi),
        torch_version=version,
        torch_cuda=cuda,
        usable=usable,
        device_count=count,
        torch_warning=said,
    )


@cache
def host_driver() -> str | None:
    """The host's driver version for /info (nvidia-smi, else /proc), looked up once."""
    smi = nvidia_smi()
    return smi[0][0] if smi else proc_driver_version()


def _major(version: str | None) -> int | None:
    match = re.match(r"(\d+)", version or "")
    return int(match.group(1)) if match else None


def _gpus(p: Probe) -> str:
    if not p.gpus:
        return p.device_files[0] if p.device_files else "a GPU"
    return ", ".join(name if n == 1 else f"{n} x {name}" for name, n in Counter(p.gpus).items())


def _hidden() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing: the operator hid the GPUs from this process on purpose."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def _why(p: Probe) -> str:
    """Why torch cannot use the visible GPU, and what to do: the body of the refusal."""
    torch_name = f"torch {p.torch_version}"
    if p.torch_cuda is None:
        return f"this {torch_name} is a CPU-only build: install a CUDA build of torch"
    need = MIN_DRIVER.get(_major(p.torch_cuda) or 0)
    driver = _major(p.driver)
    built = f"this image's {torch_name} is built for CUDA {p.torch_cuda}"
    if need is None:
        return f"{built}, which needs a newer driver than this host has"
    if driver is None or driver < need:
        fix = "update the host driver, or pick a host with a newer one"
        if (_major(p.torch_cuda) or 0) >= 13 and (driver is None or driver >= MIN_DRIVER[12]):
            variant = f"CUDA {CUDA12_VERSION}, driver >= {MIN_DRIVER[12]}"
            fix = f"use the :{CUDA12_TAG} image tag ({variant}), or a host with driver >= {need}"
        return f"{built}, which needs driver >= {need}: {fix}"
    said = f" (torch: {' '.join(p.torch_warning.split())[:200]})" if p.torch_warning else ""
    return (
        f"{torch_name} (CUDA {p.torch_cuda}) cannot use it{said}: give the container the GPU "
        "(--gpus all; NVIDIA_DRIVER_CAPABILITIES must include compute)"
    )


def refusal(device: str, p: Probe) -> str | None:
    """The one-line reason not to start, or None. Pure, so every branch is testable with fakes."""
    wants_cuda = device.startswith("cuda")
    if p.usable:
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= p.device_count:
            last = p.device_count - 1
            return f"DEVICE={device} but torch sees {p.device_count} GPU(s): use cuda:0 .. cuda:{last}"
        return None
    if _hidden():
        return f"DEVICE={device} but CUDA_VISIBLE_DEVICES hides every GPU" if wants_cuda else None
    if not p.visible:
        if wants_cuda:
            return (
                f"DEVICE={device} but no GPU is visible to this container (no /dev/nvidia* device, no "
                "nvidia-smi): run it with --gpus all on a GPU host, or set DEVICE=auto or DEVICE=cpu"
            )
        return None
    seen = f"driver {p.driver}, {_gpus(p)}" if p.driver else f"{_gpus(p)}, driver version unknown"
    return f"a GPU is visible ({seen}) but {_why(p)}, or set DEVICE=cpu to run on the CPU anyway"


def note(p: Probe) -> str:
    """The one line the loader logs about where the pair goes (when `refusal` said nothing)."""
    if p.usable:
        driver = f", driver {p.driver}" if p.driver else ""
        gpus = _gpus(p) if p.gpus else f"{p.device_count} GPU(s)"
        return f"CUDA {p.torch_cuda} with torch {p.torch_version}{driver}: {gpus}"
    if _hidden():
        return "CUDA_VISIBLE_DEVICES hides the GPUs: the models run on the CPU"
    return (
        "no GPU is visible to this container (no /dev/nvidia* device, no nvidia-smi): "
        "the models run on the CPU"
    )


def check(device: str) -> str | None:
    """Probe when DEVICE may mean a GPU; raise GpuUnusable with the line, else return the note.

    Args:
        device: the DEVICE setting (auto, cpu, mps, cuda, cuda:N).
    """
    if device != "auto" and not device.startswith("cuda"):
        return None
    p = probe()
    reason = refusal(device, p)
    if reason:
        raise GpuUnusable(reason)
    if p.usable:
        host_driver()  # look it up now, so /info does not run nvidia-smi on the event loop
    return note(p)

"""The start-up GPU check, with the probe faked: device files, nvidia-smi and torch.cuda."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_cli import server_env

from app import gpu_probe
from app.gpu_probe import GpuUnusable, check
from app.loader import load_pair
from app.settings import Settings
from app.system import info
from app.system.info import info_body, model_summaries

ROOT = Path(__file__).resolve().parents[1]
A100 = ("550.54.15", "NVIDIA A100-SXM4-80GB")


@pytest.fixture
def fake(monkeypatch):
    """Fake the host: fake(smi=[(driver, name)], files=(...), torch=(version, cuda, usable, count, said))."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu_probe.host_driver.cache_clear()

    def install(smi=(), files=(), torch=("2.13.0", "13.0", False, 0, None), proc=None):
        monkeypatch.setattr(gpu_probe, "nvidia_smi", lambda: list(smi))
        monkeypatch.setattr(gpu_probe, "device_files", lambda: tuple(files))
        monkeypatch.setattr(gpu_probe, "torch_status", lambda: torch)
        monkeypatch.setattr(gpu_probe, "proc_driver_version", lambda: proc)

    yield install
    gpu_probe.host_driver.cache_clear()  # check() fills it from the fake nvidia-smi


def test_refuses_a_gpu_whose_driver_is_too_old_for_the_image(fake):
    fake(smi=[A100])
    with pytest.raises(GpuUnusable) as err:
        check("auto")
    line = str(err.value)
    assert "\n" not in line
    assert line == (
        "a GPU is visible (driver 550.54.15, NVIDIA A100-SXM4-80GB) but this image's torch 2.13.0 is "
        "built for CUDA 13.0, which needs driver >= 580: use the :cu126 image tag (CUDA 12.6, driver "
        ">= 525), or a host with driver >= 580, or set DEVICE=cpu to run on the CPU anyway"
    )


def test_device_cpu_skips_the_probe(monkeypatch):
    def boom():
        raise AssertionError("probed")

    monkeypatch.setattr(gpu_probe, "probe", boom)
    assert check("cpu") is None and check("mps") is None


def test_passes_when_cuda_works(fake):
    fake(
        smi=[("580.65.06", "NVIDIA H100 80GB HBM3")] * 2,
        files=("/dev/nvidia0", "/dev/nvidia1"),
        torch=("2.13.0", "13.0", True, 2, None),
    )
    assert check("auto") == "CUDA 13.0 with torch 2.13.0, driver 580.65.06: 2 x NVIDIA H100 80GB HBM3"
    assert gpu_probe.host_driver() == "580.65.06"  # what /info will say
    assert check("cuda:1")
    with pytest.raises(GpuUnusable, match=r"DEVICE=cuda:2 but torch sees 2 GPU\(s\)"):
        check("cuda:2")


def test_no_gpu_visible_runs_on_the_cpu_with_auto_and_fails_with_cuda(fake):
    fake()
    assert "no GPU is visible" in check("auto") and "CPU" in check("auto")
    with pytest.raises(GpuUnusable, match="DEVICE=cuda but no GPU is visible to this container"):
        check("cuda")


def test_the_loader_logs_the_cpu_fallback_and_refuses_before_loading(fake, tiny_dirs, tmp_path, caplog):
    fake()
    after, before = tiny_dirs
    settings = Settings(model_after_id=str(after), model_before_id=str(before), data_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="app.loader"):
        load_pair(settings)
    said = [r.message for r in caplog.records if r.message.startswith("device: ")]
    assert said == ["device: " + gpu_probe.note(gpu_probe.probe())]
    assert "no GPU is visible to this container" in said[0] and "the models run on the CPU" in said[0]
    fake(smi=[A100])
    missing = Settings(model_after_id=str(tmp_path / "nope"), model_before_id=str(tmp_path / "nope"))
    with pytest.raises(GpuUnusable, match="driver >= 580"):  # not an OSError: nothing was loaded
        load_pair(missing)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        # Below even CUDA 12's floor: no tag helps.
        (
            {"smi": [("470.82.01", "Tesla T4")]},
            "needs driver >= 580: update the host driver, or pick a host with a newer one",
        ),
        # The CUDA 12 variant on a driver older than 525.
        (
            {"smi": [("520.61.05", "Tesla T4")], "torch": ("2.13.0+cu126", "12.6", False, 0, None)},
            "torch 2.13.0+cu126 is built for CUDA 12.6, which needs driver >= 525: update the host driver",
        ),
        # Driver new enough, torch still cannot: say what torch said.
        (
            {
                "smi": [("580.65.06", "NVIDIA L4")],
                "torch": ("2.13.0", "13.0", False, 0, "CUDA initialization: error 999\n  x"),
            },
            "torch 2.13.0 (CUDA 13.0) cannot use it (torch: CUDA initialization: error 999 x): give the",
        ),
        # A CPU-only torch on a GPU host.
        (
            {"smi": [A100], "torch": ("2.13.0+cpu", None, False, 0, None)},
            "this torch 2.13.0+cpu is a CPU-only build",
        ),
        # Device files but no nvidia-smi: the driver comes from /proc.
        (
            {"files": ("/dev/nvidia0",), "proc": "550.54.15"},
            "a GPU is visible (driver 550.54.15, /dev/nvidia0) but",
        ),
        ({"files": ("/dev/nvidia0",)}, "a GPU is visible (/dev/nvidia0, driver version unknown) but"),
    ],
)
def test_the_line_says_what_to_do(fake, host, expected):
    fake(**host)
    with pytest.raises(GpuUnusable) as err:
        check("auto")
    assert expected in str(err.value) and str(err.value).endswith(
        "or set DEVICE=cpu to run on the CPU anyway"
    )


def test_cuda_visible_devices_empty_means_the_cpu_on_purpose(fake, monkeypatch):
    fake(smi=[A100])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES hides the GPUs" in check("auto")
    with pytest.raises(GpuUnusable, match="CUDA_VISIBLE_DEVICES hides every GPU"):
        check("cuda")


def test_the_real_probes_read_the_host(tmp_path, monkeypatch):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1", "null"):
        (dev / name).touch()
    monkeypatch.setattr(gpu_probe, "DEV_DIR", dev)
    assert gpu_probe.device_files() == (str(dev / "nvidia0"), str(dev / "nvidia1"))

    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    )
    monkeypatch.setattr(gpu_probe, "PROC_DRIVER_VERSION", proc)
    assert gpu_probe.proc_driver_version() == "550.54.15"
    monkeypatch.setattr(gpu_probe, "PROC_DRIVER_VERSION", tmp_path / "missing")
    assert gpu_probe.proc_driver_version() is None

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        '#!/bin/sh\nprintf "550.54.15, NVIDIA A100-SXM4-80GB\\n550.54.15, NVIDIA A100-SXM4-80GB\\n"\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert gpu_probe.nvidia_smi() == [A100, A100]
    smi.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    assert gpu_probe.nvidia_smi() == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_probe.nvidia_smi() == []

    assert gpu_probe.torch_status()[:3] == (torch.__version__, torch.version.cuda, torch.cuda.is_available())


def run_app(tmp_path: Path, *, sitecustomize: str = "", **env: str) -> subprocess.CompletedProcess:
    """`python -m app` with a fake nvidia-smi first on PATH (and, optionally, torch patched at start)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "550.54.15, NVIDIA A100-SXM4-80GB"\n')
    smi.chmod(0o755)
    extra = {"PATH": f"{bin_dir}:{server_env()['PATH']}", "DATA_DIR": str(tmp_path / "data"), **env}
    if sitecustomize:
        (tmp_path / "site").mkdir(exist_ok=True)
        (tmp_path / "site" / "sitecustomize.py").write_text(sitecustomize)
        extra["PYTHONPATH"] = str(tmp_path / "site")
    return subprocess.run(
        [sys.executable, "-m", "app"],
        env=server_env(**extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's torch can use its GPU")
def test_python_m_app_refuses_with_one_line_and_exit_code_3(tmp_path):
    # This machine's torch may be the CPU build: make it claim PyPI's CUDA 13.0 build, which cannot
    # initialise here, as on a host whose driver is too old.
    proc = run_app(
        tmp_path, sitecustomize="import torch\ntorch.version.cuda = '13.0'\ntorch.__version__ = '2.13.0'\n"
    )
    assert proc.returncode == gpu_probe.EXIT_CODE == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        (
            "error: a GPU is visible (driver 550.54.15, NVIDIA A100-SXM4-80GB) but this image's torch "
            "2.13.0 is built for CUDA 13.0, which needs driver >= 580: use the :cu126 image tag (CUDA "
            "12.6, driver >= 525), or a host with driver >= 580, or set DEVICE=cpu to run on the CPU anyway"
        )
    ]
    assert not (tmp_path / "data").exists()  # refused before anything was built or loaded


def test_python_m_app_with_device_cuda_and_no_gpu_fails_at_once(tmp_path):
    if gpu_probe.device_files() or gpu_probe.nvidia_smi() or torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_app(tmp_path, DEVICE="cuda", PATH=server_env()["PATH"])  # the fake nvidia-smi left off PATH
    assert proc.returncode == 3
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: DEVICE=cuda but no GPU is visible to this container")
    )


def test_info_reports_cuda_only_when_the_models_are_on_a_gpu(pair, monkeypatch):
    assert info_body(pair, model_summaries(pair), Settings(), None)["cuda"] == {"runtime": None, "driver": None, "gpus": None}

    monkeypatch.setattr(info, "input_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA A100 #{i}")
    monkeypatch.setattr(gpu_probe, "host_driver", lambda: "550.54.15")
    body = info_body(pair, model_summaries(pair), Settings(), None)
    assert body["cuda"] == {
        "runtime": "12.6",
        "driver": "550.54.15",
        "gpus": ["NVIDIA A100 #0", "NVIDIA A100 #1"],
    }
    assert body["model_after"]["device"] == "cuda:0" and body["versions"]["torch"]


def test_ray_serve_refuses_on_the_driver_before_sizing_replicas(fake):
    pytest.importorskip("ray.serve")
    from app.ray_serve import build_app

    fake(smi=[A100])
    with pytest.raises(GpuUnusable, match="driver >= 580"):
        build_app({"num_replicas": "1"})

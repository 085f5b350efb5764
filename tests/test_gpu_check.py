"""`make gpu-check` keeps working without a GPU: its tiny CPU mode, its wheel picking, its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, python: str, timeout: float) -> tuple[subprocess.CompletedProcess, Path]:
    report = tmp_path / "gpu_check.json"
    env = os.environ | {
        "GPU_CHECK_PYTHON": python,
        "GPU_CHECK_OUT": str(report),
        "CUDA_VISIBLE_DEVICES": "",  # the CPU mode even where CI has a GPU
    }
    proc = subprocess.run(
        ["bash", "deploy/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, report


def test_tiny_cpu_mode_reports_every_section(tmp_path):
    proc, report = run_script(tmp_path, sys.executable, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert printed == json.loads(report.read_text())
    assert printed["complete"] and printed["ok"] and printed["mode"] == "cpu" and printed["size"] == "tiny"
    sections = printed["sections"]
    assert set(gpu_check.REQUIRED_SECTIONS) <= set(sections)
    assert sections["gpu_tests"] == {"status": "skipped", "reason": "no CUDA", "seconds": 0.0}
    assert any(s.startswith("gpu tests: skipped, no CUDA") for s in printed["skipped"])
    assert sections["environment"]["cuda_available"] is False
    assert sections["environment"]["packages"]["torch"]["installed"]
    for name in gpu_check.GPU_SECTIONS:
        assert sections[name]["status"] == "ok", sections[name]
        assert sections[name]["result"]["device"] == "cpu"
        assert (tmp_path / f"gpu_check_{name}.log").exists()
    headline = printed["headline"]
    for key in (
        "bench_lda.lda_b1_over_generate_b1",
        "bench_lda.lda_b4_over_generate_b4",
        "bench_lda.lda_compiled_b1_over_seed_loop_b1",
        "bench_lda.lda_compiled_b4_over_lda_b4",
        "bench_amplification.apply_restore_over_peft_merge_unmerge",
        "bench_amplification.reload_over_apply_restore",
        "bench_amplification.adapter_mode_over_two_model_b2",
        "bench_weightdiff.batched_over_sequential_T4",
        "bench_dit.interpreter_step_over_stage1_step_T2",
        "bench_dit.describe_4_over_describe_1",
        "bench_diffing.mining_over_two_forwards",
        "bench_diffing.adl_over_two_forwards",
    ):
        assert headline[key] > 0, key
    assert headline["bench_amplification.ours_restore_exact"] is True
    assert headline["bench_lda.lda_compiled_b1_same_tokens"] is True  # fp32: compiled = eager tokens
    for sampling in ("greedy", "seeded"):  # fp32 on a CPU: batched and joined rows equal alone
        for how in ("batched", "joined"):
            assert headline[f"bench_repro.{sampling}_{how}_rows_same_tokens"] == 1.0


def test_a_crashed_run_still_prints_a_json_report(tmp_path):
    proc, report = run_script(tmp_path, "/bin/false", timeout=60)
    assert proc.returncode != 0
    printed = json.loads(proc.stdout)
    assert printed["complete"] is False and printed["ok"] is False and "status 1" in printed["error"]
    assert json.loads(report.read_text()) == printed


def test_wheel_list_is_pinned_and_never_replaces_the_cuda_stack():
    pins = gpu_check.locked_versions()
    for name in (*gpu_check.GPU_IMAGE_LACKS, *gpu_check.GPU_IMAGE_FLOORS):
        assert name in pins, f"{name} is not pinned in requirements.lock"
        assert not gpu_check.NEVER_REPLACE.match(name)
    assert all(gpu_check.NEVER_REPLACE.match(n) for n in ("torch", "triton", "nvidia-cublas", "numpy"))


def test_pick_wheels_installs_only_what_this_python_lacks_or_holds_older(tmp_path):
    for name in (
        "fastapi-999.0-py3-none-any.whl",  # newer than the installed one
        "pytest-0.1-py3-none-any.whl",  # older: keep the installed one
        "torch-99.0-cp312-cp312-manylinux_2_28_x86_64.whl",  # never from a wheel folder
        "no_such_package_xyz-1.0-py3-none-any.whl",  # missing
        "two_versions_xyz-1.0-py3-none-any.whl",
        "two_versions_xyz-2.0-py3-none-any.whl",  # one version of each package: the newest
    ):
        (tmp_path / name).touch()
    picked = sorted(p.name for p in gpu_check.pick_wheels(tmp_path))
    assert picked == [
        "fastapi-999.0-py3-none-any.whl",
        "no_such_package_xyz-1.0-py3-none-any.whl",
        "two_versions_xyz-2.0-py3-none-any.whl",
    ]
    assert gpu_check.pick_wheels(tmp_path / "missing") == []


def test_junit_results_and_last_json(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_a" time="1.5">'
        '<properties><property name="drift" value="0.01"/></properties></testcase>'
        '<testcase classname="t" name="test_b" time="0.1"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="t" name="test_c" time="0"><skipped message="no CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    result = gpu_check.junit_results(junit)
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 1, 1)
    assert result["tests"]["test_a"]["properties"] == {"drift": "0.01"}
    assert result["tests"]["test_b"]["message"] == "assert 1 == 2"
    assert gpu_check.last_json('noise\n{\n  "a": {"b": 1}\n}\n') == {"a": {"b": 1}}
    assert gpu_check.last_json("no json here") is None

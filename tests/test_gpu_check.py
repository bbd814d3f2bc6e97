"""scripts/gpu-check.sh: its budget, its reports, and its dry run end to end on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
REPORTS = ("gpu-check.json", "gpu-check.md", "gpu-check.log")


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_driver()


def test_the_caps_fit_the_lease():
    assert sum(step.cap_s for step in gpu_check.STEPS) + gpu_check.RESERVE_S <= gpu_check.BUDGET_S <= 8 * 60


def test_the_gpu_tests_step_runs_the_files_with_gpu_marked_tests():
    assert {"tests/test_triton_kernels.py", "tests/test_cuda_graphs.py"} <= set(gpu_check.GPU_TEST_FILES)


def test_the_quantized_decode_step_measures_fp8_and_int4_where_the_dense_one_does():
    steps = {step.name: step for step in gpu_check.STEPS}
    quantized, dense = steps["decode-quant"].gpu_args, steps["decode"].gpu_args
    assert quantized[quantized.index("--quantization") + 1] == "fp8,int4"
    assert quantized[:quantized.index("--quantization")] == dense


STAND_INS = {
    "fails": ("raise SystemExit(3)", 30),
    "overruns": ("import subprocess; subprocess.run(['sleep', '60'])", 1),
    "passes": ("print('| a | b |')", 30),
}


def test_a_failing_or_overrunning_step_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    for name, (code, _) in STAND_INS.items():
        (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(gpu_check, "STEPS", tuple(
        gpu_check.Step(name=name, cap_s=cap_s, module=name, gpu_args=(), dry_args=(), what=name)
        for name, (_, cap_s) in STAND_INS.items()
    ))
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--commit", "abc1234"]) == 1

    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("fails", "failed (exit 3)"), ("overruns", "timed out at 1 s"), ("passes", "ok")]
    assert report["steps"][1]["seconds"] < 10
    assert report["environment"]["commit"] == "abc1234"
    summary = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "## overruns: timed out at 1 s" in summary and "\n| a | b |\n" in summary


def test_an_unknown_step_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "decode,nonsense"])


def test_the_dry_run_runs_every_step_and_writes_the_reports(tmp_path):
    out = tmp_path / "out"
    child = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable, "KVSERVE_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=400,
    )
    assert child.returncode == 0, child.stdout[-5000:] + (out / "gpu-check.log").read_text()[-10000:]
    assert sorted(path.name for path in out.iterdir()) == sorted(REPORTS)

    report = json.loads((out / "gpu-check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == [step.name for step in gpu_check.STEPS]
    assert all(step["status"] == "ok" and step["seconds"] <= step["cap_s"] for step in steps.values())
    assert {"date", "commit", "device", "driver", "torch", "triton"} <= set(report["environment"])
    assert steps["kernels"]["result"]["kernels"] == "kvserve.kernels.triton_ops"
    assert [row["batch"] for row in steps["decode"]["result"]["decode"]] == [1, 4]
    assert all("step_ms" in row and "hf_step_ms" not in row for row in steps["decode-eager"]["result"]["decode"])
    assert all("hf_step_ms" in row and "step_ms" not in row for row in steps["decode-hf"]["result"]["decode"])
    assert len(steps["tp"]["result"]["step_ms"]) == 2
    quantized = steps["decode-quant"]["result"]["decode"]
    assert [(row["format"], row["batch"]) for row in quantized] == [("fp8", 1), ("fp8", 4), ("int4", 1), ("int4", 4)]
    for name, method in (("spec", "ngram"), ("spec-draft", "draft")):
        assert steps[name]["result"]["method"] == method
        assert [row["batch"] for row in steps[name]["result"]["speculative"]] == [1, 2]

    summary = (out / "gpu-check.md").read_text()
    assert all(f"## {name}: ok" in summary for name in steps)
    assert "| batch x context |" in summary and "| batch | context | HF step ms | HF tok/s |" in summary
    assert "total:" in child.stdout

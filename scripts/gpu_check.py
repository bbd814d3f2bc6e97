"""The GPU check of issue 16: on a machine with an H100 or H200, install the project and run the
GPU tests and benchmarks in order, each under its own time cap, so that the whole run fits a
short lease. A step that fails or runs past its cap is recorded and the run goes on. With
`--dry-run` the same steps run on this machine's CPU with tiny shapes.

Writes into the output folder: gpu-check.json (the environment and every step's record, with the
benchmark's own JSON report), gpu-check.md (the summary) and gpu-check.log (all output)."""

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480
RESERVE_S = 30  # outside the steps: starting the driver, reading versions, writing the report
# The dry run's tiny steps take seconds, but on a 2-core machine that other jobs share; its caps
# only stop a hung step.
DRY_RUN_CAP_FACTOR = 4
WHEELS = ROOT / ".kvserve" / "wheels"
CLI = "kvserve.cluster.cli"
# Only the files that hold gpu-marked tests (marked there, or through tests/triton_cases.py):
# the lent machine has no Ray (its wheel is larger than what may travel there), so collecting
# the modules that import Ray would fail the step.
GPU_TEST_FILES = tuple(sorted(
    str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
    if "mark.gpu" in (text := path.read_text()) or "from triton_cases import" in text
))
DRY_DEVICE = ("--device", "cpu", "--dtype", "float32")
DRY_TIMING = ("--copy-mib", "4", "--reps", "2", "--warmup", "1")
LLAMA3_8B_DECODE = ("--shape", "llama3-8b", "--context", "1024", "--steps", "32")
TINY_DECODE = ("--shape", "tiny", "--context", "8", "--steps", "3", *DRY_DEVICE, *DRY_TIMING)
LLAMA3_8B_SPEC = ("--shape", "llama3-8b", "--batches", "1,8,32", "--k", "4", "--device", "cuda", "--dtype", "bfloat16")
TINY_SPEC = ("--shape", "tiny", "--batches", "1,2", "--k", "2", "--tokens", "8", "--rounds", "1", *DRY_DEVICE)


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int  # on an H100/H200; the step is stopped past it
    module: str  # run as `python -m module`
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]  # the same step on the CPU with tiny shapes
    what: str
    interpret: bool = False  # in the dry run, the Triton kernels under Triton's interpreter

    @property
    def is_bench(self) -> bool:
        return self.module == CLI


def install_args() -> tuple[str, ...]:
    """The project alone on the machine's Python, whose CUDA torch stays, with the wheels carried
    in .kvserve/wheels (the lent machine reaches no package registry)."""
    wheels = sorted(str(path.relative_to(ROOT)) for path in WHEELS.glob("*.whl"))
    return ("install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", ".", *wheels)


# The budget table: each step's sizes and its cap. The caps add up to BUDGET_S - RESERVE_S at
# most (tests/test_gpu_check.py checks it), so the whole run fits its lease.
STEPS = (
    Step(
        name="install", cap_s=20, module="pip",
        gpu_args=install_args(),
        dry_args=(*install_args(), "--dry-run"),
        what="the project on the machine's Python and CUDA torch, no dependencies",
    ),
    Step(
        name="gpu-tests", cap_s=80, module="pytest",
        gpu_args=("-q", "-m", "gpu", *GPU_TEST_FILES),
        dry_args=("-q", "-m", "gpu", *GPU_TEST_FILES),
        what="the gpu-marked tests: kernels at real sizes, graph capture and replay, no host sync inside a "
             "decode step nor in the sampler's filters, profiled KV sizing (with a draft model's weights and KV "
             "cache beside the pool), prompt logprobs on the device",
    ),
    Step(
        name="kernels", cap_s=35, module=CLI,
        gpu_args=("bench", "kernels", "--grid", "1x32k,64x4k", "--prefill-lens", "512,2k,4k", "--prefix-len", "2k",
                  "--reps", "10"),
        dry_args=("bench", "kernels", "--grid", "2x40,3x16", "--prefill-lens", "16,33", "--prefix-len", "20",
                  "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32", *DRY_DEVICE, *DRY_TIMING),
        what="paged attention: decode at 1x32k and 64x4k, prefill of 512, 2k and 4k tokens after 0 and 2k cached",
        interpret=True,
    ),
    Step(
        name="decode", cap_s=60, module=CLI,
        gpu_args=("bench", "decode", *LLAMA3_8B_DECODE, "--batches", "1,16,64", "--skip-hf"),
        dry_args=("bench", "decode", *TINY_DECODE, "--batches", "1,4", "--skip-hf"),
        what="the engine's decode step with CUDA graphs, Llama-3-8B shape, batches 1, 16, 64",
        interpret=True,
    ),
    Step(
        name="decode-hf", cap_s=30, module=CLI,
        gpu_args=("bench", "decode", *LLAMA3_8B_DECODE, "--batches", "1", "--skip-engine"),
        dry_args=("bench", "decode", *TINY_DECODE, "--batches", "1,2", "--skip-engine"),
        what="HF generate's decode step on the same model, batch 1",
    ),
    Step(
        name="decode-eager", cap_s=30, module=CLI,
        gpu_args=("bench", "decode", *LLAMA3_8B_DECODE, "--batches", "1", "--enforce-eager", "--skip-hf"),
        dry_args=("bench", "decode", *TINY_DECODE, "--batches", "1,2", "--enforce-eager", "--skip-hf"),
        what="the engine's decode step without CUDA graphs, batch 1",
        interpret=True,
    ),
    Step(
        name="decode-quant", cap_s=55, module=CLI,
        gpu_args=("bench", "decode", *LLAMA3_8B_DECODE, "--batches", "1,16,64", "--skip-hf",
                  "--quantization", "fp8,int4"),
        dry_args=("bench", "decode", *TINY_DECODE, "--batches", "1,4", "--skip-hf", "--quantization", "fp8,int4"),
        what="the decode step of the same model in FP8 (W8A8, dynamic per token) and int4 (groups of 128) "
             "checkpoints' layouts, batches 1, 16, 64, against their smaller floors",
        interpret=True,
    ),
    Step(
        name="tp", cap_s=35, module=CLI,
        gpu_args=("bench", "tp", "--tp", "1", "--batch", "8", "--prompt-len", "64", "--steps", "16",
                  "--device", "cuda", "--dtype", "bfloat16"),
        dry_args=("bench", "tp", "--tp", "1", "--batch", "2", "--prompt-len", "8", "--steps", "3", *DRY_DEVICE),
        what="the engine on one worker actor (tp 1) against in process, the small benchmark Llama",
    ),
    Step(
        name="overhead", cap_s=35, module=CLI,
        gpu_args=("bench", "overhead", "--shape", "llama3-8b", "--batches", "64,256", "--modes", "greedy",
                  "top-p-seeded", "--steps", "10", "--warmup", "3", "--device", "cuda", "--dtype", "bfloat16"),
        dry_args=("bench", "overhead", "--shape", "tiny", "--batches", "4", "--modes", "greedy", "top-p-seeded",
                  "--steps", "3", "--warmup", "1", "--device", "cpu"),
        what="the engine's host time per decode step against the forward pass alone, Llama-3-8B shape, "
             "batches 64 and 256",
    ),
    Step(
        name="spec", cap_s=35, module=CLI,
        gpu_args=("bench", "spec", *LLAMA3_8B_SPEC, "--tokens", "64", "--rounds", "2"),
        dry_args=("bench", "spec", *TINY_SPEC),
        what="decode with and without n-gram speculation (k 4) on the repeating workload, Llama-3-8B shape, "
             "batches 1, 8, 32: the passes saved as speedup",
    ),
    Step(
        name="spec-draft", cap_s=35, module=CLI,
        gpu_args=("bench", "spec", *LLAMA3_8B_SPEC, "--tokens", "32", "--rounds", "1", "--method", "draft",
                  "--draft-shape", "llama3.2-1b"),
        dry_args=("bench", "spec", *TINY_SPEC, "--method", "draft", "--draft-shape", "tiny"),
        what="the same with a random-weight Llama-3.2-1B-shaped draft model: the cost of a draft step and its "
             "verification against plain decode (random weights keep next to no proposal)",
    ),
)
SUMMARY_LINES = 80  # of each step's output, in gpu-check.md; gpu-check.log has all of it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / ".kvserve" / "gpu-check"),
                        help="output folder (default: $OUT if set, else .kvserve/gpu-check)")
    parser.add_argument("--only", type=lambda text: text.split(","), metavar="STEP,...",
                        help=f"run only these steps, of: {', '.join(step.name for step in STEPS)}")
    parser.add_argument("--commit", help="the commit to record, where the checkout has no .git")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - {step.name for step in STEPS}
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    return args


def command_of(step: Step, dry_run: bool) -> list[str]:
    return ["-m", step.module, *(step.dry_args if dry_run else step.gpu_args)]


def environment_of(step: Step, dry_run: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run and step.interpret:
        env |= {"TRITON_INTERPRET": "1", "KVSERVE_KERNELS": "triton"}
    return env


def run_step(step: Step, dry_run: bool, scratch: Path) -> dict:
    """Runs `step` with its output in scratch/NAME.log; stops its process group at the cap."""
    report, log = scratch / f"{step.name}.json", scratch / f"{step.name}.log"
    command = command_of(step, dry_run)
    cap_s = step.cap_s * (DRY_RUN_CAP_FACTOR if dry_run else 1)
    json_flag = ["--json", str(report)] if step.is_bench else []
    start = time.monotonic()
    with log.open("w") as output:
        child = subprocess.Popen([sys.executable, *command, *json_flag], cwd=ROOT, env=environment_of(step, dry_run),
                                 stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            status = "ok" if child.wait(timeout=cap_s) == 0 else f"failed (exit {child.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = f"timed out at {cap_s} s"
    record = dict(name=step.name, what=step.what, command=" ".join(["python", *command]), cap_s=cap_s,
                  seconds=round(time.monotonic() - start, 1), status=status, output=log.read_text(errors="replace"))
    if status == "ok" and report.exists():
        record["result"] = json.loads(report.read_text())
    return record


def gpus() -> list[str]:
    """'name, driver, memory' of each GPU that nvidia-smi lists; none where it is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return []
    listing = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    return listing.stdout.strip().splitlines() if listing.returncode == 0 else []


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """HEAD's short hash, with a '+' when tracked files have changed since."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout here: pass --commit)"


def environment(args: argparse.Namespace) -> dict:
    found = gpus()
    return dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=args.commit or git_commit(),
        device="cpu (dry run)" if args.dry_run else "; ".join(found) or "no GPU found",
        driver=found[0].split(", ")[1] if found else "none", torch=package_version("torch"),
        triton=package_version("triton"), python=platform.python_version(),
    )


def markdown(env: dict, records: list[dict], total_s: float) -> str:
    lines = ["# GPU check", "", *(f"- {key}: {value}" for key, value in env.items()),
             f"- total: {total_s:.0f} s (budget {BUDGET_S} s)", "", *steps_table(records), ""]
    for record in records:
        lines += [f"## {record['name']}: {record['status']}, {record['seconds']:.0f} s of {record['cap_s']} s", "",
                  f"`{record['command']}`", "", *output_as_markdown(record["output"].splitlines()[-SUMMARY_LINES:])]
    return "\n".join(lines)


def steps_table(records: list[dict]) -> list[str]:
    rows = [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['cap_s']} | {r['what']} |" for r in records]
    return ["| step | status | seconds | cap s | what |", "|---|---|---|---|---|", *rows]


def output_as_markdown(lines: list[str]) -> list[str]:
    """The benchmarks' markdown tables as they are; the other lines, blank ones left out, fenced
    as text."""
    blocks = []
    for is_table, group in itertools.groupby(lines, key=lambda line: line.startswith("|")):
        if is_table:
            blocks += [*group, ""]
        elif text := [line for line in group if line.strip()]:
            blocks += ["```text", *text, "```", ""]
    return blocks


def write_reports(out: Path, env: dict, records: list[dict], total_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.log").write_text("".join(
        f"===== {r['name']}: {r['status']} after {r['seconds']} s: {r['command']}\n{r['output']}\n" for r in records
    ))
    steps = [{key: value for key, value in r.items() if key != "output"} for r in records]
    (out / "gpu-check.json").write_text(json.dumps(
        dict(environment=env, budget_s=BUDGET_S, total_s=round(total_s, 1), steps=steps), indent=1))
    (out / "gpu-check.md").write_text(markdown(env, records, total_s))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    env = environment(args)
    print(" | ".join(f"{key}: {value}" for key, value in env.items()), flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            record = run_step(step, args.dry_run, Path(scratch))
            records.append(record)
            print(f"{step.name}: {record['status']} ({record['seconds']:.0f} s of {record['cap_s']} s)", flush=True)
            # After every step, so that what ran is on record even if the whole run is stopped.
            write_reports(args.out, env, records, time.monotonic() - start)
    print("\n".join(["", *steps_table(records), "",
                     f"total: {time.monotonic() - start:.0f} s (budget {BUDGET_S} s); reports in {args.out}"]))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`kvserve bench tp`: what tensor parallelism adds to each engine step (the plan sent to every
rank, the all-reduces, the sampled tokens coming back) against the in-process engine."""

import argparse
import gc
import random
import time
from typing import TYPE_CHECKING

import torch

from kvserve.cluster.bench.kernels import resolve_device, run_info, write_json
from kvserve.workers.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.workers.llm import LLM


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=2, help="worker actors to compare against the in-process tp 1")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def decode_step_time(llm: "LLM", batch: int, prompt_len: int, steps: int) -> float:
    """Mean seconds of one decode step of `batch` sequences, prefill and warm-up excluded."""
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"bench-{i}", [rng.randrange(3, engine.vocab_size) for _ in range(prompt_len)], params)
    while any(seq.num_output_tokens < 2 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed / steps


def release_device_memory(device: torch.device) -> None:
    """Hands the memory of an engine that is gone back to the GPU: the next engine sizes its KV
    pool from what the GPU has free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(args: argparse.Namespace, model: str, options: dict) -> int:
    """The in-process engine against the same engine on `--tp` worker actors; with `--tp 1`
    (one GPU) what remains is the cost of the plan's trip to the rank and the tokens' return."""
    import ray

    # The caller's Ray if it has one; else one of its own (a plain `ray.init()` would join one
    # that `ray start` left on this machine), shut down after.
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    device = resolve_device(options.get("device", "auto"))
    try:
        step_ms = placement_step_times(args, model, options, device)
    finally:
        if owns_ray:
            ray.shutdown()
    in_process, workers = step_ms.values()
    added = workers - in_process
    print(f"worker actors at tp {args.tp} add {added:+.2f} ms per step ({added / in_process:+.0%}) on this machine")
    write_json(args.json, dict(run_info(args, device), model=model, step_ms=step_ms, added_ms=added))
    return 0


def placement_step_times(args: argparse.Namespace, model: str, options: dict, device: torch.device) -> dict[str, float]:
    """Milliseconds per decode step of the in-process engine and of the one on worker actors."""
    from kvserve.workers.llm import LLM

    runs = {"in-process, tp 1": {}, f"worker actors, tp {args.tp}": {"distributed_executor_backend": "ray",
                                                                     "tp_size": args.tp}}
    step_ms = {}
    for label, placement in runs.items():
        llm = LLM(model, **options, **placement)
        step_ms[label] = decode_step_time(llm, args.batch, args.prompt_len, args.steps) * 1e3
        llm.engine.shutdown()
        del llm
        release_device_memory(device)
        print(f"{label}: {step_ms[label]:.2f} ms per decode step ({args.batch} sequences)", flush=True)
    return step_ms

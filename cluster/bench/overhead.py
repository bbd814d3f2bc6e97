"""`kvserve bench overhead`: the engine's host time per decode step, phase by phase.

Every sequence decodes (prompts done, caches warm); each step is split into the phases the
engine's `StepClock` laps: schedule, inputs, forward, sampling, outputs (the step loop's token
bookkeeping), detokenize (text, stop strings, output objects: the output processor, which the
Serve replica runs on its event loop while the next step runs) and events (taking the KV
events). Host time is everything but the forward pass and detokenize, the phases timed with steps run one
after the other; on a GPU the forward and sampling laps wait for the device. "step" is then
the wall time of a step as a replica's engine thread runs it (outputs processed elsewhere,
async scheduling as configured: on for CUDA), and "step / forward" how much the host adds
to the forward pass.
"""

import argparse
import random
import time

import torch

from kvserve.cluster.bench.decode import SHAPES, random_model_run
from kvserve.cluster.bench.kernels import add_engine_run_flags, parse_sizes, print_table, write_json
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.step_clock import StepClock

BLOCK_SIZE = 16
PROMPT_LEN = 16
HOST_PHASES = ("schedule", "inputs", "sampling", "outputs", "events")
PHASES = ("schedule", "inputs", "forward", "sampling", "outputs", "detokenize", "events")

# name -> (sampling settings, samples per request)
MODES = {
    "greedy": (dict(temperature=0.0), 1),
    "temperature": (dict(temperature=0.8), 1),
    "top-p": (dict(temperature=0.8, top_p=0.95), 1),
    "top-p-seeded": (dict(temperature=0.8, top_p=0.95, seed=0), 1),
    "top-k-top-p": (dict(temperature=0.8, top_k=50, top_p=0.95), 1),
    "penalties": (dict(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5), 1),
    "logprobs": (dict(temperature=0.0, logprobs=5), 1),
    "n4": (dict(temperature=0.8, top_p=0.95), 4),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), default="host-overhead",
                        help="model shape, random weights (default: %(default)s, whose forward costs next to nothing)")
    parser.add_argument("--batches", type=parse_sizes, default="256", help="sequences decoding together")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per case")
    parser.add_argument("--warmup", type=int, default=10, help="decode steps run before timing")
    add_engine_run_flags(parser)


def main(args: argparse.Namespace) -> int:
    rows = []
    with random_model_run(args) as (model_dir, device, info):
        for batch in args.batches:
            llm = _engine(model_dir, batch, args, device)
            rows += [measure(llm, batch, mode, args, _sync(device)) for mode in args.modes]
            llm.engine.shutdown()
    print_table({"mode": "{mode}", "seqs": "{batch}", "host ms": "{host_ms:.3f}",
                 **{f"{phase} ms": f"{{{phase}_ms:.3f}}" for phase in HOST_PHASES},
                 "detokenize ms": "{detokenize_ms:.3f}", "forward ms": "{forward_ms:.3f}",
                 "step ms": "{step_ms:.3f}", "step / forward": "{step_vs_forward:.3f}"}, rows)
    write_json(args.json, dict(info, steps=args.steps, overhead=rows))
    return 0


def _engine(model_dir: str, batch: int, args, device: torch.device):
    from kvserve.workers.llm import LLM

    max_len = PROMPT_LEN + args.warmup + 2 * args.steps + 8
    blocks_per_seq = -(-max_len // BLOCK_SIZE) + 1
    return LLM(model_dir, device=device.type, dtype=args.dtype, load_format="dummy", max_model_len=max_len,
               block_size=BLOCK_SIZE, max_num_seqs=batch, max_num_batched_tokens=max(batch * PROMPT_LEN, 2048),
               num_kv_blocks=batch * blocks_per_seq, enforce_eager=False)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def measure(llm, batch: int, mode: str, args, sync) -> dict:
    """Mean ms per decode step of each phase, over `args.steps` steps of `batch` sequences."""
    engine = llm.engine
    settings, n = MODES[mode]
    rng = random.Random(0)
    max_tokens = args.warmup + 2 * args.steps + 4  # the phases' steps, then the whole steps'
    for i in range(batch // n):
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True,
                                **{**settings, **({"seed": i} if "seed" in settings else {})})
        engine.add_request(f"{mode}-{i}", [rng.randrange(3, engine.vocab_size) for _ in range(PROMPT_LEN)], params)
    while engine.scheduler.waiting or any(seq.num_output_tokens < 2 for seq in engine.scheduler.running):
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    per_step = _phases(engine, args.steps, sync)
    host = sum(per_step[f"{phase}_ms"] for phase in HOST_PHASES)
    row = dict(mode=mode, batch=batch, host_ms=host, **per_step, step_ms=_step_time(engine, args.steps, sync) * 1e3)
    row["step_vs_forward"] = row["step_ms"] / row["forward_ms"]
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    engine.take_kv_events()
    print(f"{mode}, {batch} sequences: host {host:.3f} ms per step (+ detokenize {row['detokenize_ms']:.3f}, "
          f"forward {row['forward_ms']:.3f}); a whole step {row['step_ms']:.3f} ms", flush=True)
    return row


def _phases(engine, steps: int, sync) -> dict[str, float]:
    """Mean ms per step of each phase, the steps run one after the other (no overlap), so that
    each phase's time is its own."""
    overlaps, engine.overlaps_steps = engine.overlaps_steps, False
    engine.step_tokens()  # reads the step still in flight, if any
    clock = StepClock(sync)
    engine.clock = engine.runner.clock = clock
    for _ in range(steps):
        clock.start()
        engine.step()
        engine.take_kv_events()
        clock.lap("events")
    engine.clock = engine.runner.clock = None
    engine.overlaps_steps = overlaps
    return {f"{phase}_ms": clock.totals[phase] / steps * 1e3 for phase in PHASES}


def _step_time(engine, steps: int, sync) -> float:
    """Mean seconds of a step as the Serve replica's engine thread runs it: the step loop and
    the KV events, async scheduling as configured, outputs processed elsewhere."""
    engine.step_tokens()
    if sync is not None:
        sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step_tokens()
        engine.take_kv_events()
    if sync is not None:
        sync()
    return (time.perf_counter() - start) / steps

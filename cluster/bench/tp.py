"""`kvserve bench tp`: what tensor parallelism adds to each engine step (the plan sent to every
rank, the all-reduces, the sampled tokens coming back) against the in-process engine."""

import argparse
import random
import time
from typing import TYPE_CHECKING

from kvserve.workers.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvserve.workers.llm import LLM


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=2, help="worker actors to compare against the in-process tp 1")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")


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


def main(args: argparse.Namespace, model: str, options: dict) -> int:
    """The in-process engine against the same engine on `--tp` worker actors; with `--tp 1`
    (one GPU) what remains is the cost of the plan's trip to the rank and the tokens' return."""
    from kvserve.workers.llm import LLM

    runs = {"in-process, tp 1": {}, f"worker actors, tp {args.tp}": {"distributed_executor_backend": "ray",
                                                                     "tp_size": args.tp}}
    times = []
    for label, placement in runs.items():
        llm = LLM(model, **options, **placement)
        times.append(decode_step_time(llm, args.batch, args.prompt_len, args.steps))
        llm.engine.shutdown()
        print(f"{label}: {times[-1] * 1e3:.2f} ms per decode step ({args.batch} sequences)", flush=True)
    added = times[1] - times[0]
    print(f"worker actors at tp {args.tp} add {added * 1e3:+.2f} ms per step ({added / times[0]:+.0%}) on this machine")
    return 0

"""`kvserve bench engine --step-points FILE`: our engine's steps, timed, for the simulator's
step-time fit (`kvserve bench sim --step-fit FILE`, cluster/bench/sim/step_time.py).

The engine is a `kvserve bench routers` replica's (`routers.replica_engine`: its model, float32
on the CPU, one torch thread, its KV pool, block size and longest sequence) unless flags say
otherwise. It runs a spread of steps: prompts alone of 16 to 2,000 tokens, prompts after a
cached prefix, decode batches of 1 to 64 sequences over short and long contexts, and decodes
with a prompt beside them. Each `LLMEngine.step()` is timed, and what it computed is read from
the batch the scheduler planned for it, counted as the simulated replica counts it
(`step_composition`)."""

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

from kvserve.cluster.bench.routers import BLOCK_SIZE, KV_BLOCKS, MAX_MODEL_LEN, replica_engine
from kvserve.cluster.bench.sim.step_time import fit_step_time, relative_errors, step_composition
from kvserve.workers.engine.kv_cache_manager import blocks_for
from kvserve.workers.engine.sampling_params import SamplingParams

PROMPTS = (16, 32, 64, 128, 256, 512, 1024, 2000)
CACHED_PREFIXES = (256, 512, 1024)
AFTER_PREFIX = (16, 64, 256)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_CONTEXTS = (16, 64, 256, 1024)
DECODE_STEPS = 6  # tokens each decoding sequence generates: a prefill step, then decode steps
MIXED = ((4, 64), (4, 512), (16, 128), (16, 1024))  # (sequences decoding, prompt tokens beside them)
MIXED_CONTEXT = 64


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step-points", metavar="FILE",
                        help="instead of the comparison: time a spread of steps of a `bench routers` replica's engine "
                        "and write them here for `bench sim --step-fit`")
    parser.add_argument("--kv-blocks", type=int, default=KV_BLOCKS,
                        help="--step-points: the KV pool, in blocks (default: %(default)s, as bench routers)")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="--step-points (default: %(default)s)")
    parser.add_argument("--step-repeats", type=int, default=3, help="--step-points: runs of the spread (default: "
                        "%(default)s)")


class StepRecorder:
    """Runs an engine step by step, timing each `step()` and reading its batch from the
    scheduler as it plans it (before the step advances the sequences)."""

    def __init__(self, engine, seed: int):
        self.engine = engine
        self.rng = random.Random(seed)
        self.points: list[dict] = []
        self.recording = False
        self._ids = itertools.count()
        self._planned: dict | None = None
        schedule = engine.scheduler.schedule

        def schedule_and_read():
            batch = schedule()
            self._planned = step_composition(batch.seqs, batch.num_new_tokens)
            return batch

        engine.scheduler.schedule = schedule_and_read

    def words(self, count: int) -> list[int]:
        return [self.rng.randrange(10, self.engine.vocab_size) for _ in range(count)]

    def add(self, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(f"step-{next(self._ids)}", prompt, params)

    def step(self) -> None:
        self._planned = None
        start = time.perf_counter()
        self.engine.step()
        elapsed = time.perf_counter() - start
        self.engine.take_kv_events()  # as a replica does after each step; not timed
        planned = self._planned
        if self.recording and planned and (planned["prefill_tokens"] or planned["decode_seqs"]):
            self.points.append({**planned, "step_s": elapsed})

    def finish(self) -> None:
        while self.engine.has_unfinished_requests():
            self.step()


def prompt_alone(run: StepRecorder, tokens: int) -> None:
    run.add(run.words(tokens), 1)
    run.finish()


def prompt_after_prefix(run: StepRecorder, cached: int, new: int) -> None:
    prefix = run.words(cached)
    run.add(prefix, 1)
    run.finish()
    run.add(prefix + run.words(new), 1)
    run.finish()


def decode_batch(run: StepRecorder, seqs: int, context: int) -> None:
    for _ in range(seqs):
        run.add(run.words(context), DECODE_STEPS)
    run.finish()


def decodes_beside_a_prompt(run: StepRecorder, seqs: int, prompt: int) -> None:
    for _ in range(seqs):
        run.add(run.words(MIXED_CONTEXT), DECODE_STEPS + 2)
    run.step()  # their prompts
    run.step()  # a decode step, so that all are decoding when the prompt comes
    run.add(run.words(prompt), 1)
    run.finish()


def spread(kv_blocks: int, block_size: int, max_model_len: int) -> list[tuple]:
    """(scenario, its arguments) for every case the engine's pool and length limit hold."""
    def fits(*lengths: int) -> bool:  # sequences of these lengths at once
        return max(lengths) < max_model_len and sum(blocks_for(n, block_size) for n in lengths) <= kv_blocks

    mixed_length = MIXED_CONTEXT + DECODE_STEPS + 2
    cases = [(prompt_alone, n) for n in PROMPTS if fits(n + 1)]
    cases += [(prompt_after_prefix, c, n) for c in CACHED_PREFIXES for n in AFTER_PREFIX if fits(c + n + 1)]
    cases += [(decode_batch, b, c) for b in DECODE_BATCHES for c in DECODE_CONTEXTS if fits(*[c + DECODE_STEPS] * b)]
    cases += [(decodes_beside_a_prompt, b, n) for b, n in MIXED if fits(*[mixed_length] * b, n + 1)]
    return cases


def measure(engine, cases: list[tuple], repeats: int, seed: int) -> list[dict]:
    run = StepRecorder(engine, seed)
    decode_batch(run, 4, 64)  # warm-up, not recorded: the first forward passes are slower
    run.recording = True
    for _ in range(repeats):
        for scenario, *arguments in cases:
            scenario(run, *arguments)
    return run.points


def main(args: argparse.Namespace, model: str | None, options: dict) -> int:
    from kvserve.cluster.bench.models import router_bench_model
    from kvserve.cluster.cli import MODEL_CACHE
    from kvserve.workers.llm import LLM

    model = model or router_bench_model(MODEL_CACHE)
    engine_options = {**replica_engine(args.kv_blocks, options.pop("max_model_len", MAX_MODEL_LEN), args.block_size),
                      **options}
    llm = LLM(model, **engine_options)
    try:
        cases = spread(args.kv_blocks, args.block_size, engine_options["max_model_len"])
        points = measure(llm.engine, cases, args.step_repeats, args.bench_seed)
    finally:
        llm.engine.shutdown()
    Path(args.step_points).write_text(json.dumps(
        {"points": points, "num_kv_blocks": args.kv_blocks, "engine": {"model": model, **engine_options}}))
    print_fit(points, args.kv_blocks)
    print(f"wrote {len(points)} steps to {args.step_points}")
    return 0


def print_fit(points: list[dict], kv_blocks: int) -> None:
    fit = fit_step_time(points, kv_blocks)
    errors = sorted(relative_errors(fit, points))
    print(f"step time = {fit.base_s * 1e3:.3f} ms + {fit.per_prefill_token_s * 1e6:.2f} us x prefill tokens "
          f"+ {fit.per_decode_seq_s * 1e6:.1f} us x decode sequences + {fit.per_context_token_s * 1e9:.1f} ns x "
          f"context tokens")
    print(f"relative error over {len(points)} steps: mean {statistics.fmean(errors):.1%}, median "
          f"{statistics.median(errors):.1%}, p90 {errors[int(0.9 * len(errors))]:.1%}, max {errors[-1]:.1%}")

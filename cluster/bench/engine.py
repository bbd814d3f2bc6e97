"""`kvserve bench engine`: the engine against Hugging Face transformers' batched `generate`
on the same model and requests, plus the scheduler's own time per step; or, with
`--step-points`, timed steps for the simulator (step_points.py)."""

import argparse
import random
import time
from dataclasses import dataclass

import torch

from kvserve.cluster.bench import step_points
from kvserve.workers.engine.kv_cache_manager import KVCacheManager
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.workers.engine.sequence import Sequence


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--sched-seqs", type=int, default=256, help="running sequences in the scheduler test")
    parser.add_argument("--bench-seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true")
    step_points.add_flags(parser)


def make_requests(count: int, prompt_len, output_len, vocab: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [
        BenchRequest(
            [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))],
            rng.randint(*output_len),
        )
        for _ in range(count)
    ]


def run_engine(model: str, options: dict, requests: list[BenchRequest]) -> tuple[float, int]:
    from kvserve.workers.llm import LLM

    llm = LLM(model, **options)
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    llm.generate([requests[0].prompt_token_ids], params[:1])  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_hf(model: str, requests: list[BenchRequest], batch_size: int) -> tuple[float, int]:
    """As a transformers user would: left-padded batches, each generating to its longest
    request; only the tokens each request asked for count as output."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    start = time.perf_counter()
    useful = 0
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        width = max(len(r.prompt_token_ids) for r in chunk)
        ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in chunk])
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in chunk])
        new = max(r.max_tokens for r in chunk)
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad,
            )
        assert out.shape[1] == width + new
        useful += sum(r.max_tokens for r in chunk)
    return time.perf_counter() - start, useful


def scheduler_step_time(num_seqs: int, prompt_len: int = 64, steps: int = 300) -> float:
    """CPU seconds per step of schedule() plus the bookkeeping of appending one token to every
    one of `num_seqs` running sequences, with blocks allocated and hashed as they fill."""
    block_size = 16
    blocks = num_seqs * ((prompt_len + steps) // block_size + 2)
    kv = KVCacheManager(blocks, block_size, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerConfig(num_seqs, 1 << 20), kv)
    params = SamplingParams(max_tokens=steps + 1)
    rng = random.Random(0)
    for i in range(num_seqs):
        scheduler.add(Sequence(f"r{i}", 0, [rng.randrange(1000) for _ in range(prompt_len)], params, float(i)))

    def one_step() -> None:
        batch = scheduler.schedule()
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            seq.token_ids.append(7)

    one_step()  # admits every prompt
    start = time.thread_time()
    for _ in range(steps):
        one_step()
    assert len(scheduler.running) == num_seqs and scheduler.num_preemptions == 0
    return (time.thread_time() - start) / steps


def main(args: argparse.Namespace, model: str, options: dict) -> int:
    from kvserve.workers.models.config import ModelConfig

    if args.step_points:  # a replica's engine of `bench routers` unless --model says
        return step_points.main(args, args.model, options)

    vocab = ModelConfig.from_pretrained_dir(model).vocab_size
    requests = make_requests(args.num_requests, args.prompt_len, args.output_len, vocab, args.bench_seed)
    print(f"model: {model}")
    print(f"requests: {len(requests)}, prompt len {args.prompt_len}, output len {args.output_len}, "
          f"torch threads {torch.get_num_threads()}")
    # First, while the process holds no model: a heap full of model objects would make the
    # garbage collector's pauses part of the number.
    step = scheduler_step_time(args.sched_seqs)
    engine_s, engine_tokens = run_engine(model, options, requests)
    engine_tps = engine_tokens / engine_s
    print(f"kvserve engine     : {engine_tokens} tokens in {engine_s:.2f} s = {engine_tps:.1f} tok/s")
    if not args.skip_hf:
        hf_s, hf_tokens = run_hf(model, requests, args.hf_batch_size)
        hf_tps = hf_tokens / hf_s
        print(f"HF generate (bs {args.hf_batch_size}): {hf_tokens} tokens in {hf_s:.2f} s = {hf_tps:.1f} tok/s")
        print(f"ratio engine / HF  : {engine_tps / hf_tps:.2f}x")
    print(f"scheduler CPU time per step at {args.sched_seqs} running sequences: {step * 1e3:.3f} ms")
    return 0

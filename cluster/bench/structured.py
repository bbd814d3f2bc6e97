"""`kvserve bench structured`: what a JSON schema costs in decode throughput.

At each batch size the same requests decode the same number of tokens twice, once free and once
under a JSON schema that cannot end before them (a long array of digits), alternating `--rounds`
times; reported are generated tokens per second of each and their ratio. The schema's grammar is
compiled before timing (the engine caches it), so the difference is the per-step work: filling
each guided row's token mask on the host, masking the logits, advancing the matchers.
"""

import argparse
import time

import torch

from kvserve.cluster.bench.decode import SHAPES, random_model_run
from kvserve.cluster.bench.kernels import add_engine_run_flags, parse_sizes, print_table, write_json
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.structured_spec import StructuredOutputSpec

PROMPT_LEN = 16


def long_digit_array(min_items: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": min_items}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="model shape, random weights")
    parser.add_argument("--batches", type=parse_sizes, default="1,16,64", help="sequences decoding together")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each sequence generates")
    parser.add_argument("--rounds", type=int, default=3, help="free and guided runs, alternating")
    add_engine_run_flags(parser)


def main(args: argparse.Namespace) -> int:
    with random_model_run(args) as (model_dir, device, info):
        llm = _engine(model_dir, max(args.batches), args, device)
        rows = [measure(llm, batch, args) for batch in args.batches]
        llm.engine.shutdown()
    print_table({"batch": "{batch}", "free tok/s": "{free_tps:.1f}", "json schema tok/s": "{guided_tps:.1f}",
                 "guided / free": "{ratio:.3f}", "mask ms per step": "{mask_ms:.3f}"}, rows)
    write_json(args.json, dict(info, tokens=args.tokens, rounds=args.rounds, structured=rows))
    return 0


def _engine(model_dir: str, batch: int, args, device: torch.device):
    from kvserve.workers.llm import LLM

    max_len = PROMPT_LEN + args.tokens + 16
    return LLM(model_dir, device=device.type, dtype=args.dtype, load_format="dummy", max_model_len=max_len,
               max_num_seqs=batch, num_kv_blocks=batch * (-(-max_len // 16) + 1))


def measure(llm, batch: int, args) -> dict:
    """Tokens per second of `batch` sequences, free and under the schema, best of the rounds."""
    prompts = [[3 + (i * 7 + j) % 200 for j in range(PROMPT_LEN)] for i in range(batch)]
    free = SamplingParams(temperature=1.0, seed=0, max_tokens=args.tokens, ignore_eos=True)
    guided = free.model_copy(update={"structured": StructuredOutputSpec(json_schema=long_digit_array(args.tokens))})
    llm.generate(prompts[:1], guided)  # compiles the grammar, warms up
    before = llm.engine.guided.timings
    best = {"free": 0.0, "guided": 0.0}
    for _ in range(args.rounds):
        for name, params in (("free", free), ("guided", guided)):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            best[name] = max(best[name], tokens / seconds)
    after = llm.engine.guided.timings
    mask_ms = (after.mask_s - before.mask_s) / max(after.masked_steps - before.masked_steps, 1) * 1e3
    row = dict(batch=batch, free_tps=best["free"], guided_tps=best["guided"],
               ratio=best["guided"] / best["free"], mask_ms=mask_ms)
    print(f"batch {batch}: free {row['free_tps']:.1f} tok/s, json schema {row['guided_tps']:.1f} tok/s", flush=True)
    return row

"""`kvserve bench spec`: decode tokens/s with and without speculative decoding (n-gram lookup,
or a draft model with `--method draft`).

At each batch size the same greedy requests decode the same number of tokens with speculation
off and on (the per-request `speculative` switch on one engine, so the model and cache are the
same), alternating `--rounds` times. The `repeating` workload repeats itself: each prompt is a
short phrase said over and over, and a random-weight model's greedy output falls into cycles of
its own, so prompt lookup finds what comes next. The `random` workload has neither: prompts of
random tokens, and outputs sampled at temperature 1 (seeded), which do not settle into cycles. With `--method draft` the draft model is `--draft-model`, or
random weights of `--draft-shape` (its own random weights keep next to none of the target's tokens:
what it measures is the cost of the draft's passes and the verification against plain decode), by
default the target's own random weights (the same folder and seed: every greedy proposal kept, the
bound of what a draft can save). Reported: tokens/s of each and their ratio, the share of
proposed tokens kept, proposed tokens kept per verification, and forward passes per output token.
"""

import argparse
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvserve.cluster.bench.decode import SHAPES, random_model_run, write_config_only_checkpoint
from kvserve.cluster.bench.kernels import add_engine_run_flags, parse_sizes, print_table, write_json
from kvserve.workers.engine.sampling_params import SamplingParams

PHRASE_LEN = 6
PROMPT_REPEATS = 4


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="model shape, random weights")
    parser.add_argument("--batches", type=parse_sizes, default="1,8", help="sequences decoding together")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each sequence generates")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--method", choices=["ngram", "draft"], default="ngram", help="how tokens are proposed")
    drafts = parser.add_mutually_exclusive_group()
    drafts.add_argument("--draft-model", help="the draft model's folder (--method draft); default: the target's")
    drafts.add_argument("--draft-shape", choices=list(SHAPES),
                        help="a random-weight draft of this shape, with the target's vocabulary (--method draft)")
    parser.add_argument("--workload", choices=["repeating", "random"], default="repeating",
                        help="prompts that repeat a phrase, decoded greedily; or random prompts, sampled")
    parser.add_argument("--rounds", type=int, default=2, help="plain and speculative runs, alternating")
    add_engine_run_flags(parser)


def main(args: argparse.Namespace) -> int:
    if args.method != "draft" and (args.draft_model or args.draft_shape):
        raise ValueError("--draft-model and --draft-shape need --method draft")
    with (random_model_run(args, num_speculative_tokens=args.k, method=args.method) as (model_dir, device, info),
          draft_model_dir(args, model_dir) as draft_dir):
        llm = _engine(model_dir, draft_dir, max(args.batches), args, device)
        rows = [measure(llm, batch, args) for batch in args.batches]
        llm.engine.shutdown()
    print_table({"batch": "{batch}", "plain tok/s": "{plain_tps:.1f}", "speculative tok/s": "{spec_tps:.1f}",
                 "spec / plain": "{ratio:.2f}", "accepted": "{acceptance:.2f}",
                 "kept per verify": "{mean_accepted:.2f}", "seq passes / token": "{passes_per_token:.2f}"}, rows)
    write_json(args.json, dict(info, tokens=args.tokens, k=args.k, method=args.method, workload=args.workload,
                               rounds=args.rounds, speculative=rows))
    return 0


@contextmanager
def draft_model_dir(args: argparse.Namespace, model_dir: str) -> Iterator[str]:
    """The draft model's folder: `--draft-model`, a config-only checkpoint of `--draft-shape`
    (random weights, like the target's), or the target's own."""
    if args.draft_shape is None:
        yield args.draft_model or model_dir
        return
    with tempfile.TemporaryDirectory(prefix=f"kvserve-draft-{args.draft_shape}-") as draft_dir:
        write_config_only_checkpoint(Path(draft_dir), args.draft_shape)
        yield draft_dir


def _engine(model_dir: str, draft_dir: str, batch: int, args, device: torch.device):
    from kvserve.workers.llm import LLM

    max_len = PHRASE_LEN * PROMPT_REPEATS + args.tokens + 16
    speculative = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 1,
                   "prompt_lookup_max": 4}
    if args.method == "draft":
        speculative = {"method": "draft", "num_speculative_tokens": args.k, "model": draft_dir}
    return LLM(model_dir, device=device.type, dtype=args.dtype, load_format="dummy", max_model_len=max_len,
               max_num_seqs=batch, num_kv_blocks=batch * (-(-max_len // 16) + 1), speculative=speculative,
               enable_prefix_caching=False)


def measure(llm, batch: int, args) -> dict:
    """Tokens per second of `batch` sequences without and with speculation, best of the rounds;
    the acceptance of the speculative runs."""
    prompts, plain = _workload(args, batch, llm.engine.vocab_size)
    speculative = [params.model_copy(update={"speculative": True}) for params in plain]
    llm.generate(prompts[:1], plain[:1])  # warms up
    before = llm.engine.stats().speculative
    best = {"plain": 0.0, "spec": 0.0}
    tokens = {}
    for _ in range(args.rounds):
        for name, params in (("plain", plain), ("spec", speculative)):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens[name] = sum(len(o.outputs[0].token_ids) for o in outputs)
            best[name] = max(best[name], tokens[name] / seconds)
    after = llm.engine.stats().speculative
    proposed, accepted = after.proposed - before.proposed, after.accepted - before.accepted
    verifications = after.verifications - before.verifications
    row = dict(batch=batch, plain_tps=best["plain"], spec_tps=best["spec"], ratio=best["spec"] / best["plain"],
               acceptance=accepted / max(proposed, 1), mean_accepted=accepted / max(verifications, 1),
               passes_per_token=1 - accepted / (tokens["spec"] * args.rounds))
    print(f"batch {batch}: plain {row['plain_tps']:.1f} tok/s, speculative {row['spec_tps']:.1f} tok/s", flush=True)
    return row


def _workload(args, batch: int, vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Each sequence's prompt and its (plain) sampling params."""
    length = PHRASE_LEN * PROMPT_REPEATS
    if args.workload == "repeating":
        prompts = [[3 + (i * 7 + j) % 200 for j in range(PHRASE_LEN)] * PROMPT_REPEATS for i in range(batch)]
        return prompts, [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, speculative=False)] * batch
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(batch)]
    return prompts, [SamplingParams(temperature=1.0, seed=i, max_tokens=args.tokens, ignore_eos=True, speculative=False)
                     for i in range(batch)]

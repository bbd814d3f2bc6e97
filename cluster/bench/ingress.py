"""`kvserve bench ingress`: the ingress's own work on a prompt before routing it (tokenizing and
hashing its blocks, `ServedModel.prepare`) and how long that holds the ingress's event loop.

The event loop of an ingress replica forwards the tokens of all its streams and makes their
routing decisions; whatever runs on it delays all of them. For each prompt length,
`--concurrent` prompts are prepared together beside a task that wakes every millisecond and
notes how late each wake-up came: how long the loop was held. Two ways, side by side: every
prompt prepared on the loop itself (`prepare_now`, as the ingress did before), and as the
ingress prepares them (`prepare`: a long prompt on a worker thread).
"""

import argparse
import asyncio
import dataclasses
import random
import string
import time

from kvserve.cluster.bench.kernels import parse_sizes, print_table, write_json

_TICK_S = 0.001


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder whose tokenizer to use (default: the built-in tiny Llama)")
    parser.add_argument("--prompt-tokens", type=parse_sizes, default="1024,8192,32768",
                        help="prompt lengths, about, in the tokenizer's tokens")
    parser.add_argument("--concurrent", type=int, default=4, help="prompts prepared together")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per length and way (after one untimed)")
    parser.add_argument("--json", help="write the rows here")


def main(args: argparse.Namespace) -> int:
    model = _served_model(args.model)
    rows = []
    for tokens in args.prompt_tokens:
        prompts = [_text(model, tokens, seed) for seed in range(args.concurrent)]
        for way in ("on the loop", "as served"):
            rows.append({"tokens": len(model.tokenizer.encode(prompts[0])), "way": way,
                         **asyncio.run(_measure(model, prompts, way, args.rounds))})
    print_table({"prompt tokens": "{tokens}", "way": "{way}", "prompts": f"{args.concurrent}",
                 "all prepared, ms": "{wall_ms:.1f}", "loop held at most, ms": "{held_ms:.2f}"}, rows)
    write_json(args.json, {"concurrent": args.concurrent, "rounds": args.rounds, "rows": rows})
    return 0


def _served_model(folder: str | None):
    from kvserve.cluster.app import ingress_settings
    from kvserve.cluster.cli import default_model
    from kvserve.cluster.config import parse_config
    from kvserve.router.served_model import ServedModel

    settings = ingress_settings(parse_config({"engine": {"model": folder or default_model()}}))
    # The model's own length limit does not matter here: prompts of any length are timed.
    return ServedModel(dataclasses.replace(settings, max_model_len=1 << 30), llm=None, llm_app="bench-ingress")


def _text(model, tokens: int, seed: int) -> str:
    """Random words, about `tokens` tokens of the model's tokenizer."""
    rng = random.Random(seed)
    words = lambda count: " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))  # noqa: E731
                                   for _ in range(count))
    sample = words(256)
    tokens_per_word = len(model.tokenizer.encode(sample)) / 256
    return words(int(tokens / tokens_per_word) + 1)


async def _measure(model, prompts: list[str], way: str, rounds: int) -> dict:
    """The mean wall time of preparing `prompts` together, and the longest the loop was held."""
    walls, held = [], []
    for round_number in range(rounds + 1):
        stop, waits = asyncio.Event(), []
        ticker = asyncio.create_task(_hand_back(stop, waits))
        await asyncio.sleep(0)
        start = time.perf_counter()
        if way == "on the loop":
            for prompt in prompts:
                model.prepare_now([prompt], None)
                await asyncio.sleep(0)  # the requests' handlers, one after the other
        else:
            await asyncio.gather(*(model.prepare([prompt], None) for prompt in prompts))
        wall = time.perf_counter() - start
        stop.set()
        await ticker
        if round_number:  # the first round warms the tokenizer and the thread pool
            walls.append(wall)
            held.append(max(waits, default=0.0))
    return {"wall_ms": 1e3 * sum(walls) / len(walls), "held_ms": 1e3 * max(held)}


async def _hand_back(stop: asyncio.Event, waits: list[float]) -> None:
    """Wake every millisecond (as a stream's next token might) and note how late each wake-up was."""
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(_TICK_S)
        waits.append(max(time.perf_counter() - before - _TICK_S, 0.0))

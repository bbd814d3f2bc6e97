"""What a run comes to: one record per policy x workload x rate x replicas x ingress, as
markdown tables, PNG plots of TTFT p90 against the rate, and JSON."""

import json
from itertools import groupby
from pathlib import Path

import numpy as np

COLUMNS = (
    ("rate", "rate (req/s)", "{:g}"),
    ("policy", "policy", "{}"),
    ("hit_rate", "hit rate", "{:.1%}"),
    ("oracle_hit_rate", "oracle", "{:.1%}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p90_s", "TTFT p90 (s)", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("tpot_p50_s", "TPOT p50 (ms)", "{:.1f}"),
    ("throughput_tok_s", "output tok/s", "{:.0f}"),
    ("goodput_req_s", "goodput (req/s)", "{:.2f}"),
    ("refused", "refused", "{}"),
    ("decision_p99_ms", "decision p99 (ms)", "{:.2f}"),
)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(jobs, slo_ttft_s: float, slo_tpot_s: float | None) -> dict:
    """Hit rate over the prompt tokens of served requests; latencies of served requests;
    throughput per second from the first arrival to the last finish; goodput, the requests
    within the SLO per second of offered load (first to last arrival), and their share of all
    requests (refused ones count against both). Over the arrival window, not to the last
    finish: below saturation every policy that meets the SLO serves the offered rate, and
    the time the last answers take to drain says nothing about the routing. And the routing
    decision's own wall time (its router's last ranking of each request), p50 and p99 in ms."""
    served = [j for j in jobs if j.finish_s is not None]
    ttft = [j.first_token_s - j.arrival_s for j in served]
    tpot = [(j.finish_s - j.first_token_s) / (j.item.output_length - 1) for j in served if j.item.output_length > 1]
    prompt_tokens = sum(j.item.input_length for j in served)
    start = min((j.arrival_s for j in jobs), default=0.0)
    span = max((j.finish_s for j in served), default=start) - start
    window = (max((j.arrival_s for j in jobs), default=start) - start) or span  # one arrival: its span
    decisions = [j.decision_s * 1e3 for j in jobs if j.decision_s is not None]
    good = sum(1 for j, t in zip(served, ttft) if t <= slo_ttft_s and (
        slo_tpot_s is None or j.item.output_length < 2
        or (j.finish_s - j.first_token_s) / (j.item.output_length - 1) <= slo_tpot_s))
    return {
        "requests": len(jobs),
        "served": len(served),
        "refused": sum(1 for j in jobs if j.refused is not None),
        "hit_rate": sum(j.cached_tokens for j in served) / prompt_tokens if prompt_tokens else 0.0,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p90_s": _percentile(ttft, 90),
        "ttft_p99_s": _percentile(ttft, 99),
        "tpot_p50_s": _percentile(tpot, 50),
        "tpot_p90_s": _percentile(tpot, 90),
        "throughput_tok_s": sum(j.item.output_length for j in served) / span if span > 0 else 0.0,
        "goodput_req_s": good / window if window > 0 else 0.0,
        "slo_attainment": good / len(jobs) if jobs else 0.0,
        "sim_span_s": span,
        "decision_p50_ms": _percentile(decisions, 50),
        "decision_p99_ms": _percentile(decisions, 99),
    }


def _setting(record: dict) -> tuple:
    return (record["workload"], record["replicas"], record["ingress"])


def markdown(records: list[dict]) -> str:
    """One table per workload x replicas x ingress, rows by rate then policy; the heading
    names a warm-up left out (`--warmup-s`)."""
    out = []
    for (workload, replicas, ingress), group in groupby(sorted(records, key=_setting), key=_setting):
        group = list(group)
        warmup = group[0]["warmup_s"]
        after = f", requests after the first {warmup:g} s" if warmup else ""
        out.append(f"### {workload}, {replicas} replicas, {ingress} ingress router(s){after}\n")
        out.append("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for record in sorted(group, key=lambda r: (r["rate"], r["policy"])):
            out.append("| " + " | ".join(_cell(record, key, fmt) for key, _, fmt in COLUMNS) + " |")
        out.append("")
    return "\n".join(out)


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        return "-"
    if key == "tpot_p50_s":
        value *= 1000.0
    return fmt.format(value)


def plot(records: list[dict], path_prefix: str) -> list[str]:
    """One PNG per workload x replicas x ingress: TTFT p90 against the rate, a line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (workload, replicas, ingress), group in groupby(sorted(records, key=_setting), key=_setting):
        group = list(group)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for policy in sorted({r["policy"] for r in group}):
            points = sorted((r["rate"], r["ttft_p90_s"]) for r in group if r["policy"] == policy
                            and r["ttft_p90_s"] is not None)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("TTFT p90 (s)")
        ax.set_yscale("log")
        ax.set_title(f"{workload}: {replicas} replicas, {ingress} ingress")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = f"{path_prefix}-{workload}-r{replicas}-i{ingress}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_json(records: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(records, indent=1) + "\n")

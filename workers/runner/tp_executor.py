"""Tensor-parallel worker actors, and the engine-side executor that starts and drives them.

The replica's engine keeps the scheduler and the KV cache manager; each step it sends the
`StepPlan` to every rank in one call per rank. Every rank runs its shard of the forward pass;
rank 0 alone samples and answers with the tokens. With LoRA the executor decides which adapter
goes in which slot (`LoRASlots`) and sends the step's slot loads with the plan, whose
`lora_slots` name each token's slot.
"""

import asyncio
import dataclasses

import ray
import torch
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.executor import SamplerOutput, StepRequest
from kvserve.workers.models.distributed import free_port, join_group
from kvserve.workers.runner.model_runner import ModelRunner
from kvserve.workers.runner.lora_slots import LoRASlots, SlotLoad, token_slots
from kvserve.workers.runner.step_inputs import InputBatch, StepPlan
from kvserve.workers.runner.rejection_sampling import DrawnProposal, drawn_proposals
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.parallel_layers import check_shardable
from kvserve.workers.runner.transfer import to_device

PLACEMENT_TIMEOUT_S = 60.0
PING_TIMEOUT_S = 10.0

class TPWorker:
    """One rank (a Ray actor): its shards of the model and of the KV cache. `ping` runs in its
    own concurrency group, so it answers while a step is running."""

    @ray.method(concurrency_group="health")
    def ping(self) -> None:
        pass

    def address(self) -> tuple[str, int]:
        """Where the group's rendezvous listens when this is rank 0."""
        return ray.util.get_node_ip_address(), free_port()

    def start(self, config: EngineConfig, rank: int, size: int, master: tuple[str, int]) -> int:
        """Join the group, load this rank's shard, allocate its KV cache; the blocks it holds."""
        tp = join_group(rank, size, *master, config.torch_device())
        self.runner = ModelRunner(config, tp)
        return self.runner.num_kv_blocks

    def execute(self, plan: StepPlan, proposals: list[DrawnProposal] = (),
                lora_loads: list[SlotLoad] = ()) -> SamplerOutput | None:
        """Rank 0's answer is the sampled tokens; the other ranks answer None. `lora_loads` go
        into their slots first."""
        for load in lora_loads:
            self.runner.lora.load(*load)
        return self.runner.run(_to_device(plan, self.runner.device), proposals)

    def forget_lora(self, name: str) -> None:
        """Drop the host copy of adapter `name`: removed, or its next load reads another folder."""
        self.runner.lora.forget(name)


def _to_device(plan: StepPlan, device: torch.device) -> StepPlan:
    """The plan as it arrived (on the CPU) with its tensors on this rank's device."""
    if device.type == "cpu":
        return plan

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, tensor.dtype, device)

    meta = plan.meta
    tensors = ("query_start_loc", "context_lens", "block_tables", "slot_mapping")
    meta = dataclasses.replace(meta, **{name: move(getattr(meta, name)) for name in tensors})
    lora_slots = None if plan.lora_slots is None else move(plan.lora_slots)
    scoring = None if plan.prompt_scoring is None else plan.prompt_scoring.to(device)
    return dataclasses.replace(plan, input_ids=move(plan.input_ids), positions=move(plan.positions), meta=meta,
                               lora_slots=lora_slots, prompt_scoring=scoring)


def placement_bundles(config: EngineConfig, replica_cpus: float, device: str) -> list[dict[str, float]]:
    """The placement group of a serving replica with `tp_size` ranks on `device`: one bundle
    per rank, the replica itself sharing bundle 0 with rank 0."""
    bundle = _rank_bundle(device, config.rank_cpus)
    first = {**bundle, "CPU": bundle.get("CPU", 0) + replica_cpus}
    return [first] + [bundle] * (config.tp_size - 1)


def _rank_bundle(device: str, rank_cpus: float) -> dict[str, float]:
    return {"GPU": 1} if device == "cuda" else {"CPU": rank_cpus}


class TPExecutor:
    """Stands in for `ModelRunner` in an engine whose model runs on worker actors (`tp_size > 1`,
    or `distributed_executor_backend: ray`): starts the ranks in the placement group of the
    process it runs in (a serving replica's, see `placement_bundles`) or, when there is none, in
    a group of its own; stops them, and removes a group of its own, if a rank fails to start or
    dies."""

    def __init__(self, config: EngineConfig):
        self.model_config = ModelConfig.from_pretrained_dir(config.model)
        check_shardable(self.model_config, config.tp_size)
        self.lora_slots = LoRASlots(config, self.model_config) if config.enable_lora else None
        if not ray.is_initialized():
            ray.init()
        max_blocks = -(-config.effective_max_model_len(self.model_config) // config.block_size)
        self.inputs = InputBatch(max_blocks, config.block_size, torch.device("cpu"))
        self.placement_group: PlacementGroup | None = None
        self.owns_placement_group = False
        self.workers: list = []
        try:
            self.num_kv_blocks = self._start(config)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig) -> int:
        device = rank_device(config)
        config = config.model_copy(update={"device": device})
        size = config.tp_size
        bundle = _rank_bundle(device, config.rank_cpus)
        self._place(size, bundle)
        actor = ray.remote(concurrency_groups={"health": 1})(TPWorker)
        self.workers = [
            actor.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
            ).remote()
            for rank in range(size)
        ]
        master = ray.get(self.workers[0].address.remote())
        starts = [w.start.remote(config, rank, size, master) for rank, w in enumerate(self.workers)]
        return min(_gather(starts, "failed to start", ValueError))

    def _place(self, size: int, bundle: dict[str, float]) -> None:
        current = get_current_placement_group()
        if current is not None:
            if len(current.bundle_specs) < size:
                raise ValueError(
                    f"this process's placement group has {len(current.bundle_specs)} bundles, "
                    f"fewer than tp_size {size}: deploy the replica with `placement_bundles`"
                )
            self.placement_group = current
            return
        self.placement_group = placement_group([bundle] * size, strategy="STRICT_PACK")
        self.owns_placement_group = True
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise ValueError(
                f"the {size} tensor-parallel ranks ({bundle} each, on one node) could not be placed "
                f"within {PLACEMENT_TIMEOUT_S:.0f} s: the cluster lacks the resources"
            )

    async def check_health(self) -> None:
        """Raise if a rank is gone or stops answering (a serving replica's health check)."""
        pings = [worker.ping.remote() for worker in self._live_workers()]
        try:
            await asyncio.wait_for(asyncio.gather(*pings), PING_TIMEOUT_S)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as error:
            raise RuntimeError(f"a tensor-parallel rank of this engine is not answering: {error!r}") from error

    def execute(self, step: StepRequest) -> SamplerOutput | None:
        rank0, *other_ranks = self._live_workers()
        plan = self.inputs.plan(step)
        loads = self._assign_lora_slots(plan, step)
        others = ray.put(dataclasses.replace(plan, rows=None, token_masks=None, pooled=[]))
        proposals = drawn_proposals(step.samples) if step.speculative else []
        refs = [rank0.execute.remote(plan, proposals, loads)]
        refs += [rank.execute.remote(others, (), loads) for rank in other_ranks]
        try:
            return _gather(refs, "failed during a step", RuntimeError)[0]
        except RuntimeError:
            self.shutdown()  # the surviving ranks are stuck in a collective
            raise

    def _assign_lora_slots(self, plan: StepPlan, step: StepRequest) -> list[SlotLoad]:
        """Sets `plan`'s slot of each token; returns the slot loads the ranks make before the step."""
        loads: list[SlotLoad] = []
        if self.lora_slots is not None:
            slots = self.lora_slots.assign([seq.lora_name for seq in step.batch.seqs],
                                           lambda slot, name, folder: loads.append((slot, name, folder)))
            plan.lora_slots = token_slots(slots, step.batch.num_new_tokens, torch.device("cpu"))
        return loads

    def add_lora(self, name: str, folder: str) -> None:
        self.lora_slots.add(name, folder)
        self._on_every_rank("forget_lora", name)

    def remove_lora(self, name: str) -> None:
        self.lora_slots.remove(name)
        self._on_every_rank("forget_lora", name)

    def resident_loras(self) -> tuple[str, ...]:
        return self.lora_slots.resident()

    def _on_every_rank(self, method: str, *args) -> None:
        refs = [getattr(worker, method).remote(*args) for worker in self._live_workers()]
        _gather(refs, f"failed in {method}", RuntimeError)

    def _live_workers(self) -> list:
        if not self.workers:
            raise RuntimeError("the tensor-parallel ranks of this engine are gone after an earlier failure")
        return self.workers

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self.owns_placement_group:
            remove_placement_group(self.placement_group)
            self.owns_placement_group = False
        self.placement_group = None


def rank_device(config: EngineConfig) -> str:
    """The ranks' device: `auto` means GPUs when the running cluster has any. Whether a node
    holds all of a replica's ranks is for the placement group (and `kvserve serve`'s preflight)
    to find out."""
    if config.device != "auto":
        return config.device
    return "cuda" if any(node["Resources"].get("GPU") for node in ray.nodes() if node["Alive"]) else "cpu"


def _gather(refs: list, failure: str, error_type: type[Exception]) -> list:
    """The ranks' results in rank order, failing as soon as any rank fails (its peers may
    otherwise wait in a collective for it)."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        rank = rank_of[ready[0]]
        try:
            results[rank] = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            raise error_type(f"tensor-parallel rank {rank} {failure}: {error}") from error
    return results

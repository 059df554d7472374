"""How a learner's weights reach the rollout engines: one path for every placement.

The learner publishes its current weights as a `Weights` handle (a tag naming the version,
and where to read it); an engine asked to generate with a handle loads it first unless it
already serves that tag (`RolloutWorker.serve`). `WeightSync` picks the transport per
placement (`rollout.weight_sync: auto`):

- `shm` (learner rank 0 and every engine on one host): rank 0 copies the gathered weights
  (ZeRO-3 included) into a shared-memory file it keeps across syncs (a JSON header, then each
  tensor's raw bytes, 64-byte aligned); the engine's vLLM extension maps the file and hands
  zero-copy views to vLLM's in-place `reload_weights`. One copy on each side. Rank 0 holds a
  lock on each file while it lives; files whose writer died (killed, no `close`) are swept.
- `object_store` (engines on other hosts): rank 0 serialises to safetensors bytes, which go
  through the Ray object store straight to each engine (never through the driver).
- `nccl` (a trial's own engines on GPUs): rank 0 broadcasts each tensor into the engines over
  an NCCL group (vLLM's StatelessProcessGroup + PyNcclCommunicator); CUDA only, its test is
  marked `gpu`.
A checkpoint directory (`Weights.of_dir`) is the fourth source: what an engine loads for a
prefix no learner of the trial holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:  # torch is imported where tensors are handled: the trial process needs none
    import torch

from stageflow.actors.group import free_address, node_address

# lazy: torch and vLLM load only in the processes that move weights (learner rank 0, vLLM's worker)

SHM_DIR = "/dev/shm"
SHM_PREFIX = "stageflow-weights-"
ALIGN = 64
ORPHAN_AGE_S = 60.0  # a file this young may be a writer's between creating and locking it
_WRITERS: dict[str, torch.Tensor] = {}  # path -> this process's shared mapping of it
_LOCKS: dict[str, int] = {}  # path -> a descriptor holding a shared flock while this process lives


@dataclass(frozen=True)
class Weights:
    """One version of a model's weights as an engine loads it.

    `tag` names the content (a prefix key, or `<owner>/v<n>` during an RL stage): an engine
    serving the tag already does nothing. Sources, first usable wins: `shm_path` (on `host`),
    `payload` ([ObjectRef] of safetensors bytes; a list so Ray passes the ref, not the bytes),
    `model_dir` (a checkpoint every node reads), `pushed` (broadcast into the engines already).
    """

    tag: str
    model_dir: str | None = None
    shm_path: str | None = None
    host: str | None = None
    payload: list | None = None
    pushed: bool = False

    @classmethod
    def of_dir(cls, model_dir: str | os.PathLike, tag: str | None = None) -> Weights:
        return cls(tag=tag or f"dir:{model_dir}", model_dir=str(model_dir))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_shared_weights(path: str, state: dict[str, torch.Tensor]) -> int:
    """Copy `state` into the shared-memory file `path` (grown or created as needed); its size."""
    import torch

    entries, offset = {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "offset": offset,
            "nbytes": nbytes,
        }
        offset = _align(offset + nbytes)
    header = json.dumps(entries).encode()
    data_start = _align(8 + len(header))
    total = data_start + offset
    buf = _WRITERS.get(path)
    if buf is None or buf.numel() != total:
        if path not in _LOCKS:  # the writer's lock: the file lives as long as this process
            sweep_orphaned_weights(os.path.dirname(path))
            _LOCKS[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(_LOCKS[path], fcntl.LOCK_SH)
        os.ftruncate(_LOCKS[path], total)
        buf = _WRITERS[path] = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    buf[:8] = torch.tensor([len(header)], dtype=torch.int64).view(torch.uint8)
    buf[8 : 8 + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    for name, tensor in state.items():
        entry = entries[name]
        start = data_start + entry["offset"]
        target = buf[start : start + entry["nbytes"]].view(tensor.dtype)
        target.copy_(tensor.detach().reshape(-1))
    return total


def read_shared_weights(path: str) -> dict[str, torch.Tensor]:
    """Zero-copy views of the tensors in a file written by `write_shared_weights`."""
    import torch

    size = os.path.getsize(path)
    buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    header_len = int(buf[:8].view(torch.int64))
    entries = json.loads(bytes(buf[8 : 8 + header_len].tolist()))
    data_start = _align(8 + header_len)
    out = {}
    for name, e in entries.items():
        start = data_start + e["offset"]
        dtype = getattr(torch, e["dtype"])
        out[name] = buf[start : start + e["nbytes"]].view(dtype).view(e["shape"])
    return out


def release_shared_weights(path: str) -> None:
    """Forget this process's mapping of `path`, drop its lock and delete the file."""
    _WRITERS.pop(path, None)
    if (fd := _LOCKS.pop(path, None)) is not None:
        os.close(fd)
    if os.path.exists(path):
        os.unlink(path)


def sweep_orphaned_weights(directory: str = SHM_DIR) -> list[str]:
    """Delete the weight files no living process holds: a writer killed (or ended without
    `WeightSync.close`) drops its lock with its process, and its file goes at the next sweep."""
    removed = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.startswith(SHM_PREFIX) or path in _LOCKS:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime > ORPHAN_AGE_S:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no writer holds it
                os.unlink(path)
                removed.append(path)
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)
    return removed


class WeightReloadExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); its methods run via collective_rpc."""

    def reload_from_bytes(self, payload: bytes) -> dict[str, float]:
        """Load a safetensors payload into the running model in place; count and timings."""
        from safetensors.torch import load

        return self._timed_reload(load, payload)

    def reload_from_shared(self, path: str) -> dict[str, float]:
        """Reload from a shared-memory weight file (zero-copy views; see weight_sync)."""
        return self._timed_reload(read_shared_weights, path)

    def _timed_reload(self, read: Any, source: Any) -> dict[str, float]:
        start = time.perf_counter()
        weights = read(source)
        parsed = time.perf_counter()
        self._reload(weights.items())
        return {
            "tensors": len(weights),
            "parse_s": parsed - start,
            "reload_s": time.perf_counter() - parsed,
        }

    def _reload(self, weights: Any) -> None:
        """vLLM's in-place reload, then the LM head of a tied-embedding model re-processed: it is
        never loaded itself (its weight is the embedding's), and on CPU it computes with a
        packed copy of its weight made at processing time, which would stay the old one."""
        self.reload_weights(weights_iterator=iter(weights))  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        head = getattr(model, "lm_head", None)
        weight = getattr(head, "weight", None)
        if weight is None or not hasattr(head, "quant_method"):
            return
        shares = [
            m
            for m in model.modules()
            if m is not head
            and getattr(m, "weight", None) is not None
            and m.weight.data_ptr() == weight.data_ptr()
        ]
        if shares:
            head.quant_method.process_weights_after_loading(head)

    def process_id(self) -> int:
        return os.getpid()

    # GPU path (NCCL broadcast from learner rank 0). Needs CUDA; not exercised on CPU machines.
    def init_weight_broadcast(self, master_address: str, master_port: int, rank: int, world: int):
        """Join the learner-rooted broadcast group as `rank` (rollout workers take ranks 1..)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(
            host=master_address, port=master_port, rank=rank, world_size=world
        )
        self._weight_comm = PyNcclCommunicator(group, device=self.device)  # type: ignore[attr-defined]

    def receive_broadcast(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]]
    ) -> int:
        """Receive every tensor broadcast by learner rank 0, then reload them in place."""
        import torch

        received = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)  # type: ignore[attr-defined]
            self._weight_comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            received.append((name, tensor))
        self._reload(received)
        return len(received)


def resolve_transport(transport: str, learner_host: str, engine_hosts: list[str], device: str):
    """The transport `auto` stands for: nccl between GPUs, shm on one host, else object_store."""
    if transport != "auto":
        return transport
    if device == "cuda":
        return "nccl"
    same_host = all(h == learner_host for h in engine_hosts)
    return "shm" if same_host and os.path.isdir(SHM_DIR) else "object_store"


class WeightSync:
    """Learner -> rollout engines. `publish()` makes the learner's current weights loadable and
    returns their `Weights`; `sync()` also has every engine load them now (timings).

    `rollout`: a `RolloutGroup` (a trial's own engines, or any group), or the shared pool's
    client; each tells its engines' `hosts()`. `close()` deletes the shared-memory file.
    """

    def __init__(self, learner: Any, rollout: Any, transport: str = "auto", owner: str = ""):
        self.learner, self.rollout = learner, rollout
        self.leader = learner.group.actors[0]
        self.learner_host = ray.get(self.leader.__ray_call__.remote(node_address))
        nccl_ok = hasattr(rollout, "actors") and learner.device == "cuda"
        device = learner.device if nccl_ok else "cpu"
        self.requested = transport
        self.transport = resolve_transport(transport, self.learner_host, rollout.hosts(), device)
        self.owner = owner or uuid.uuid4().hex[:8]
        self.path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}")
        self.paths = [self.path]  # shared-memory slots, one per version engines may still read
        self.nccl: NcclWeightSync | None = None
        self.versions = 0

    def keep_versions(self, n: int) -> None:
        """Keep the last `n` published versions readable (asynchronous RL: an engine may load
        a version while the learner publishes newer ones): `n` shared-memory slots, written in
        turn. NCCL pushes into idle engines only: `auto` takes shm or the object store instead."""
        if n > 1 and self.transport == "nccl":
            if self.requested != "auto":
                raise ValueError(
                    "rollout.weight_sync nccl pushes weights into idle engines; asynchronous RL "
                    "(max_staleness >= 1) needs shm, object_store or auto"
                )
            hosts = self.rollout.hosts()
            self.transport = resolve_transport("auto", self.learner_host, hosts, "cpu")
        self.paths += [f"{self.path}-{i}" for i in range(len(self.paths), n)]

    def publish(self, tag: str | None = None) -> Weights:
        """The learner's current weights, tagged `tag` (default: the next version of `owner`)."""
        self.versions += 1
        tag = tag or f"{self.owner}/v{self.versions}"
        if self.transport == "shm":
            path = self.paths[self.versions % len(self.paths)]
            self.learner.write_shared_weights(path)
            return Weights(tag, shm_path=path, host=self.learner_host)
        if self.transport == "nccl":
            if self.nccl is None:
                self.nccl = NcclWeightSync(self.learner, self.rollout)
            self.nccl.sync(tag)
            return Weights(tag, pushed=True)
        return Weights(tag, payload=[self.learner.weights_payload()])

    def sync(self) -> dict[str, float]:
        """Publish and have every engine load the weights now; size and timings."""
        start = time.perf_counter()
        weights = self.publish()
        gathered = time.perf_counter()
        loaded = self.rollout.serve(weights)
        done = time.perf_counter()
        slowest = max(loaded, key=lambda r: r.get("seconds", 0.0))
        return {
            "bytes": float(slowest.get("bytes", 0.0)),
            "tensors": float(slowest.get("tensors", 0.0)),
            "gather_write_s": gathered - start,  # rank 0: gather (ZeRO-3) + serialise / copy
            "transfer_reload_s": done - gathered,  # to the engines, into them
            "engine_read_s": slowest.get("parse_s", 0.0),  # in vLLM's worker: bytes -> tensors
            "engine_reload_s": slowest.get("reload_s", 0.0),  # in vLLM's worker: reload_weights
            "total_s": done - start,
        }

    def close(self) -> None:
        """Delete the shared-memory files (through learner rank 0, which holds their mapping)."""
        if self.transport == "shm":
            try:
                ray.get(self.leader.__ray_call__.remote(_release, self.paths))
            except ray.exceptions.RayActorError:  # rank 0 is gone: remove the files here
                _release(None, self.paths)


def _release(_worker: Any, paths: list[str]) -> None:
    for path in paths:
        release_shared_weights(path)
    sweep_orphaned_weights()  # and what killed writers on this host left


# ----- GPU: NCCL broadcast from learner rank 0 -----------------------------------------------
def _learner_open(worker: Any, address: str, port: int, world: int) -> None:
    """Runs in a learner rank: rank 0 joins the broadcast group as NCCL rank 0."""
    if worker.rank != 0:
        return
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world)
    worker._weight_comm = PyNcclCommunicator(group, device=worker.device)


def _learner_metadata(worker: Any) -> tuple[list[str], list[str], list[list[int]]] | None:
    state = worker.gathered_state()
    if state is None:
        return None
    names = list(state)
    return (
        names,
        [str(state[n].dtype).removeprefix("torch.") for n in names],
        [list(state[n].shape) for n in names],
    )


def _learner_broadcast(worker: Any) -> None:
    """Runs in every learner rank (ZeRO-3 gathers are collective); rank 0 sends each tensor."""
    import torch

    state = worker.gathered_state(on_device=True)
    if state is None:
        return
    for tensor in state.values():
        worker._weight_comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
    torch.cuda.synchronize()


class NcclWeightSync:
    """Learner rank 0 broadcasts weights to every engine of a `RolloutGroup` over NCCL (CUDA)."""

    def __init__(self, learner: Any, rollout: Any):
        self.learner, self.rollout = learner, rollout
        leader = learner.group.actors[0]
        address, port = ray.get(leader.__ray_call__.remote(free_address))
        world = 1 + len(rollout.actors)
        refs = [
            a.__ray_call__.remote(_learner_open, address, port, world) for a in learner.group.actors
        ]
        refs += [
            w.rpc.remote(WeightReloadExtension.init_weight_broadcast, address, port, i + 1, world)
            for i, w in enumerate(rollout.actors)
        ]
        ray.get(refs)
        metas = ray.get([a.__ray_call__.remote(_learner_metadata) for a in learner.group.actors])
        self.names, self.dtypes, self.shapes = metas[0]

    def sync(self, tag: str = "nccl") -> float:
        """Broadcast the current weights, served as `tag` afterwards; the seconds it took."""
        start = time.perf_counter()
        refs = [a.__ray_call__.remote(_learner_broadcast) for a in self.learner.group.actors]
        refs += [
            w.rpc.remote(
                WeightReloadExtension.receive_broadcast,
                self.names,
                self.dtypes,
                self.shapes,
                tag=tag,
            )
            for w in self.rollout.actors
        ]
        ray.get(refs)
        return time.perf_counter() - start

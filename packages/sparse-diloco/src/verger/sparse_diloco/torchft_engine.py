"""DiLoCo on torchft: workers (or islands) that die and rejoin without stopping the run.

Install the extra: ``pip install verger-sparse-diloco[torchft]``. Each worker k of the plan is
a torchft *replica group* (one process, or an island of R ranks under torchrun) whose
``Manager`` talks to a lighthouse. The workers train as in `DiLoCo`; at each sync:

1. ``manager.start_quorum()`` (synchronous quorum): the lighthouse admits the replica groups
   that reached the sync. A group that is behind (a restarted process, a worker that missed a
   commit) *heals*: torchft fetches the global state from a live peer (``Manager``'s
   checkpoint transport, HTTP by default) and calls `TorchFTDiLoCo.load_ft_state`: anchor,
   outer Nesterov momentum, sync counter, bytes sent, which data blocks are done, the round
   log and the next assignments. Its own local training, if any, started from an older
   anchor and is dropped.
2. Over the quorum's process group (gloo/NCCL, reconfigured by torchft when the quorum
   changes) each group all-gathers a small header (worker index, whether it contributes,
   payload bytes, the data block it trained, its sync counter) and then the contributors'
   payloads (pseudo-gradients, encoded as in `DiLoCo`; one all-gather when their sizes are
   equal, else one exact broadcast each; islands send 1/R shares as in
   `ProcessGroupTransport`). ``bytes_sent`` counts the accepted payloads, as `DiLoCo` does.
3. ``manager.should_commit()``; on success every participant applies the same outer step
   (`DiLoCo.apply_outer_step`): each coordinate is averaged over the contributors that
   trained it; a coordinate none of them trained keeps its value and its outer momentum is
   left untouched (not decayed). A failed exchange (a peer died mid-collective, a timeout)
   commits nothing: the survivors keep their local training and retry with a new quorum.

Data accounting. The data is cut into blocks: block ``(shard, b)`` is the H batches
``data.batch(shard, b * H + i)`` (worker ``shard``'s inner steps of round ``b`` in a
fault-free run, which therefore equals the simulator). The replicated state records which
blocks were applied; a contribution is accepted only for a block not yet applied, once per
sync, so no block is applied twice and a round is either applied on every survivor or on
none. Blocks are assigned at each commit to the quorum's workers (their own lowest pending
block first; a worker whose shard is done takes the lowest pending block of another shard).
A killed worker's pending blocks - the one it was training and those it never reached - are
therefore trained after it rejoins, or by idle workers, and the run ends when every block of
every shard has been applied: the same data as a fault-free run, in more syncs.

Differences from ``torchft.local_sgd.DiLoCo`` (which the tests match exactly on a fault-free
run): torchft heals a joiner with a peer's *local* model and inner optimizer and lets it
send that peer's pseudo-gradient again ("batches can be overrepresented"); here a joiner
takes the anchor and contributes only its own training. A failed commit in torchft resets
the local parameters to the last anchor (the round's training is lost); here it is kept and
retried. torchft's ``fragment_sync_delay`` (overlapped streaming) and
``fragment_update_alpha`` have no counterpart, and this engine runs ``num_fragments=1``.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from verger.core.validation import finite_number
from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.engine import BatchSource, DiLoCo, LossFn
from verger.sparse_diloco.subset import SubsetPlan
from verger.sparse_diloco.transport import (
    C10dCollectives,
    WorkerLostError,
    gather_payloads,
    sharded_gather,
)

BACKENDS = ("gloo", "nccl")
Block = tuple[int, int]  # (data shard, block index within the shard)
_HEADER = ("worker", "contributes", "nbytes", "shard", "block", "syncs")


class QuorumTimeoutError(WorkerLostError):
    """No quorum could commit a sync within ``TorchFTOptions.sync_timeout_s``."""


class DivergedError(RuntimeError):
    """Two replica groups at the same torchft step hold different global states."""


@dataclass(kw_only=True)
class TorchFTOptions:
    """How one replica group joins the run.

    ``lighthouse``: the lighthouse address (``http://host:29510``; default: the
    ``TORCHFT_LIGHTHOUSE`` environment variable). ``worker``: this group's worker index in
    the plan (its subset; default: ``REPLICA_GROUP_ID``). ``min_workers``: a sync commits only
    with at least this many replica groups in the quorum. ``timeout_s`` bounds collectives,
    ``should_commit`` and the recovery download; ``quorum_timeout_s`` how long one quorum
    request waits at the lighthouse (a joiner waits up to one round: keep it above a round's
    duration); ``sync_timeout_s`` how long a sync keeps retrying failed quorums before
    raising `QuorumTimeoutError`. A fresh run starts training once ``start_workers`` groups
    (default: all W) are in one quorum, or after ``start_timeout_s``: without this, the
    first group to start would train alone until the others arrive (a restarted group
    heals instead and does not wait). A group that finishes keeps attending quorums for up to
    ``linger_s`` until every worker was in one with it, so that a straggler (a worker that
    was too slow for a quorum while the others applied the last blocks) heals into the final
    state instead of waiting alone at the lighthouse. ``store_addr``/``store_port``: the replica group's TCPStore
    (default: ``MASTER_ADDR``/``MASTER_PORT`` under torchrun, else a store this process
    hosts). ``hostname`` is advertised to the other groups.
    """

    lighthouse: str | None = None
    worker: int | None = None
    min_workers: int = 1
    timeout_s: float = 60.0
    quorum_timeout_s: float = 600.0
    connect_timeout_s: float = 60.0
    sync_timeout_s: float = 1800.0
    backend: str = "gloo"
    store_addr: str | None = None
    store_port: int | None = None
    hostname: str | None = None
    replica_prefix: str = "sparse_diloco_worker_"
    start_workers: int | None = None
    start_timeout_s: float = 600.0
    linger_s: float = 60.0

    def __post_init__(self) -> None:
        if self.lighthouse is None:
            self.lighthouse = os.environ.get("TORCHFT_LIGHTHOUSE")
        if not self.lighthouse:
            raise ValueError(
                "lighthouse=None: pass the lighthouse address (http://host:port) or set "
                "TORCHFT_LIGHTHOUSE"
            )
        if self.worker is None and "REPLICA_GROUP_ID" in os.environ:
            self.worker = int(os.environ["REPLICA_GROUP_ID"])
        if not isinstance(self.worker, int) or isinstance(self.worker, bool) or self.worker < 0:
            raise ValueError(
                f"worker={self.worker!r} must be an int >= 0 (or set REPLICA_GROUP_ID)"
            )
        if not isinstance(self.min_workers, int) or self.min_workers < 1:
            raise ValueError(f"min_workers={self.min_workers!r} must be an int >= 1")
        if self.start_workers is not None and (
            not isinstance(self.start_workers, int) or self.start_workers < 1
        ):
            raise ValueError(f"start_workers={self.start_workers!r} must be an int >= 1 or None")
        for name in (
            "timeout_s",
            "quorum_timeout_s",
            "connect_timeout_s",
            "sync_timeout_s",
            "start_timeout_s",
        ):
            finite_number(name, getattr(self, name), above=0)
        finite_number("linger_s", self.linger_s, at_least=0)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")


@dataclass(frozen=True)
class SyncRecord:
    """One applied outer step: which workers contributed which data block."""

    sync: int
    contributions: tuple[tuple[int, int, int], ...]  # (worker, shard, block)
    participants: tuple[int, ...]


@dataclass
class _Header:
    worker: int
    contributes: bool
    nbytes: int
    block: Block
    syncs: int

    @classmethod
    def decode(cls, t: torch.Tensor) -> _Header:
        v = [int(x) for x in t.tolist()]
        return cls(v[0], bool(v[1]), v[2], (v[3], v[4]), v[5])


def assign_blocks(done: torch.Tensor, workers: Sequence[int]) -> dict[int, Block | None]:
    """The block each of ``workers`` trains next, from the applied-blocks table ``done``.

    ``done[shard, b]`` is True once block b of ``shard`` was applied. Each worker takes the
    lowest pending block of its own shard; a worker whose shard is done takes the lowest
    pending block (by block index, then shard) that nobody took. Deterministic: every
    participant of a commit computes the same table.
    """
    shards, blocks = done.shape
    pending = [(b, s) for b in range(blocks) for s in range(shards) if not bool(done[s, b])]
    taken: set[Block] = set()
    out: dict[int, Block | None] = {}
    for k in sorted(set(workers)):
        own = next(((s, b) for b, s in pending if s == k), None) if k < shards else None
        out[k] = own
        if own is not None:
            taken.add(own)
    for k in sorted(out):
        if out[k] is None:
            out[k] = next(((s, b) for b, s in pending if (s, b) not in taken), None)
            if out[k] is not None:
                taken.add(out[k])  # type: ignore[arg-type]
    return out


class _OneWorker:
    """The transport stand-in: this process trains one worker; syncs go through the quorum."""

    def __init__(self, num_workers: int, worker: int) -> None:
        self.num_workers, self.worker = num_workers, worker

    def local_workers(self) -> list[int]:
        return [self.worker]

    def exchange(self, payloads: Any, sizes: Any) -> list[torch.Tensor]:
        raise RuntimeError("TorchFTDiLoCo exchanges payloads through its torchft quorum")


class _QuorumCollectives:
    """`Collectives` over the torchft process group of the current quorum."""

    def __init__(self, pg: Any, rank: int, size: int) -> None:
        self.pg, self.rank, self.size = pg, rank, size

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        from torch.distributed.distributed_c10d import AllgatherOptions

        self.pg.allgather([outputs], [tensor], AllgatherOptions()).wait()

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        from torch.distributed.distributed_c10d import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()


class TorchFTDiLoCo(DiLoCo):
    """One replica group of a fault-tolerant DiLoCo run (see the module docstring).

    ``blocks`` (R): each worker's data shard holds R blocks of ``inner_steps`` batches; the run
    ends when all W x R blocks are applied (`finished`). ``island_group``: this replica
    group's ranks (torchrun's default group when launched with several processes per
    group); None for a one-process group. ``before_inner_step(sync, step)`` is called before
    each inner step (fault injection in tests).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: SubsetPlan,
        config: DiLoCoConfig,
        *,
        loss_fn: LossFn,
        data: BatchSource,
        options: TorchFTOptions,
        blocks: int,
        island_group: dist.ProcessGroup | None = None,
    ) -> None:
        if config.num_fragments != 1:
            raise ValueError(
                f"num_fragments={config.num_fragments}: the torchft engine syncs whole "
                "rounds (num_fragments=1); streaming DiLoCo runs on the other engines"
            )
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"blocks={blocks!r} must be a positive int")
        worker = options.worker
        assert worker is not None  # TorchFTOptions resolved it
        if worker >= config.num_workers:
            raise ValueError(
                f"worker={worker} must be in [0, {config.num_workers}) (config.num_workers)"
            )
        super().__init__(
            model,
            plan,
            config,
            loss_fn=loss_fn,
            data=data,
            transport=_OneWorker(config.num_workers, worker),  # type: ignore[arg-type]
            island_group=island_group,
        )
        self.options = options
        self.index = worker
        self.blocks = blocks
        self.done = torch.zeros(config.num_workers, blocks, dtype=torch.bool)
        self.assigned: dict[int, Block | None] = {k: (k, 0) for k in range(config.num_workers)}
        self.log: list[SyncRecord] = []
        self.heal_times: list[float] = []  # time.time() of each recovery from a peer
        self.incidents: list[tuple[float, str, str]] = []  # failed sync attempts
        self.reconnects = 0  # managers rebuilt after failures
        self._failed_commits = 0
        self.before_inner_step: Callable[[int, int], None] | None = None
        self.last_quorum: list[int] = []  # worker indices of the last completed quorum
        self._trained: tuple[Block, int] | None = None  # (block, syncs of its anchor)
        self._healed = False
        self._island = None if island_group is None else C10dCollectives(island_group)
        # NCCL moves CUDA tensors only; gloo takes CPU tensors (and copies CUDA ones)
        self._comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if options.backend == "nccl"
            else torch.device("cpu")
        )
        self._store: Any = None
        self.manager, self._pg = self._connect()

    # ---- torchft plumbing -----------------------------------------------------------------
    def _connect(self) -> tuple[Any, Any]:
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        o = self.options
        timeout = timedelta(seconds=o.timeout_s)
        group_rank, group_size = self.island_rank, self.island_size
        addr, port = o.store_addr, o.store_port
        if addr is None and "MASTER_ADDR" in os.environ:
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        hostname = o.hostname or socket.gethostname()
        if addr is None:
            if group_size > 1:
                raise ValueError("an island replica group needs store_addr/store_port")
            # a one-process replica group hosts its own store; the other groups reach it
            # through the address the lighthouse hands out, so bind it where they can
            self._store = dist.TCPStore(hostname, 0, is_master=True, wait_for_workers=False)
            addr, port = hostname, self._store.port
        pg = (ProcessGroupNCCL if o.backend == "nccl" else ProcessGroupGloo)(timeout=timeout)
        manager = Manager(
            pg=pg,
            load_state_dict=self.load_ft_state,
            state_dict=self.ft_state,
            min_replica_size=o.min_workers,
            use_async_quorum=False,
            replica_id=f"{o.replica_prefix}{self.index}",
            lighthouse_addr=o.lighthouse,
            store_addr=addr,
            store_port=port,
            rank=group_rank,
            world_size=group_size,
            hostname=hostname,
            init_sync=False,  # every group builds the same initial model from the seed
            timeout=timeout,
            quorum_timeout=timedelta(seconds=o.quorum_timeout_s),
            connect_timeout=timedelta(seconds=o.connect_timeout_s),
        )
        return manager, pg

    def shutdown(self) -> None:
        """Leave the run: stop the manager (its heartbeats) and the checkpoint server."""
        self.manager.shutdown(wait=False)

    def _force_reconfigure(self) -> None:
        # After a failed commit the next quorum may have the same members, hence the same
        # quorum id, and torchft 0.2 then keeps the process group that just failed. Forget
        # the id so that the next quorum rebuilds it.
        self.manager._quorum_id = -1

    def _reconnect(self) -> None:
        """A new Manager (and, for a one-process group, a new TCPStore), same torchft step.

        Done after a failed quorum request or repeated failed commits. A restarted
        lighthouse numbers its quorums from scratch, and a process group configured under a
        reused number finds the previous incarnation's rendezvous keys in the store (gloo
        then dials dead ports), and torchft 0.2 re-raises a failed quorum's exception from
        every later ``start_quorum``: a fresh manager and store avoid both. Island groups
        (several ranks sharing torchrun's store) cannot rebuild one rank alone; they only
        force the next reconfiguration.
        """
        if self.island_size > 1:
            self.manager._quorum_future = None  # see the docstring: torchft keeps the error
            self._force_reconfigure()
            return
        state = self.manager.state_dict()  # the torchft step decides who heals: keep it
        self.manager.shutdown(wait=False)
        self._store = None
        self.manager, self._pg = self._connect()
        self.manager.load_state_dict(state)
        self.reconnects += 1

    def ft_state(self) -> dict[str, Any]:
        """The replicated global state a healing peer downloads (called by torchft)."""
        state = self.global_state_dict()
        # the checkpoint server may read it after this returns: hand out copies
        state["outer"] = copy.deepcopy(state["outer"])
        state.update(
            done=self.done.clone(),
            assigned=dict(self.assigned),
            log=[(r.sync, r.contributions, r.participants) for r in self.log],
        )
        return state

    @torch.no_grad()
    def load_ft_state(self, state: dict[str, Any]) -> None:
        """Adopt a live peer's global state (called by torchft when this group heals)."""
        self.load_global_state_dict(state)
        self.done.copy_(state["done"])
        self.assigned = dict(state["assigned"])
        self.log = [SyncRecord(s, tuple(c), tuple(p)) for s, c, p in state["log"]]
        self._trained = None  # trained from an older anchor: never sent
        self._healed = True
        self.heal_times.append(time.time())

    # ---- the run --------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    @property
    def local_worker(self) -> Any:
        return self.workers[self.index]

    def run(
        self, *, callback: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Join the run, then train and sync until every data block is applied."""
        self.join()
        history = []
        while not self.finished:
            figures = self.round()
            history.append(figures)
            if callback is not None:
                callback(self.syncs, figures)
        self.linger()
        return history

    def join(self) -> None:
        """The first quorum: a restarted group heals here, before it trains anything.

        In a fresh run (nothing committed yet) it waits until ``options.start_workers``
        groups share a quorum, so that the groups start together.
        """
        needed = self.options.start_workers or self.config.num_workers
        deadline = time.monotonic() + self.options.start_timeout_s
        while True:
            self.sync_round()
            fresh = self.syncs == 0 and not self.heal_times
            if not fresh or len(self.last_quorum) >= needed or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def linger(self) -> None:
        """After the last block: stay until every worker shared a quorum with this group.

        A straggler that missed the final commits heals into the final state in such a
        quorum; a worker that never comes back ends the wait after ``options.linger_s``.
        """
        deadline = time.monotonic() + self.options.linger_s
        everyone = set(range(self.config.num_workers))
        while set(self.last_quorum) != everyone:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._sync_once(quorum_timeout_s=remaining)
            time.sleep(0.2)  # an idle quorum: no need to spin

    def round(self) -> dict[str, float]:
        """Train the assigned block (if any), then sync until a quorum commits."""
        losses: list[float] = []
        start = time.perf_counter()
        block = self.assigned.get(self.index)
        if block is not None and self._trained is None and not bool(self.done[block]):
            w = self.local_worker
            shard, b = block
            w.shard, w.step = shard, b * self.config.inner_steps
            for i in range(self.config.inner_steps):
                if self.before_inner_step is not None:
                    self.before_inner_step(self.syncs, i)
                losses.append(self.inner_step(w))
            self._trained = (block, self.syncs)
        train_s = time.perf_counter() - start
        self.sync_round()
        return {
            "inner_loss": sum(losses) / len(losses) if losses else math.nan,
            "bytes_sent": float(self.bytes_sent),
            "train_s": train_s,
            "round_s": time.perf_counter() - start,
        }

    def sync_round(self) -> None:
        """Quorum, exchange, commit; retried with new quorums until one completes."""
        deadline = time.monotonic() + self.options.sync_timeout_s
        while not self._sync_once():
            if time.monotonic() > deadline:
                raise QuorumTimeoutError(
                    f"worker {self.index}: no quorum committed within "
                    f"{self.options.sync_timeout_s:.0f} s (lighthouse {self.options.lighthouse})"
                )
            time.sleep(0.05)

    @torch.no_grad()
    def _sync_once(self, quorum_timeout_s: float | None = None) -> bool:
        """One attempt; True when the quorum completed (with or without contributions)."""
        self._healed = False
        timeout = None if quorum_timeout_s is None else timedelta(seconds=quorum_timeout_s)
        try:
            self.manager.start_quorum(timeout=timeout)
        except Exception as exc:  # the lighthouse is unreachable or the quorum timed out
            self._incident("quorum", exc)
            self._reconnect()
            return False
        names = self.plan.names
        rank, size = self.manager.participating_rank(), self.manager.num_participants()
        if rank is None:  # not admitted (spare): try again
            return False
        coll = _QuorumCollectives(self._pg, rank, size)
        trained = self._trained
        contributes = (
            trained is not None and trained[1] == self.syncs and not bool(self.done[trained[0]])
        )
        sizes_mine = self._sizes(names)[self.index] if contributes else 0
        block = trained[0] if contributes and trained is not None else (-1, -1)
        try:
            header = torch.tensor(
                [self.index, int(contributes), sizes_mine, block[0], block[1], self.syncs],
                dtype=torch.int64,
                device=self._comm_device,
            )
            rows = [torch.empty_like(header) for _ in range(size)]
            coll.all_gather(rows, header)
            headers = [_Header.decode(t) for t in rows]
            if {h.syncs for h in headers} != {self.syncs}:
                raise DivergedError(
                    f"worker {self.index}: the quorum's groups hold different global states "
                    f"(sync counters {sorted({h.syncs for h in headers})}) at the same "
                    "torchft step; two partitions committed separately (split brain)"
                )
            accepted = self._accept(headers)
            mine = (
                self.pseudo_gradient(self.local_worker, names).to(self._comm_device)
                if rank in accepted
                else torch.zeros(0, dtype=torch.uint8, device=self._comm_device)
            )
            sizes = [headers[q].nbytes if q in accepted else 0 for q in range(size)]
            payloads = self._gather(coll, mine, sizes)
        except DivergedError:
            raise
        except Exception as exc:  # a peer died or hung mid-collective
            self._incident("exchange", exc)
            self.manager.report_error(exc)
            accepted, headers, payloads = [], [], []
        if not accepted and not self.manager.errored():
            # nothing to apply: vote no, so that the torchft step (which decides who heals)
            # only moves when the global state does
            self.manager.report_error(RuntimeError("no pseudo-gradient to commit"))
            self.manager.should_commit()
            self._after_exchange(headers)
            return True
        if not self.manager.should_commit():
            self._incident("commit", self.manager.errored())
            self._failed_commits += 1
            if self._failed_commits >= 2:
                self._failed_commits = 0
                self._reconnect()
            else:
                self._force_reconfigure()
            return False
        self._failed_commits = 0
        contributions = {headers[q].worker: payloads[q] for q in accepted}
        self.apply_outer_step(names, contributions)
        self.bytes_sent += sum(sizes[q] for q in accepted)
        self.log.append(
            SyncRecord(
                self.syncs,
                tuple((headers[q].worker, *headers[q].block) for q in accepted),
                tuple(sorted(h.worker for h in headers)),
            )
        )
        for q in accepted:
            self.done[headers[q].block] = True
        self.syncs += 1
        self.assigned = assign_blocks(self.done, [h.worker for h in headers])
        self._after_exchange(headers)
        return True

    def _incident(self, stage: str, error: object) -> None:
        """Record a failed sync attempt (kept for reports; the run retries)."""
        text = str(error).splitlines()[0][:200] if error is not None else ""
        self.incidents.append((time.time(), stage, f"{type(error).__name__}: {text}"))

    def _after_exchange(self, headers: Sequence[_Header]) -> None:
        """Restart the local worker from the anchor (its training was sent or is stale)."""
        self.last_quorum = sorted(h.worker for h in headers)
        if headers:
            self._trained = None
            self.reset_locals(self.plan.names)

    def _accept(self, headers: Sequence[_Header]) -> list[int]:
        """Quorum ranks whose contribution counts: one per worker and per pending block.

        Every participant decides from the same headers and ``done`` table, so all apply
        the same contributions; a duplicate (two live processes claiming one worker index)
        or a block already applied is ignored.
        """
        seen_workers: set[int] = set()
        seen_blocks: set[Block] = set()
        out = []
        for q, h in enumerate(headers):
            if not h.contributes or h.worker in seen_workers:
                continue
            shard, b = h.block
            if not (0 <= shard < self.done.shape[0] and 0 <= b < self.blocks):
                continue
            if bool(self.done[shard, b]) or h.block in seen_blocks:
                continue
            expected = self._sizes(self.plan.names)[h.worker]
            if h.nbytes != expected:
                continue
            seen_workers.add(h.worker)
            seen_blocks.add(h.block)
            out.append(q)
        return out

    def _gather(
        self, coll: _QuorumCollectives, mine: torch.Tensor, sizes: list[int]
    ) -> list[torch.Tensor]:
        if self._island is None or self._island.size == 1:
            return gather_payloads(coll, mine, sizes)
        return sharded_gather(coll, self._island, mine, sizes)

    # ---- reports --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The run as this group saw it (JSON-friendly): syncs, log, blocks, heals."""
        return {
            "worker": self.index,
            "island_size": self.island_size,
            "syncs": self.syncs,
            "bytes_sent": self.bytes_sent,
            "log": [
                (r.sync, [list(c) for c in r.contributions], list(r.participants)) for r in self.log
            ],
            "blocks_done": int(self.done.sum()),
            "heal_times": list(self.heal_times),
            "incidents": list(self.incidents),
            "reconnects": self.reconnects,
        }


def contributions_by_block(log: Sequence[SyncRecord]) -> Mapping[Block, list[int]]:
    """Block -> the syncs that applied it (each must appear exactly once)."""
    out: dict[Block, list[int]] = {}
    for record in log:
        for _worker, shard, b in record.contributions:
            out.setdefault((shard, b), []).append(record.sync)
    return out


@dataclass
class RunLedger:
    """Checks of a finished run's log: contiguous syncs and every block applied once."""

    syncs: list[int] = field(default_factory=list)
    duplicates: list[Block] = field(default_factory=list)
    missing: list[Block] = field(default_factory=list)

    @classmethod
    def of(cls, log: Sequence[SyncRecord], workers: int, blocks: int) -> RunLedger:
        applied = contributions_by_block(log)
        return cls(
            syncs=[r.sync for r in log],
            duplicates=sorted(b for b, s in applied.items() if len(s) > 1),
            missing=[
                (s, b) for s in range(workers) for b in range(blocks) if (s, b) not in applied
            ],
        )

    @property
    def consistent(self) -> bool:
        return self.syncs == list(range(len(self.syncs))) and not (self.duplicates or self.missing)

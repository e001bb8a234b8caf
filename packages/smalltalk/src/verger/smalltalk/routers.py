"""Routers and the EM loop that trains them (SmallTalk LM, Alg. 1).

E small router LMs, one per expert. A random balanced split of ``em_sequences`` training
sequences starts it; each round, every router takes ``em_steps_per_round`` steps on its own
shard (loss: the next-token NLL of each sequence's prefix), then ``em_sequences`` *new*
sequences are scored by every router and assigned by
:func:`verger.smalltalk.assign.balanced_assign` with capacities that differ by at most one
(so no expert is ever empty); they are the shards of the next round. Fresh sequences each
round (the paper's rule; the training set is walked through in a fixed random order) keep a
router from holding on to sequences it has memorized. Routers never share parameters,
gradients or data: the score exchange (:mod:`verger.smalltalk.exchange`) is the only traffic
between them, and it is counted.

The loop checkpoints after every round (routers, optimizers, sampling generators, the
current assignment, history) and resumes exactly from the last complete round."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verger.core.files import atomic_write_json
from verger.core.nn import TransformerLM
from verger.core.progress import progress_bar
from verger.core.train import Checkpointer
from verger.smalltalk.assign import balanced_capacities, solve_balanced
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import SequenceSet
from verger.smalltalk.exchange import LocalExchange, ScoreExchange
from verger.smalltalk.metrics import routing_purity
from verger.smalltalk.scoring import score_matrix

ROUTERS_DIR = "routers"
HISTORY_FILE = "em_history.json"


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (``derived_seed(0, "router", 3)``), stable everywhere."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def new_model(config: Any, seed: int) -> TransformerLM:
    """A :class:`TransformerLM` initialized from ``seed`` alone (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerLM(config)


def router_dir(folder: str | Path, expert: int) -> Path:
    """Where router ``expert`` of a model folder is saved."""
    return Path(folder) / ROUTERS_DIR / f"router-{expert:02d}"


@dataclass
class EMRound:
    """One EM round: how the assignment moved and what it cost."""

    round: int
    moved_fraction: float  # of the sequences assigned before, those whose router changed
    shard_sizes: list[int]
    router_loss: dict[int, float]  # mean training loss of this process's routers
    score_per_token: float  # mean assigned prefix log-likelihood per scored token
    purity: float | None  # routing purity against the corpus domains
    assign_relative_gap: float | None  # certified gap of the balanced assignment
    exchanged_payload_bytes: int  # scores handed to the exchange this round (all routers)
    seconds: float


@dataclass
class RouterResult:
    """The trained routers of this process, the final EM assignment and the history."""

    routers: dict[int, TransformerLM]
    pool: torch.Tensor  # rows of the training set the last round assigned
    assignment: torch.Tensor  # their experts
    history: list[EMRound] = field(default_factory=list)
    exchange: dict[str, float] = field(default_factory=dict)  # ByteCounter.as_dict()
    router_tokens_trained: int = 0  # prefix tokens each router trained on
    prefix_tokens_scored: int = 0  # prefix tokens each router scored during EM


class _RouterState:
    """One router with its optimizer, warmup schedule and batch generator."""

    def __init__(self, model: TransformerLM, config: SmallTalkConfig, seed: int) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.router_lr, betas=(0.9, 0.99), weight_decay=0.1
        )
        warmup = config.router_warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.generator = torch.Generator().manual_seed(seed)

    def train_round(
        self, prefixes: torch.Tensor, steps: int, batch: int, clip: float, device: torch.device
    ) -> float:
        """``steps`` AdamW steps on random batches of ``prefixes`` ``[n, M]``; mean loss."""
        self.model.train()
        total = 0.0
        for _ in range(steps):
            idx = torch.randint(prefixes.shape[0], (batch,), generator=self.generator)
            rows = prefixes[idx].to(device).long()
            loss = self.model(rows[:, :-1], rows[:, 1:]).loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
            self.scheduler.step()
            total += float(loss.detach())
        return total / steps

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


def em_order(config: SmallTalkConfig, train: SequenceSet, seed: int) -> torch.Tensor:
    """The order in which the EM loop walks through ``train`` (round ``r`` assigns the
    ``r``-th run of ``em_sequences`` rows, wrapping around)."""
    n = len(train)
    want = n if config.em_sequences is None else min(config.em_sequences, n)
    if want < config.num_experts:
        raise ValueError(
            f"the EM loop needs at least num_experts={config.num_experts} sequences; the "
            f"training set holds {n}"
        )
    gen = torch.Generator().manual_seed(derived_seed(seed, "em-order"))
    return torch.randperm(n, generator=gen)


def em_batch(order: torch.Tensor, size: int, index: int) -> torch.Tensor:
    """Rows of the ``index``-th EM batch: ``size`` consecutive entries of ``order`` (cyclic)."""
    start = (index * size) % len(order)
    return order[(start + torch.arange(size)) % len(order)]


def initial_assignment(n: int, num_experts: int, seed: int) -> torch.Tensor:
    """A random split of ``n`` sequences into ``num_experts`` shards of balanced sizes."""
    gen = torch.Generator().manual_seed(derived_seed(seed, "em-init"))
    caps = torch.tensor(balanced_capacities(n, num_experts))
    labels = torch.repeat_interleave(torch.arange(num_experts), caps)
    return labels[torch.randperm(n, generator=gen)]


def train_routers(
    config: SmallTalkConfig,
    train: SequenceSet,
    folder: str | Path,
    *,
    vocab_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    exchange: ScoreExchange | None = None,
    resume: bool = True,
    show_progress: bool | None = None,
) -> RouterResult:
    """Run the EM loop (module docstring) and save the routers under ``<folder>/routers/``.

    ``exchange`` defaults to a :class:`LocalExchange` (all routers here); with a
    :class:`ProcessGroupExchange` each rank trains and saves only its own router, and every
    rank computes the same assignment from the gathered scores. ``resume`` continues from
    the last complete round checkpointed in ``<folder>/routers/em/``.
    """
    device = torch.device(device)
    exchange = exchange or LocalExchange(config.num_experts, score_dtype=config.score_dtype)
    if exchange.num_experts != config.num_experts:
        raise ValueError(
            f"the exchange connects {exchange.num_experts} routers, the config has "
            f"num_experts={config.num_experts}"
        )
    owned = exchange.owned()
    model_config = config.router_model(vocab_size)
    states = {
        e: _RouterState(
            new_model(model_config, derived_seed(seed, "router-init", e)).to(device),
            config,
            derived_seed(seed, "router-batches", e),
        )
        for e in owned
    }
    order = em_order(config, train, seed)
    size = len(order) if config.em_sequences is None else min(config.em_sequences, len(order))
    pool = em_batch(order, size, 0)
    assignment = initial_assignment(size, config.num_experts, seed)
    last = torch.full((len(train),), -1, dtype=torch.long)  # each sequence's latest router
    last[pool] = assignment
    capacities = balanced_capacities(size, config.num_experts)
    history: list[EMRound] = []
    tag = "" if isinstance(exchange, LocalExchange) else f"rank-{owned[0]:02d}"
    checkpointer = Checkpointer(Path(folder) / ROUTERS_DIR / "em" / tag, keep=1)
    start = 0
    if resume and checkpointer.latest_step() is not None:
        modules = nn.ModuleList([states[e].model for e in owned])
        ckpt = checkpointer.load(model=modules, map_location=device)
        extra = ckpt.extra
        if not torch.equal(extra["order"], order):
            raise ValueError(
                f"{checkpointer.directory} was written for other EM sequences (another seed, "
                "data or em_sequences): start over in a new folder"
            )
        for e in owned:
            states[e].load(extra["routers"][e])
        assignment, last = extra["assignment"], extra["last"]
        history = [EMRound(**h) for h in extra["history"]]
        for name in ("calls", "payload", "wire"):  # the traffic of the rounds already run
            getattr(exchange.counter, name).update(extra["counter"][name])
        start = ckpt.step
        pool = em_batch(order, size, start)
    bar = progress_bar(total=config.em_rounds, desc="EM rounds", enabled=show_progress)
    bar.update(start)
    try:
        for r in range(start, config.em_rounds):
            t0 = time.perf_counter()
            losses = {}
            prefixes = train.tokens[pool, : config.prefix_len]
            for e in owned:
                losses[e] = states[e].train_round(
                    prefixes[assignment == e],
                    config.em_steps_per_round,
                    config.router_batch_size,
                    1.0,
                    device,
                )
            fresh = em_batch(order, size, r + 1)  # the next round's sequences
            local = score_matrix(
                [states[e].model for e in owned],
                train.tokens[fresh, : config.prefix_len],
                config.prefix_len,
                batch_size=config.score_batch_size,
                device=device,
            )
            before = exchange.counter.total_payload
            scores = exchange.gather(local)
            result = solve_balanced(scores, capacities, method=config.assign_method)
            new = result.experts
            chosen = scores[torch.arange(len(new)), new]
            seen = last[fresh] >= 0  # assigned in an earlier round: did its router change?
            moved = float((last[fresh][seen] != new[seen]).float().mean()) if seen.any() else 1.0
            last[fresh] = new
            history.append(
                EMRound(
                    round=r + 1,
                    moved_fraction=moved,
                    shard_sizes=torch.bincount(new, minlength=config.num_experts).tolist(),
                    router_loss=losses,
                    score_per_token=float(chosen.mean()) / (config.prefix_len - 1),
                    purity=_purity(
                        new, train.domains[fresh], config.num_experts, len(train.domain_names)
                    ),
                    assign_relative_gap=result.relative_gap,
                    exchanged_payload_bytes=exchange.counter.total_payload - before,
                    seconds=time.perf_counter() - t0,
                )
            )
            pool, assignment = fresh, new
            checkpointer.save(
                r + 1,
                model=nn.ModuleList([states[e].model for e in owned]),
                extra={
                    "order": order,
                    "assignment": assignment,
                    "last": last,
                    "routers": {e: states[e].state() for e in owned},
                    "history": [dataclasses.asdict(h) for h in history],
                    "counter": {
                        "calls": dict(exchange.counter.calls),
                        "payload": dict(exchange.counter.payload),
                        "wire": dict(exchange.counter.wire),
                    },
                },
            )
            bar.update(1)
            bar.set_postfix(moved=f"{history[-1].moved_fraction:.3f}")
    finally:
        bar.close()
    for e in owned:
        states[e].model.save_pretrained(router_dir(folder, e))
    out = RouterResult(
        routers={e: states[e].model for e in owned},
        pool=pool,
        assignment=assignment,
        history=history,
        exchange=exchange.counter.as_dict(),
        router_tokens_trained=config.em_rounds
        * config.em_steps_per_round
        * config.router_batch_size
        * (config.prefix_len - 1),
        prefix_tokens_scored=config.em_rounds * size * (config.prefix_len - 1),
    )
    if owned[0] == 0:
        atomic_write_json(
            Path(folder) / ROUTERS_DIR / HISTORY_FILE,
            {
                "history": [dataclasses.asdict(h) for h in history],
                "exchange": out.exchange,
                "em_sequences": size,
                "router_tokens_trained": out.router_tokens_trained,
                "prefix_tokens_scored": out.prefix_tokens_scored,
                "seed": seed,
            },
        )
    return out


def _purity(
    experts: torch.Tensor, labels: torch.Tensor, num_experts: int, num_domains: int
) -> float | None:
    known = labels >= 0
    if not bool(known.any()):
        return None
    return routing_purity(experts[known], labels[known], num_experts, num_domains)["purity"]


def load_routers(
    folder: str | Path, num_experts: int, *, device: torch.device | str = "cpu"
) -> list[TransformerLM]:
    """The ``num_experts`` trained routers of a model folder (a clear error if one is missing)."""
    routers = []
    for e in range(num_experts):
        path = router_dir(folder, e)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"router {e} is missing ({path}): train the routers first "
                "(`python -m verger.smalltalk train-routers --out FOLDER`)"
            )
        routers.append(TransformerLM.from_pretrained(path, device=device).eval())
    return routers


def read_history(folder: str | Path) -> dict[str, Any]:
    """The EM history a model folder's ``train-routers`` wrote."""
    path = Path(folder) / ROUTERS_DIR / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the routers of {folder} are not trained")
    return json.loads(path.read_text(encoding="utf-8"))


def routers_fingerprint(folder: str | Path, num_experts: int) -> str:
    """A short hash of the routers' weight files (what a shard index was computed with)."""
    digest = hashlib.sha256()
    for e in range(num_experts):
        path = router_dir(folder, e) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"router {e} is missing ({path}): train the routers first")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]

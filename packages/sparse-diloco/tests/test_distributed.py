"""Multi-process gloo runs equal the single-process simulator; crash, then exact resume."""

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from verger.core.distributed import make_groups, run_multiprocess
from verger.core.testing import assert_close
from verger.sparse_diloco import DiLoCo, DiLoCoConfig, ProcessGroupTransport, SubsetPlan
from verger.sparse_diloco.runner import TrainSpec, distributed_main, distributed_runs, train_run
from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model


def spec(**kw):
    config = DiLoCoConfig(
        num_workers=4,
        inner_steps=4,
        inner_lr=3e-3,
        num_fragments=kw.pop("fragments", 1),
        compression_bits=kw.pop("bits", 32),
    )
    kw.setdefault("rounds", 3)
    kw.setdefault("plan", "mlp")
    return TrainSpec(task="toy", config=config, **kw)


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert_close(a[n], b[n], rtol=1e-6, name=n)


def test_simulator_equals_four_gloo_processes():
    specs = [spec(), spec(fragments=2, bits=4), spec(plan="full")]
    ranks = run_multiprocess(distributed_runs, 4, specs)  # one start-up for the three runs
    for i, s in enumerate(specs):
        sim = train_run(s)
        for r in ranks:  # the global state is the same on every worker
            assert_same_params(r[i]["params"], sim["params"])
            assert r[i]["bytes_sent"] == sim["bytes_sent"]
        assert [h["val_loss"] for h in ranks[0][i]["history"]] == pytest.approx(
            [h["val_loss"] for h in sim["history"]], rel=1e-6
        )


@pytest.mark.slow  # three sets of 4 process start-ups: ~2 min on 2 shared cores
def test_crashed_worker_fails_the_run_and_resume_loses_nothing(tmp_path):
    reference = train_run(spec())
    crashing = spec(checkpoint_dir=str(tmp_path), crash=(2, 2))
    with pytest.raises(
        Exception,
        match=r"rank\(s\) \[2\] exited without a result|WorkerLostError: worker \d: a peer left",
    ):
        run_multiprocess(distributed_main, 4, crashing)
    resumed = run_multiprocess(distributed_main, 4, spec(checkpoint_dir=str(tmp_path)))
    assert resumed[0]["resumed_from"] == 2
    assert len(resumed[0]["history"]) == 1  # only round 3 was left to do
    assert_same_params(resumed[1]["params"], reference["params"])


def test_simulated_resume_is_exact(tmp_path):
    straight = train_run(spec(rounds=4))
    train_run(spec(rounds=2, checkpoint_dir=str(tmp_path)))
    resumed = train_run(spec(rounds=4, checkpoint_dir=str(tmp_path)))
    assert resumed["resumed_from"] == 2
    assert_same_params(resumed["params"], straight["params"])
    assert resumed["bytes_sent"] == straight["bytes_sent"]
    files = sorted(p.name for p in (tmp_path / "round_000004").iterdir())
    assert files == ["global.pt", "worker_0.pt", "worker_1.pt", "worker_2.pt", "worker_3.pt"]
    assert not (tmp_path / "round_000001").exists()  # only the latest `keep` rounds stay


def test_train_spec_and_world_size_validation():
    with pytest.raises(ValueError, match="plan="):
        TrainSpec(plan="half")
    with pytest.raises(ValueError, match="rounds="):
        TrainSpec(rounds=0)
    with pytest.raises(ValueError, match="task="):
        train_run(TrainSpec(task="nope"))


def uneven_engine(transport=None):
    """2 workers on whole tensors of unequal total size (worker 1 trains the larger part)."""
    model = toy_model(depth=3)
    preds = [lambda n, p: "blocks.0" in n, lambda n, p: "blocks.0" not in n]
    plan = SubsetPlan.from_predicates(model, preds)
    config = DiLoCoConfig(num_workers=2, inner_steps=2, inner_lr=3e-3, compression_bits=8)
    return DiLoCo(model, plan, config, loss_fn=toy_loss, data=ToyData(), transport=transport)


@contextmanager
def wire_bytes(replicas=1):
    """Count the bytes this rank sends by all-gather and broadcast, per kind of link.

    A collective is "cross" when its group spans several islands (rank // replicas), else
    "intra". An all-gather sends every rank's input; a broadcast only the source's tensor.
    """
    sent = {"cross": 0, "intra": 0}
    real_all_gather, real_broadcast = dist.all_gather, dist.broadcast

    def add(tensor, group):
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        link = "cross" if len({r // replicas for r in ranks}) > 1 else "intra"
        sent[link] += tensor.numel() * tensor.element_size()

    def all_gather(outputs, tensor, group=None, **kw):
        add(tensor, group)
        return real_all_gather(outputs, tensor, group=group, **kw)

    def broadcast(tensor, src=None, group=None, **kw):
        if src == dist.get_rank():
            add(tensor, group)
        return real_broadcast(tensor, src=src, group=group, **kw)

    dist.all_gather, dist.broadcast = all_gather, broadcast
    try:
        yield sent
    finally:
        dist.all_gather, dist.broadcast = real_all_gather, real_broadcast


def params_of(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def uneven_rank():
    """Train `uneven_engine` on this rank, counting the bytes this rank transmits."""
    with wire_bytes() as sent:
        engine = uneven_engine(ProcessGroupTransport())
        engine.train(2)
    return params_of(engine), engine.bytes_sent, sent["cross"] + sent["intra"]


def test_uneven_payloads_put_exactly_the_counted_bytes_on_the_wire():
    sim = uneven_engine()
    sizes = sim._sizes(sim.plan.names)
    assert sizes[0] < sizes[1]  # padding to the longest would inflate worker 0's share
    sim.train(2)
    ranks = run_multiprocess(uneven_rank, 2)
    assert sum(wire for _, _, wire in ranks) == sim.bytes_sent == 2 * sum(sizes)
    for params, counted, _ in ranks:
        assert counted == sim.bytes_sent
        for n, p in sim.model.named_parameters():
            assert torch.equal(params[n], p.detach()), n


ISLAND_SPEC = TrainSpec(
    task="toy",
    plan="mlp",
    config=DiLoCoConfig(num_workers=2, inner_steps=4, inner_lr=3e-3),
    rounds=2,
)
# direct exchanges between 2 islands of 2 ranks: equal, unequal and odd sizes (not divisible
# by R), a worker that trains nothing, fewer bytes than ranks, nothing at all
EXCHANGE_SIZES = [(8, 8), (5, 12), (7, 7), (0, 3), (1, 0), (0, 0)]


def exchange_payload(worker, size, case):
    """Distinct, reproducible bytes for worker ``worker`` in exchange ``case``."""
    return ((torch.arange(size) * (2 * worker + 3) + 17 * case) % 256).to(torch.uint8)


def island_rank_checks(spec):
    """World 4 = 2 islands x 2 ranks: several checks in one launch, counting wire bytes."""
    with wire_bytes(replicas=2) as run_wire:
        run = distributed_main(spec)  # data-parallel islands, through the runner
    mesh = make_groups(2, 2)
    transport = ProcessGroupTransport(
        mesh.cross_island, worker=mesh.island, island_group=mesh.intra_island
    )
    # every island rank trains its worker on the whole batch: the same payload on the R ranks
    # and no gradient all-reduce, so the result must equal the simulator bit for bit
    with wire_bytes(replicas=2) as uneven_wire:
        engine = uneven_engine(transport)
        engine.train(2)
    with wire_bytes(replicas=2) as exchange_wire:
        exchanged = [
            transport.exchange(
                {mesh.island: exchange_payload(mesh.island, sizes[mesh.island], i)}, sizes
            )
            for i, sizes in enumerate(EXCHANGE_SIZES)
        ]
    return {
        "run": run,
        "run_wire": run_wire,
        "uneven": (params_of(engine), engine.bytes_sent),
        "uneven_wire": uneven_wire,
        "exchanged": exchanged,
        "exchange_wire": exchange_wire,
    }


@pytest.fixture(scope="module")
def island_ranks():
    return run_multiprocess(island_rank_checks, 4, ISLAND_SPEC)  # one start-up, three tests


def test_two_islands_of_two_ranks_equal_two_simulated_workers(island_ranks):
    """4 processes = 2 workers x 2 data-parallel ranks; the island averages its gradients."""
    sim = train_run(ISLAND_SPEC)
    for r in island_ranks:
        for n, p in sim["params"].items():
            assert_close(r["run"]["params"][n], p, rtol=1e-5, name=n)  # reduction order differs
        assert r["run"]["bytes_sent"] == sim["bytes_sent"]
    # each payload byte crosses between islands once, not once per replica
    assert sum(r["run_wire"]["cross"] for r in island_ranks) == sim["bytes_sent"]


def test_islands_send_each_payload_byte_across_once_and_match_the_simulator(island_ranks):
    sim = uneven_engine()
    sizes = sim._sizes(sim.plan.names)
    assert sizes[0] != sizes[1]
    sim.train(2)
    assert sum(r["uneven_wire"]["cross"] for r in island_ranks) == sim.bytes_sent
    for r in island_ranks:
        params, counted = r["uneven"]
        assert counted == sim.bytes_sent
        for n, p in sim.model.named_parameters():
            assert torch.equal(params[n], p.detach()), n


def test_sharded_exchange_rebuilds_odd_and_empty_payloads_in_worker_order(island_ranks):
    expected = [
        [exchange_payload(k, n, i) for k, n in enumerate(sizes)]
        for i, sizes in enumerate(EXCHANGE_SIZES)
    ]
    for r in island_ranks:
        for got, want in zip(r["exchanged"], expected, strict=True):
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.dtype == torch.uint8 and torch.equal(g, w)
    total = sum(sum(sizes) for sizes in EXCHANGE_SIZES)
    assert sum(r["exchange_wire"]["cross"] for r in island_ranks) == total


def small_spec(workers=4, fragments=1, plan="mlp", **kw):
    config = DiLoCoConfig(num_workers=workers, inner_steps=4, num_fragments=fragments)
    return TrainSpec(task="toy", config=config, plan=plan, rounds=kw.pop("rounds", 1), **kw)


@pytest.mark.parametrize(
    "changed,match",
    [
        (dict(workers=8), "num_workers=4 there, 8 here"),  # used to start afresh silently
        (dict(workers=2), "num_workers"),
        (dict(plan="full"), "another plan"),
        (dict(fragments=2), "num_fragments=1 there, 2 here"),
    ],
)
def test_resuming_another_setup_is_refused_clearly(tmp_path, changed, match):
    train_run(small_spec(checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=match):
        train_run(small_spec(rounds=2, checkpoint_dir=str(tmp_path), **changed))
    resumed = train_run(small_spec(rounds=2, checkpoint_dir=str(tmp_path)))
    assert resumed["resumed_from"] == 1  # the refused attempts wrote nothing


def test_damaged_checkpoint_file_is_named(tmp_path):
    train_run(small_spec(rounds=2, checkpoint_dir=str(tmp_path)))
    path = tmp_path / "round_000002" / "worker_1.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*worker_1\.pt"):
        train_run(small_spec(rounds=3, checkpoint_dir=str(tmp_path)))

"""The torchft engine: quorum outer steps, block accounting, peer equality with torchft's
DiLoCo, and runs that survive a SIGKILLed worker, a too-slow worker and a lighthouse restart
(gloo and a lighthouse on 127.0.0.1; every process is killed on the way out)."""

import math
import multiprocessing as mp
from dataclasses import replace

import pytest
import torch

from verger.core.testing import assert_close
from verger.sparse_diloco import DiLoCo, DiLoCoConfig, SubsetPlan
from verger.sparse_diloco.runner import TrainSpec, train_run
from verger.sparse_diloco.torchft_engine import (
    RunLedger,
    SyncRecord,
    TorchFTDiLoCo,
    TorchFTOptions,
    assign_blocks,
)
from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model

# ---- the outer step over a quorum (one process) -------------------------------------------


def trained_engine(rounds_before=1):
    """4 partial workers ("1/4 MLP", shared others) with momentum built by full syncs."""
    config = DiLoCoConfig(num_workers=4, inner_steps=3, inner_lr=3e-3)
    plan = SubsetPlan.mlp_slices(toy_model(), 4)
    engine = DiLoCo(toy_model(), plan, config, loss_fn=toy_loss, data=ToyData())
    engine.train(rounds_before)
    for w in engine.workers.values():  # local training that has not been synced yet
        for _ in range(config.inner_steps):
            engine.inner_step(w)
    return engine


def test_quorum_outer_step_averages_each_coordinate_over_its_contributors():
    """Workers 0 and 2 of 4 reach the sync: each coordinate is averaged over those of them
    that trained it; the MLP slices of workers 1 and 3 (trained by neither) keep their value
    and their outer momentum, which a plain SGD step would have decayed and applied."""
    engine = trained_engine()
    plan, c = engine.plan, engine.config
    quorum = [0, 2]
    payloads = {k: engine.pseudo_gradient(engine.workers[k], plan.names) for k in quorum}
    before = {n: p.detach().clone() for n, p in engine.anchor.items()}
    momentum = {
        n: engine.outer.state[p]["momentum_buffer"].clone() for n, p in engine.anchor.items()
    }
    locals_ = {
        k: {n: t.detach().clone() for n, t in engine.workers[k].model.state_dict().items()}
        for k in quorum
    }
    engine.apply_outer_step(plan.names, payloads)
    for n in plan.names:
        masks = {
            k: (plan.selection(k, n).mask(plan.shapes[n]) if plan.selection(k, n) else None)
            for k in quorum
        }
        m = sum(mask.float() for mask in masks.values() if mask is not None)
        m = torch.as_tensor(m, dtype=torch.float32).expand(plan.shapes[n])
        delta = sum(
            (before[n] - locals_[k][n]) * mask for k, mask in masks.items() if mask is not None
        )
        g = torch.as_tensor(delta) / m.clamp_min(1) * (m / len(quorum)).sqrt()
        buf = c.outer_momentum * momentum[n] + g
        stepped = before[n] - c.outer_lr * (g + c.outer_momentum * buf)
        want = torch.where(m > 0, stepped, before[n])
        want_buf = torch.where(m > 0, buf, momentum[n])
        assert_close(engine.anchor[n].detach(), want, rtol=1e-5, name=n)
        got_buf = engine.outer.state[engine.anchor[n]]["momentum_buffer"]
        assert_close(got_buf, want_buf, rtol=1e-5, name=f"{n} momentum")
        if bool((m == 0).any()):  # the untouched coordinates are exactly untouched
            assert torch.equal(engine.anchor[n].detach()[m == 0], before[n][m == 0])
            assert torch.equal(got_buf[m == 0], momentum[n][m == 0])
            assert not torch.equal(momentum[n][m == 0], torch.zeros_like(momentum[n][m == 0]))


def test_full_quorum_outer_step_is_the_plain_sync():
    """apply_outer_step with every worker is what DiLoCo.sync applies (bit for bit)."""
    a, b = trained_engine(), trained_engine()
    names = a.plan.names
    a.apply_outer_step(names, {k: a.pseudo_gradient(w, names) for k, w in a.workers.items()})
    b.sync(names)
    for n in names:
        assert torch.equal(a.anchor[n], b.anchor[n]), n


def test_blocks_go_to_their_owner_first_then_to_idle_workers():
    done = torch.zeros(3, 4, dtype=torch.bool)
    assert assign_blocks(done, [0, 1, 2]) == {0: (0, 0), 1: (1, 0), 2: (2, 0)}
    done[0, :] = True  # worker 0's shard is done; worker 2 is away
    done[1, :2] = True
    out = assign_blocks(done, [0, 1])
    assert out[1] == (1, 2)  # its own lowest pending block
    assert out[0] == (2, 0)  # the oldest pending block nobody took (worker 2's)
    done[:] = True
    assert assign_blocks(done, [0, 1, 2]) == {0: None, 1: None, 2: None}


def test_every_pending_block_is_taken_at_most_once():
    done = torch.zeros(4, 3, dtype=torch.bool)
    done[0] = done[1] = True
    out = assign_blocks(done, [0, 1, 2, 3])
    taken = [b for b in out.values() if b is not None]
    assert len(taken) == len(set(taken)) == 4
    assert all(not done[b] for b in taken)


def test_ledger_flags_gaps_duplicates_and_missing_blocks():
    good = [
        SyncRecord(0, ((0, 0, 0), (1, 1, 0)), (0, 1)),
        SyncRecord(1, ((0, 0, 1), (1, 1, 1)), (0, 1)),
    ]
    assert RunLedger.of(good, workers=2, blocks=2).consistent
    twice = [*good, SyncRecord(2, ((0, 0, 1),), (0, 1))]
    assert RunLedger.of(twice, workers=2, blocks=2).duplicates == [(0, 1)]
    lost = good[:1]
    assert RunLedger.of(lost, workers=2, blocks=2).missing == [(0, 1), (1, 1)]
    gap = [good[0], SyncRecord(2, ((0, 0, 1), (1, 1, 1)), (0, 1))]
    assert not RunLedger.of(gap, workers=2, blocks=2).consistent


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lighthouse=None), "lighthouse=None"),
        (dict(worker=-1), "worker=-1"),
        (dict(min_workers=0), "min_workers=0"),
        (dict(timeout_s=0), "timeout_s=0"),
        (dict(quorum_timeout_s=math.inf), "quorum_timeout_s=inf"),
        (dict(backend="mpi"), "backend='mpi'"),
        (dict(start_workers=0), "start_workers=0"),
        (dict(linger_s=-1), "linger_s=-1"),
    ],
)
def test_options_are_validated_by_name(monkeypatch, kwargs, match):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    fields = dict(lighthouse="http://127.0.0.1:1", worker=0) | kwargs
    with pytest.raises(ValueError, match=match):
        TorchFTOptions(**fields)


def test_options_read_torchrun_style_environment(monkeypatch):
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://lighthouse:29510")
    monkeypatch.setenv("REPLICA_GROUP_ID", "2")
    options = TorchFTOptions()
    assert (options.lighthouse, options.worker) == ("http://lighthouse:29510", 2)


def test_engine_refuses_streaming_and_foreign_workers_before_connecting():
    plan = SubsetPlan.full(toy_model(), 2)
    options = TorchFTOptions(lighthouse="http://127.0.0.1:1", worker=0)
    streaming = DiLoCoConfig(num_workers=2, inner_steps=4, num_fragments=2)
    with pytest.raises(ValueError, match="num_fragments=2"):
        TorchFTDiLoCo(
            toy_model(),
            plan,
            streaming,
            loss_fn=toy_loss,
            data=ToyData(),
            options=options,
            blocks=2,
        )
    config = DiLoCoConfig(num_workers=2, inner_steps=4)
    with pytest.raises(ValueError, match=r"worker=5 must be in \[0, 2\)"):
        TorchFTDiLoCo(
            toy_model(),
            plan,
            config,
            loss_fn=toy_loss,
            data=ToyData(),
            options=replace(options, worker=5),
            blocks=2,
        )
    with pytest.raises(ValueError, match="blocks=0"):
        TorchFTDiLoCo(
            toy_model(), plan, config, loss_fn=toy_loss, data=ToyData(), options=options, blocks=0
        )


# ---- replica groups on 127.0.0.1 ----------------------------------------------------------

torchft = pytest.importorskip("torchft")
from verger.sparse_diloco.torchft_launch import LocalLighthouse, run_local  # noqa: E402
from verger.sparse_diloco.torchft_reference import peer_main  # noqa: E402

FAST = dict(timeout_s=20, quorum_timeout_s=60, sync_timeout_s=180, linger_s=30)


def toy_spec(workers=3, plan="mlp", rounds=6, inner_steps=8, **kw):
    config = DiLoCoConfig(
        num_workers=workers, inner_steps=inner_steps, inner_lr=3e-3, inner_warmup=2, grad_clip=0.5
    )
    return TrainSpec(task="toy", plan=plan, config=config, rounds=rounds, **kw)


def ledger(result, spec):
    log = [SyncRecord(s, tuple(map(tuple, c)), tuple(p)) for s, c, p in result["log"]]
    return log, RunLedger.of(log, spec.config.num_workers, spec.rounds)


def assert_one_global_state(run):
    """Every group ends with the same parameters and the same round log."""
    first = run.results[0]
    for r in run.results.values():
        assert r["log"] == first["log"]
        for n, p in first["params"].items():
            assert torch.equal(r["params"][n], p), n


def assert_cleaned_up(lighthouse):
    assert lighthouse.process is not None and lighthouse.process.poll() is not None
    assert not [p for p in mp.active_children() if p.name.startswith("ForkServerProcess")]


@pytest.fixture
def lighthouse(request):
    house = LocalLighthouse(**getattr(request, "param", {}))
    house.start()
    yield house
    house.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "lighthouse", [dict(min_replicas=3, heartbeat_timeout_ms=1000)], indirect=True
)
def test_peer_equality_with_torchft_local_sgd_diloco(lighthouse):
    """Full plan, 3 replica groups: our engine on torchft equals the simulator bit for bit and
    torchft's own DiLoCo (same AdamW, Nesterov SGD, H, batches) to gloo's summation order;
    torchft's Streaming DiLoCo over our 2 fragments equals the simulator's streaming run."""
    spec = toy_spec(plan="full", rounds=3, inner_steps=4)
    run = run_local(spec, lighthouse=lighthouse, options=FAST, target=peer_main, timeout_s=500)
    lighthouse.close()
    assert_cleaned_up(lighthouse)
    sim = train_run(spec)["params"]
    streamed = train_run(replace(spec, config=replace(spec.config, num_fragments=2)))["params"]
    for r in run.results.values():
        assert r["ours"]["syncs"] == spec.rounds and r["torchft"]["inner_steps"] == 12
        for n in sim:
            assert torch.equal(r["ours"]["params"][n], sim[n]), n
            # gloo sums three pseudo-gradients in its own order: a last-bit difference
            assert_close(r["torchft"]["params"][n], sim[n], rtol=1e-6, name=n)
            assert_close(r["torchft_streaming"]["params"][n], streamed[n], rtol=1e-6, name=n)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "lighthouse", [dict(min_replicas=2, heartbeat_timeout_ms=1000)], indirect=True
)
def test_two_groups_equal_torchft_diloco_bit_for_bit(lighthouse):
    """With two groups the sum has one order: our engine and torchft's DiLoCo agree exactly."""
    spec = toy_spec(workers=2, plan="full", rounds=3, inner_steps=4)
    run = run_local(spec, lighthouse=lighthouse, options=FAST, target=peer_main, timeout_s=500)
    for r in run.results.values():
        for n, p in r["ours"]["params"].items():
            assert torch.equal(r["torchft"]["params"][n], p), n


def clean_reference(spec):
    """The uninterrupted run: the simulator (equal to a fault-free torchft run, tested above)."""
    return train_run(replace(spec, kill_at=None, stall_at=None))


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "lighthouse",
    [dict(min_replicas=2, heartbeat_timeout_ms=1000, join_timeout_ms=30_000)],
    indirect=True,
)
def test_sigkilled_worker_rejoins_and_every_block_is_applied_once(lighthouse):
    """Worker 2 of 3 SIGKILLs itself in the middle of round 3; the others go on without it,
    it is restarted, recovers the anchor and outer momentum from a live peer, trains again,
    and the run ends with every data block applied exactly once, on identical states."""
    spec = toy_spec(kill_at=(2, 3, 4))
    run = run_local(spec, lighthouse=lighthouse, options=FAST, restart_delay_s=0.5, timeout_s=500)
    lighthouse.close()
    assert_cleaned_up(lighthouse)
    assert len(run.restarts[2]) == 1 and not run.restarts[0] and not run.restarts[1]
    assert len(run.rejoin_seconds) == 1 and run.rejoin_seconds[0] > 0
    assert_one_global_state(run)
    log, check = ledger(run.results[0], spec)
    # no sync index skipped or repeated, no block applied twice, none left out
    assert check.consistent, check
    assert run.results[0]["syncs"] == len(log) >= spec.rounds
    # round 3 was applied with the two survivors' pseudo-gradients; the restarted worker
    # healed from a live peer after its restart (it ends with the same state as the others)
    assert {c[0] for c in log[3].contributions} == {0, 1}
    assert run.results[2]["heal_times"][0] >= run.restarts[2][0]
    # the killed worker's unfinished data (its block 3, killed mid-way, and the blocks it
    # never reached) was trained after all: by itself once it is back, or by the workers
    # whose own shards were done (which of the two depends on how fast it came back)
    shard_2 = sorted((c[2], c[0]) for r in log for c in r.contributions if c[1] == 2)
    assert [b for b, _ in shard_2] == list(range(spec.rounds))
    assert all(worker == 2 for b, worker in shard_2 if b < 3)
    # bound: the same blocks in another schedule; within 10% of the uninterrupted run
    clean = clean_reference(spec)["history"][-1]["val_loss"]
    assert run.results[0]["val_loss"] <= 1.10 * clean


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "lighthouse",
    [dict(min_replicas=2, heartbeat_timeout_ms=2000, join_timeout_ms=300)],
    indirect=True,
)
def test_too_slow_worker_is_left_out_then_heals(lighthouse):
    """Worker 1 stalls 1.5 s in round 2, longer than the lighthouse's join timeout (0.3 s):
    the quorum commits without it (its late training is dropped, never applied), it heals
    from a peer when it comes back, and the run still applies every block exactly once."""
    spec = toy_spec(rounds=10, stall_at=(1, 2, 1.5))
    run = run_local(spec, lighthouse=lighthouse, options=FAST, restart_delay_s=None, timeout_s=500)
    lighthouse.close()
    assert_cleaned_up(lighthouse)
    assert not any(run.restarts.values())  # nobody died: worker 1 was only slow
    assert_one_global_state(run)
    log, check = ledger(run.results[0], spec)
    assert check.consistent, check
    assert any(1 not in r.participants for r in log)  # syncs went on without it
    assert run.results[1]["heal_times"]  # and it caught up from a live peer


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "lighthouse",
    [dict(min_replicas=2, heartbeat_timeout_ms=2000, join_timeout_ms=5000)],
    indirect=True,
)
def test_run_survives_a_lighthouse_restart(lighthouse):
    """The lighthouse is SIGKILLed after sync 3 and restarted on the same port 1 s later: the
    groups retry their quorums (a request that was waiting at the dead lighthouse fails
    after quorum_timeout_s) and the run finishes with every block applied once."""
    spec = toy_spec(rounds=8)
    options = dict(FAST, quorum_timeout_s=5)
    run = run_local(
        spec,
        lighthouse=lighthouse,
        options=options,
        restart_lighthouse_after=3,
        lighthouse_down_s=1.0,
        timeout_s=500,
    )
    lighthouse.close()
    assert_cleaned_up(lighthouse)
    assert run.lighthouse_restarts == 1
    assert_one_global_state(run)
    _, check = ledger(run.results[0], spec)
    assert check.consistent, check
    clean = clean_reference(spec)["history"][-1]["val_loss"]
    assert run.results[0]["val_loss"] <= 1.10 * clean


def test_lighthouse_starts_without_importing_torch_and_restarts_on_its_port():
    """The lighthouse process (torchft's extension alone, no torch import) listens on
    127.0.0.1 and comes back on the same port after a SIGKILL."""
    import socket

    with LocalLighthouse(min_replicas=1) as house:
        port = house.port
        house.kill()
        assert house.process.returncode == -9
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
        house.start()
        assert house.port == port and house.process.poll() is None
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == 0
    assert house.process.poll() is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "lighthouse", [dict(min_replicas=2, heartbeat_timeout_ms=1000)], indirect=True
)
def test_islands_as_replica_groups_equal_the_simulated_islands(lighthouse):
    """2 replica groups x 2 ranks: each group is a data-parallel island (torchrun-style gloo
    group, the Manager on its store); replica r of each island exchanges its share of the
    payload over torchft's group r and the island rebuilds the payloads. Same result as
    two simulated workers (the island's gradient average sums in another order)."""
    spec = toy_spec(workers=2, rounds=3, inner_steps=4)
    run = run_local(spec, lighthouse=lighthouse, options=FAST, island_size=2, timeout_s=500)
    sim = train_run(spec)
    for r in run.results.values():
        assert r["island_size"] == 2
        assert r["bytes_sent"] == sim["bytes_sent"] and r["syncs"] == spec.rounds
        for n, p in sim["params"].items():
            assert_close(r["params"][n], p, rtol=1e-5, name=n)

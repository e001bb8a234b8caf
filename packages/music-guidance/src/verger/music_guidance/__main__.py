"""``python -m verger.music_guidance train|sample|continue|infill|regenerate|transition|style|demo|bench``
(console script ``verger-music-guidance``).

The command line follows the verger-core package contract (:mod:`verger.core.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.music_guidance.commands import (
    run_continue,
    run_infill,
    run_regenerate,
    run_sample,
    run_style,
    run_train,
    run_transition,
)
from verger.music_guidance.config import (
    BenchSettings,
    DemoSettings,
    SampleSettings,
    TaskSettings,
    TrainSettings,
    TransitionSettings,
)
from verger.music_guidance.experiments import run_bench, run_demo

cli = PackageCLI(
    "verger.music_guidance",
    description="verger-music-guidance: music production with audio diffusion and guidance gradients",
)
cli.command("train", run_train, settings=TrainSettings, help="train the diffusion model")
cli.command("sample", run_sample, settings=SampleSettings, help="unconditional samples")
cli.command("continue", run_continue, settings=TaskSettings, help="continue a WAV")
cli.command("infill", run_infill, settings=TaskSettings, help="fill a gap of a WAV")
cli.command("regenerate", run_regenerate, settings=TaskSettings, help="regenerate part of a WAV")
cli.command(
    "transition", run_transition, settings=TransitionSettings, help="join two WAVs smoothly"
)
cli.command("style", run_style, settings=TaskSettings, help="samples guided toward a class")
cli.command("demo", run_demo, settings=DemoSettings, help="every task with the tiny model")
cli.command("bench", run_bench, settings=BenchSettings, help="guided vs unguided, one run")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""The package contract's command line: one shape for every ``python -m verger.<name>``.

A package declares its commands once; this module parses, checks and runs them the same way
everywhere::

    # src/verger/<name>/__main__.py
    from verger.core.cli import PackageCLI
    from verger.<name>.config import DemoSettings
    from verger.<name>.demo import run_demo  # (settings, run) -> Report | dict of metrics

    cli = PackageCLI("verger.<name>", description="what the package does, in one line")
    cli.command("demo", run_demo, settings=DemoSettings, help="the paper in miniature")

    def main(argv=None) -> int:
        return cli.main(argv)

    if __name__ == "__main__":
        raise SystemExit(main())

What every command gets:

- The shared options ``--out DIR`` (the run folder, default ``runs/<name>/<command>``),
  ``--quick`` (the settings' quick preset: < 2 minutes on 2 CPU cores), ``--device``
  (``auto|cpu|cuda|cuda:N|mps``, resolved once and handed to the command as ``run.device``),
  ``--seed``, ``--threads`` (the one thread policy: :func:`verger.core.runtime.set_threads`),
  ``--resume``, ``--overwrite``, ``--debug``, ``--dry-run`` (print the resolved options and
  settings as JSON and stop), and ``--rebuild-corpus`` for commands that read the corpus.
- One flag per settings field (:mod:`verger.core.settings`): ``--quick`` picks the quick
  values, explicit flags win.
- The run folder rules (:mod:`verger.core.runs`): locked, recorded, resumed only with matching
  settings, never deleting what the run did not create, a finished run reported not rerun.
  Under torchrun, rank 0 owns the folder and the other ranks follow its decision.
- Exit codes: 0 done (the last line printed is ``wrote <out>/metrics.json``); 2 a usage error
  or a refused run folder (one line, no traceback); 1 a failure during the work (one line;
  ``--debug`` or ``VERGER_DEBUG=1`` shows the traceback); 130 interrupted (Ctrl-C); 143
  terminated (SIGTERM; ``finally`` blocks run, so worker processes are torn down).

The command function receives ``(settings, run)``; it writes everything under ``run.path(...)``,
resumes its checkpoints when ``run.resumed``, and returns a
:class:`~verger.core.bench.Report` (from ``run.report(title)``) or a dict of named metrics.
It never sees argparse.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from verger.core.bench.report import Report
from verger.core.runs import AlreadyFinished, Run, RunFolderError, RunRequest, launch_id
from verger.core.runtime import (
    Terminated,
    package_version,
    resolve_device,
    seed_everything,
    set_threads,
    sigterm_raises,
)
from verger.core.settings import Settings, SettingsError, parse_cli_value

__all__ = ["Command", "PackageCLI", "Terminated"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

CommandFn = Callable[[Any, Run], Report | Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its function, settings class, help, run subfolder and corpus flag."""

    name: str
    fn: CommandFn
    settings: type[Settings]
    help: str
    subfolder: Callable[[Any], str] | None = None
    corpus: bool = False


# --- argparse types of the shared options (a bad value is a usage error naming it) -----------


def output_folder(value: str) -> Path:
    """``--out``: a folder, created when the run starts; an existing file is refused."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a file; give a folder (created if missing)")
    return path


def device_spec(value: str) -> str:
    """``--device``: kept as given once :func:`resolve_device` accepts it on this machine."""
    try:
        resolve_device(value)
    except (ValueError, RuntimeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def seed_value(value: str) -> int:
    """``--seed``: an int in [0, 2**63) (what ``seed_everything`` takes)."""
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"{seed} must be in [0, 2**63)")
    return seed


def thread_count(value: str) -> int:
    """``--threads``: an int >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} must be >= 1")
    return number


def _field_type(tp: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_cli_value(text, tp)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names it in errors
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and one line of usage for errors (no traceback, ever)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class PackageCLI:
    """The command line of one package (see the module docstring)."""

    def __init__(self, package: str, *, description: str, distribution: str | None = None):
        if not package.startswith("verger."):
            raise ValueError(f"package={package!r} must be the import name 'verger.<name>'")
        self.package = package
        self.short = package.removeprefix("verger.").replace("_", "-")
        self.distribution = distribution or f"verger-{self.short}"
        self.description = description
        self.commands: dict[str, Command] = {}

    def command(
        self,
        name: str,
        fn: CommandFn,
        *,
        settings: type[Settings],
        help: str,
        subfolder: Callable[[Any], str] | None = None,
        corpus: bool = False,
    ) -> Command:
        """Register ``fn(settings, run)`` as ``name``.

        ``subfolder(settings)`` puts the run in ``--out/<subfolder>`` (several runs of one
        command sharing a model folder, e.g. one expert each); ``corpus=True`` adds
        ``--rebuild-corpus`` (read by the command as ``run.rebuild_corpus``).
        """
        if name in self.commands:
            raise ValueError(f"command {name!r} is registered twice")
        if not (isinstance(settings, type) and issubclass(settings, Settings)):
            raise TypeError(f"settings={settings!r} must be a Settings subclass")
        cmd = Command(name, fn, settings, help, subfolder, corpus)
        self.commands[name] = cmd
        return cmd

    # --- parsing --------------------------------------------------------------------------

    def parser(self) -> argparse.ArgumentParser:
        """The full argparse parser (for docs and tests)."""
        version = package_version(self.distribution)
        top = _Parser(
            prog=f"python -m {self.package}",
            description=self.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        top.add_argument("--version", action="version", version=f"{self.distribution} {version}")
        sub = top.add_subparsers(dest="command", required=True)
        for cmd in self.commands.values():
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
            self._shared_options(p, cmd)
            group = p.add_argument_group(f"{cmd.settings.__name__} (--quick values in help)")
            for field, tp in cmd.settings.cli_fields():
                flag = "--" + field.name.replace("_", "-")
                help_text = cmd.settings.field_help(field)
                if tp is bool:
                    group.add_argument(
                        flag,
                        dest=f"setting__{field.name}",
                        action=argparse.BooleanOptionalAction,
                        default=None,
                        help=help_text,
                    )
                else:
                    group.add_argument(
                        flag,
                        dest=f"setting__{field.name}",
                        type=_field_type(tp),
                        default=None,
                        metavar=field.name.upper(),
                        help=help_text,
                    )
        return top

    def _shared_options(self, p: argparse.ArgumentParser, cmd: Command) -> None:
        g = p.add_argument_group("shared options (every verger command)")
        default_out = Path("runs") / self.short / cmd.name
        g.add_argument(
            "--out",
            type=output_folder,
            default=default_out,
            help=f"run folder (default {default_out})",
        )
        g.add_argument("--quick", action="store_true", help="the quick preset: < 2 min on 2 CPUs")
        g.add_argument(
            "--device", type=device_spec, default="auto", help="auto | cpu | cuda | cuda:N | mps"
        )
        g.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
        g.add_argument(
            "--threads",
            type=thread_count,
            default=None,
            help="CPU threads (default $VERGER_THREADS, else torch's default)",
        )
        g.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
        g.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the run in --out (deletes only what that run created)",
        )
        g.add_argument("--debug", action="store_true", help="show tracebacks on failure")
        g.add_argument(
            "--dry-run", action="store_true", help="print the resolved options as JSON and stop"
        )
        if cmd.corpus:
            g.add_argument(
                "--rebuild-corpus", action="store_true", help="rebuild the cached corpus first"
            )

    def _settings(self, cmd: Command, args: argparse.Namespace) -> Settings:
        explicit = {
            key.removeprefix("setting__"): value
            for key, value in vars(args).items()
            if key.startswith("setting__") and value is not None
        }
        return cmd.settings.preset(quick=args.quick, **explicit)

    # --- running --------------------------------------------------------------------------

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse ``argv``, run the command, return the exit code (see the module docstring)."""
        parser = self.parser()
        args, unknown = parser.parse_known_args(argv)
        cmd = self.commands[args.command]
        sub = _subparser(parser, cmd.name)
        if unknown:  # named by the command's own usage, which lists what it takes
            sub.error(f"unrecognized arguments: {' '.join(unknown)}")
        debug = args.debug or os.environ.get("VERGER_DEBUG") == "1"
        try:
            settings = self._settings(cmd, args)
        except SettingsError as err:
            sub.error(str(err))
        device = resolve_device(args.device)
        folder = args.out / cmd.subfolder(settings) if cmd.subfolder else args.out
        if args.dry_run:
            print(
                json.dumps(
                    {
                        "package": self.package,
                        "command": cmd.name,
                        "out": str(folder),
                        "device": str(device),
                        "seed": args.seed,
                        "quick": args.quick,
                        "settings": settings.to_dict(),
                    },
                    indent=2,
                )
            )
            return 0
        rank, launch = launch_id()
        request = RunRequest(
            folder=folder,
            package=self.package,
            command=cmd.name,
            settings=settings,
            seed=args.seed,
            device=device,
            quick=args.quick,
            resume=args.resume,
            overwrite=args.overwrite,
            version=package_version(self.distribution),
            rebuild_corpus=bool(getattr(args, "rebuild_corpus", False)),
            rank=rank,
            launch=launch,
        )
        with sigterm_raises():
            try:
                run = Run.open(request)
            except AlreadyFinished as done:
                print(f"note: {done}", file=sys.stderr)
                print(f"wrote {done.folder / 'metrics.json'}")
                return 0
            except RunFolderError as err:
                print(f"{sub.prog}: error: {err}", file=sys.stderr)
                return EXIT_USAGE
            finished = False
            try:
                with run:
                    set_threads(args.threads)
                    seed_everything(args.seed)
                    result = cmd.fn(settings, run)
                    if not isinstance(result, Report | Mapping):
                        raise TypeError(
                            f"{self.package} {cmd.name} returned {type(result).__name__}; a "
                            "command returns a Report or a dict of metrics"
                        )
                    metrics = run.finish(result, title=f"{self.distribution} {cmd.name}")
                finished = True
            except KeyboardInterrupt:
                print(f"\ninterrupted; continue with --resume --out {folder}", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Terminated:
                print(f"terminated; continue with --resume --out {folder}", file=sys.stderr)
                return EXIT_TERMINATED
            except Exception as err:
                if debug:
                    traceback.print_exc()
                print(f"{sub.prog}: error: {_one_line(err)}", file=sys.stderr)
                if not debug:
                    print("(run again with --debug for the traceback)", file=sys.stderr)
                return EXIT_FAILURE
            finally:
                _leave_process_group(wait=finished)
        if rank == 0:  # under torchrun, the other ranks leave the report to rank 0
            print(f"wrote {metrics}")
        return 0


def _leave_process_group(*, wait: bool) -> None:
    """Tear down a process group the command initialized (torchrun), after every rank is done.

    Without it a rank that returns first exits while the others still talk to it, and gloo's
    threads die in ``std::terminate`` (SIGABRT, torchrun reports the run failed). After a
    failure no barrier: the other ranks may never reach it.
    """
    from verger.core.distributed.env import barrier, destroy_distributed

    with contextlib.suppress(Exception):
        if wait:
            barrier()
        destroy_distributed()


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    return parser


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    kind = type(err).__name__
    return f"{kind}: {first}" if first else kind

"""One rank of a multi-rank expert job (started by ``train-expert --nproc N`` via torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m verger.smalltalk.expert_rank JOB.json

``JOB.json`` (written by ``train-expert`` into the job's run folder) holds the keyword
arguments of :func:`verger.smalltalk.experts.train_expert` plus ``threads``. The ranks of
one launch form the job's whole world: no collective reaches another expert's job. On
several machines, start the same module with your own torchrun rendezvous.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from verger.core.distributed import destroy_distributed
from verger.core.runtime import set_threads


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m verger.smalltalk.expert_rank JOB.json", file=sys.stderr)
        return 2
    from verger.smalltalk.experts import train_expert

    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    set_threads(spec.pop("threads", None))
    try:
        train_expert(**spec)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

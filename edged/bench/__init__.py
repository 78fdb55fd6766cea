"""`edged bench`: one command that measures the models present, in-process, through the daemon and against the peer.

Kept light at import: the command's parser only; the measuring code is imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_bench(args: argparse.Namespace) -> int:
    from edged.bench.run import run_bench, table

    report = run_bench(models_dir=Path(args.models_dir) if args.models_dir else None, router=args.router,
                       thinker=args.thinker, out=Path(args.out), quick=args.quick)
    print()
    print(table(report))
    print(f"\nJSON: {args.out}")
    return 0


def add_bench_command(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure the models present: in-process, over MQTT, and against the peer")
    bench.add_argument("--models-dir", help="models directory (default $EDGED_MODELS_DIR or the config's)")
    bench.add_argument("--router", help="router model: manifest name or .gguf path (default the config's)")
    bench.add_argument("--thinker", help="thinker model: manifest name or .gguf path (default the config's)")
    bench.add_argument("--out", default="bench-results/bench.json", help="where to write the JSON report")
    bench.add_argument("--quick", action="store_true", help="fewer runs (for a test); figures are rougher")
    bench.set_defaults(func=cmd_bench)

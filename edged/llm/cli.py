"""`edged models fetch|list|verify`: the model files a device needs, by manifest name."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from edged.llm.files import ModelFileError, fetch, verify_file
from edged.llm.manifest import ModelEntry, load_manifest


def _models_dir(args: argparse.Namespace) -> Path:
    from edged.cli import _load

    return Path(args.dir) if args.dir else _load(args.config).models_dir


class _Bar:
    """A one-line progress bar, only when stderr is a terminal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.tty or now - self.last < 0.2:
            return
        self.last = now
        mb = done / 1e6
        if total:
            width = 30
            filled = int(width * done / total)
            sys.stderr.write(f"\r{self.name} [{'#' * filled}{'.' * (width - filled)}] {mb:.0f}/{total / 1e6:.0f} MB")
        else:
            sys.stderr.write(f"\r{self.name} {mb:.0f} MB")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _select(args: argparse.Namespace, entries: list[ModelEntry]) -> list[ModelEntry]:
    if args.names:
        by_name = {e.name: e for e in entries}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown model(s): {', '.join(unknown)} (known: {', '.join(by_name)})")
        return [by_name[n] for n in args.names]
    if getattr(args, "all", False):
        return entries
    return [e for e in entries if e.default]


def cmd_fetch(args: argparse.Namespace) -> int:
    manifest = load_manifest(Path(args.manifest) if args.manifest else None)
    models_dir = _models_dir(args)
    failed = 0
    for entry in _select(args, manifest.model):
        bar = _Bar(entry.name)
        try:
            path = fetch(entry, models_dir, progress=bar, timeout=args.timeout,
                         log=lambda msg: print(f"  {msg}", file=sys.stderr))
        except ModelFileError as exc:
            bar.close()
            print(f"{entry.name}: FAILED: {exc}", file=sys.stderr)
            failed += 1
            continue
        bar.close()
        # the digest (cached by the fetch) is printed so a file fetched from an unpinned source can be pinned
        print(f"{entry.name}: {path} sha256 {verify_file(path, entry)}")
    return 1 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    manifest = load_manifest(Path(args.manifest) if args.manifest else None)
    models_dir = _models_dir(args)
    for e in manifest.model:
        present = (models_dir / e.file).is_file()
        size = f"{e.size / 1e6:.0f} MB" if e.size else "?"
        flag = "default" if e.default else ""
        print(f"{e.name:24} {e.role:8} {e.family:14} {size:>8} {'present' if present else 'absent':8} {flag}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = load_manifest(Path(args.manifest) if args.manifest else None)
    models_dir = _models_dir(args)
    bad = 0
    entries: list[Any] = _select(args, manifest.model) if args.names else manifest.model
    for e in entries:
        path = models_dir / e.file
        if not path.exists():
            print(f"{e.name}: absent")
            continue
        try:
            digest = verify_file(path, e, use_cache=False)
            print(f"{e.name}: ok {digest}")
        except ModelFileError as exc:
            print(f"{e.name}: BAD: {exc}")
            bad += 1
    return 1 if bad else 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from edged.cli import _load
    from edged.llm.evaluate import evaluate
    from edged.models_runtime import load_models
    from edged.pipeline import Pipeline
    from edged.tools.builtin import builtin_tools
    from edged.tools.registry import ToolRegistry

    config = _load(args.config)
    if args.router:
        config.models.router = args.router
    models = load_models(config)
    if models.router is None:
        print(f"no router: {models.describe()}", file=sys.stderr)
        return 2
    registry = ToolRegistry()
    registry.register_all(builtin_tools(config.tools.contacts_file))
    pipeline = Pipeline(registry, config.device.id, config.limits.deadline_ms, router=models.router)
    scores = evaluate(pipeline, Path(args.cases), Path(args.out) if args.out else None)
    summary = {"router": models.describe().get("router", {}).get("model"), **scores.summary()}
    for key, value in summary.items():
        print(f"{key:22} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    models.close()
    return 0


def add_model_commands(sub: Any) -> None:
    ev = sub.add_parser("eval", help="route a JSONL case file and score the calls")
    ev.add_argument("--cases", required=True, help="input JSONL: id, query, tools, expected")
    ev.add_argument("--out", help="output JSONL, one line per case")
    ev.add_argument("--router", help="router model (manifest name or .gguf path), overriding the config")
    ev.add_argument("--json", help="also write the summary as JSON here")
    ev.add_argument("--config", type=Path, default=None)
    ev.set_defaults(func=cmd_eval)

    models = sub.add_parser("models", help="fetch, list and verify model files")
    msub = models.add_subparsers(dest="models_command", required=True)
    for name, func, helptext in (
        ("fetch", cmd_fetch, "download and verify model files (default: the manifest's defaults)"),
        ("list", cmd_list, "list the manifest's models and which are present"),
        ("verify", cmd_verify, "re-hash present model files against the manifest"),
    ):
        p = msub.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("names", nargs="*", help="manifest names")
        p.add_argument("--dir", help="models directory (default $EDGED_MODELS_DIR or <state dir>/models)")
        p.add_argument("--manifest", help="manifest file (default the one edged ships)")
        p.add_argument("--config", type=Path, default=None)
        if name == "fetch":
            p.add_argument("--default", action="store_true", help="the manifest's default models (the default)")
            p.add_argument("--all", action="store_true", help="every model in the manifest")
            p.add_argument("--timeout", type=float, default=60.0, help="network timeout per request, seconds")
        p.set_defaults(func=func)

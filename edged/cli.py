"""The `edged` command: run the daemon, check a config, ask a daemon something, manage model files."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from edged import __version__
from edged.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config


def _load(path: Path | None, required: bool = False) -> Config:
    try:
        return load_config(path, required=required)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from edged.logs import configure_logging
    from edged.service import Daemon

    configure_logging(config.log.level, config.log.format)
    return Daemon(config).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file, required=True)
    print(f"{args.file}: ok (device {config.device.id}, broker {config.mqtt.host}:{config.mqtt.port})")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from edged.client import EdgedClient

    config = _load(args.config)
    command: dict[str, object] = {"id": args.id or uuid.uuid4().hex[:12]}
    if args.call:
        try:
            arguments = json.loads(args.args or "{}")
        except json.JSONDecodeError as exc:
            print(f"--args is not JSON: {exc}", file=sys.stderr)
            return 2
        command["call"] = {"name": args.call, "arguments": arguments}
    elif args.query:
        command["query"] = args.query
    else:
        print("give a query, or --call NAME [--args JSON]", file=sys.stderr)
        return 2
    device = args.device or config.device.id
    with EdgedClient(args.host or config.mqtt.host, args.port or config.mqtt.port,
                     prefix=config.mqtt.prefix) as client:
        result = client.request(device, command, timeout=args.timeout)
    print(json.dumps(result, indent=2))
    return 0 if result.get("status") in ("ok", "queued", "degraded") else 1


def cmd_ha_remove(args: argparse.Namespace) -> int:
    from edged.discovery import config_topics, remove

    config = _load(args.config)
    sent = remove(config)
    print(f"cleared {sent} of {len(config_topics(config))} Home Assistant discovery configs of {config.device.id}")
    return 0 if sent == len(config_topics(config)) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, default=None, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file; exits non-zero on errors")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_check_config)

    ask = sub.add_parser("ask", help="send one command to a daemon and print its result")
    ask.add_argument("query", nargs="?", help="a request in natural language")
    ask.add_argument("--call", help="direct tool call: the tool's name")
    ask.add_argument("--args", help="direct tool call: arguments as a JSON object")
    ask.add_argument("--id", help="command id (default random)")
    ask.add_argument("--device", help="device id (default this host's, from the config)")
    ask.add_argument("--host", help="broker host (default from the config)")
    ask.add_argument("--port", type=int, help="broker port (default from the config)")
    ask.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the result")
    ask.add_argument("--config", type=Path, default=None)
    ask.set_defaults(func=cmd_ask)

    ha_remove = sub.add_parser("ha-remove", help="remove this device from Home Assistant (empty retained configs)")
    ha_remove.add_argument("--config", type=Path, default=None)
    ha_remove.set_defaults(func=cmd_ha_remove)

    try:
        from edged.llm.cli import add_model_commands
    except ImportError:
        pass
    else:
        add_model_commands(sub)
    from edged.bench import add_bench_command

    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))

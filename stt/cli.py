"""The `stt` command line. Server address: --server or STT_SERVER (default localhost:50051)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence

from stt import formats
from stt.errors import SttError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--language", "-l", default=None, help="language code, e.g. en (default: the model's)")
    p.add_argument(
        "--encoding", default=None, help="force an encoding (LINEAR16 for raw PCM; default: detect)"
    )
    p.add_argument("--sample-rate", type=int, default=0, help="sample rate of raw LINEAR16 audio")
    p.add_argument("--channels", type=int, default=0, help="channel count of raw LINEAR16 audio")
    p.add_argument("--beam-size", type=int, default=0, help="beam size (default: the server's)")
    p.add_argument("--prompt", default=None, help="initial prompt: vocabulary, names, spelling")


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def cmd_up(args: argparse.Namespace) -> int:
    from services.embedded import run
    from services.shared.config import CommonSettings
    from services.shared.logging import setup_logging

    common = CommonSettings()
    setup_logging(common.log_level, common.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.port, args.data_dir, host=args.host))
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from stt.client import Client, segments_of

    data = _read_input(args.file)
    with Client(args.server, timeout=args.timeout) as client:
        resp = client.recognize(
            data,
            language=args.language,
            encoding=args.encoding,
            sample_rate=args.sample_rate,
            channels=args.channels,
            beam_size=args.beam_size,
            prompt=args.prompt,
            word_timestamps=args.format == "json",
        )
    sys.stdout.write(
        formats.render(
            segments_of(resp.results),
            args.format,
            language=resp.language_code,
            duration=resp.metadata.audio_duration_seconds,
        )
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from stt.client import Client

    with Client(args.server) as client:
        statuses = client.health(timeout=args.timeout if args.timeout < 600 else 5.0)
    if args.json:
        print(json.dumps(statuses, indent=2))
    else:
        width = max((len(k) for k in statuses), default=10)
        for name, status in statuses.items():
            print(f"{(name or '(server)'):<{width + 2}}{status}")
    return 0 if statuses.get("", "SERVING") == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt", description="Speech-to-text over gRPC.")
    parser.add_argument(
        "--server", "-s", default=None, help="gateway address (env STT_SERVER, default localhost:50051)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline per call in seconds")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the whole stack embedded on this machine")
    p.add_argument("--port", type=int, default=50051, help="gateway port (default 50051)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--data-dir", default=None, help="keep jobs and audio here (default ./data)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("transcribe", help="transcribe a file and print the transcript")
    p.add_argument("file", help="audio file, or - for stdin")
    p.add_argument("--format", "-f", choices=formats.FORMATS, default="text")
    _add_config_args(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("health", help="report the status of each service")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SttError as exc:
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        for field, desc in exc.fields.items():
            if desc != exc.message:
                print(f"  {field}: {desc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

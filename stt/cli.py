"""The `stt` command line. Server address: --server or STT_SERVER (default localhost:50051)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

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


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options _add_config_args put on the command line."""
    return {
        "language": args.language,
        "encoding": args.encoding,
        "sample_rate": args.sample_rate,
        "channels": args.channels,
        "beam_size": args.beam_size,
        "prompt": args.prompt,
    }


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def _server_command(name: str, args: argparse.Namespace) -> int:
    """Commands that ship with the server distribution (`up`, `certs`), found through the
    `stt.server` entry point, so the SDK depends on none of the server's packages."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="stt.server") if ep.name == name]
    try:
        if not found:
            raise ImportError("no stt.server entry point")
        run = found[0].load()
    except ImportError as exc:
        print(
            f"error: `stt {name}` needs the server, which is not installed here ({exc}).\n"
            "  install it with: pip install 'stt-platform[all]'   (or `make run` in a checkout)",
            file=sys.stderr,
        )
        return 2
    return int(run(args) or 0)


def cmd_up(args: argparse.Namespace) -> int:
    return _server_command("up", args)


def cmd_certs(args: argparse.Namespace) -> int:
    return _server_command("certs", args)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from stt.client import segments_of

    data = _read_input(args.file)
    with _client(args) as client:
        resp = client.recognize(data, word_timestamps=args.format == "json", **_config_kwargs(args))
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
    with _client(args) as client:
        statuses = client.health(timeout=min(args.timeout, 5.0))
    if args.json:
        print(json.dumps(statuses, indent=2))
    else:
        width = max((len(k) for k in statuses), default=10)
        for name, status in statuses.items():
            print(f"{(name or '(server)'):<{width + 2}}{status}")
    return 0 if statuses.get("", "SERVING") == "SERVING" else 1


def _ts(t: Any) -> str:
    return t.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if t.seconds else "-"


def _job_line(job: Any) -> str:
    from stt.client import enum_label
    from stt.v1 import jobs_pb2

    status = enum_label(jobs_pb2.JobStatus, job.status)
    prio = enum_label(jobs_pb2.Priority, job.priority or jobs_pb2.PRIORITY_NORMAL)
    progress = f"{job.chunks_completed}/{job.chunks_total}" if job.chunks_total else "-"
    return (
        f"{job.job_id}  {status:<9} {prio:<6} {progress:>7}  {job.audio_duration_seconds:8.1f}s  "
        f"{_ts(job.create_time)}  {job.filename}"
    )


def _job_detail(job: Any) -> str:
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True), indent=2)


class _Progress:
    """A one-line progress bar on stderr fed by WatchJob events."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def update(self, event: Any) -> None:
        from stt.client import enum_label
        from stt.v1 import jobs_pb2

        job = event.job
        total, done = job.chunks_total, job.chunks_completed
        width = 30
        filled = int(width * done / total) if total else 0
        bar = "#" * filled + "-" * (width - filled)
        retry = f"  attempts charged {job.retry_count}/{job.max_attempts}" if job.retry_count else ""
        retry += f"  interrupted {job.interruption_count}x" if job.interruption_count else ""
        line = f"[{bar}] {done}/{total or '?'} chunks  {enum_label(jobs_pb2.JobStatus, job.status)}{retry}"
        if line == self.last:
            return
        self.last = line
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")


def cmd_submit(args: argparse.Namespace) -> int:
    from stt.client import enum_label
    from stt.v1 import jobs_pb2

    data = _read_input(args.file)
    with _client(args) as client:
        job = client.submit(
            data,
            filename=args.file if args.file != "-" else "stdin",
            priority=args.priority,
            request_id=args.request_id,
            keep_audio=args.keep_audio,
            word_timestamps=True,
            **_config_kwargs(args),
        )
        if not args.wait:
            print(job.job_id)
            return 0
        print(f"job {job.job_id}", file=sys.stderr)
        progress = _Progress()
        for event in client.watch_job(job.job_id):
            progress.update(event)
            job = event.job
        progress.done()
        if job.status != jobs_pb2.JOB_STATUS_COMPLETED:
            reason = f" ({job.failure_reason})" if job.failure_reason else ""
            print(
                f"job {job.job_id} {enum_label(jobs_pb2.JobStatus, job.status)}{reason}: {job.error_message}",
                file=sys.stderr,
            )
            return 1
        sys.stdout.write(client.transcript(job.job_id, args.format).content)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            token, shown = "", 0
            while shown < args.limit:
                resp = client.list_jobs(
                    status=args.status, page_size=min(100, args.limit - shown), page_token=token
                )
                for job in resp.jobs:
                    print(_job_line(job))
                shown += len(resp.jobs)
                token = resp.next_page_token
                if not token:
                    break
            return 0
        if not args.job_id:
            raise SystemExit(f"stt jobs {args.action}: a JOB_ID is required")
        if args.action == "get":
            print(_job_detail(client.get_job(args.job_id)))
        elif args.action == "watch":
            progress = _Progress()
            for event in client.watch_job(args.job_id):
                progress.update(event)
            progress.done()
        elif args.action == "cancel":
            print(_job_line(client.cancel_job(args.job_id)))
        elif args.action == "retry":
            print(_job_line(client.retry_job(args.job_id)))
        elif args.action == "delete":
            client.delete_job(args.job_id)
            print(f"deleted {args.job_id}")
    return 0


def cmd_transcript(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sys.stdout.write(client.transcript(args.job_id, args.format).content)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from stt.client import enum_label
    from stt.v1 import jobs_pb2

    with _client(args) as client:
        stats = client.queue_stats()
    print(f"{'priority':<10}{'pending':>8}{'running':>9}{'workers':>9}{'oldest wait':>13}")
    for p in stats.priorities:
        print(
            f"{enum_label(jobs_pb2.Priority, p.priority):<10}{p.pending:>8}{p.running:>9}{p.workers:>9}"
            f"{p.oldest_wait_seconds:>12.1f}s"
        )
    print(f"workers: {stats.workers}")
    for q in stats.quotas:
        limit = f"{q.limit:g}" if q.limit else "unlimited"
        print(f"quota {q.name}: {q.used:g} of {limit}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args))


async def _stream(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from stt.client import AsyncClient
    from stt.streaming import load_pcm, pcm_chunks
    from stt.v1 import speech_pb2

    audio = load_pcm(args.file if args.file != "-" else sys.stdin.buffer.read())
    # Resumptions of a broken stream (a gateway restarted or lost) are noted on stderr.
    note = logging.StreamHandler(sys.stderr)
    note.setFormatter(logging.Formatter("(%(message)s)"))
    logging.getLogger("stt.client").addHandler(note)
    logging.getLogger("stt.client").setLevel(logging.INFO)
    tty = sys.stdout.isatty() and not args.json
    pending = ""
    async with AsyncClient(args.server, **_conn_kwargs(args)) as client:
        responses = client.stream(
            pcm_chunks(audio, realtime=args.realtime),
            interim=args.interim,
            encoding="LINEAR16",
            sample_rate=audio.sample_rate,
            channels=audio.channels,
            language=args.language,
            word_timestamps=True,
            final_results=args.finals,
        )
        async for resp in responses:
            if args.json:
                print(
                    json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True)), flush=True
                )
                continue
            for r in resp.results:
                if r.is_final and not r.transcript:
                    continue  # an utterance's closing marker (utterance_end) without words
                if r.is_final:
                    line = f"[{r.start_seconds:7.2f}-{r.end_seconds:7.2f}] {r.transcript}"
                    sys.stdout.write(("\r\033[K" if tty and pending else "") + line + "\n")
                    pending = ""
                elif tty:
                    pending = r.transcript
                    sys.stdout.write("\r\033[K  \033[2m" + pending[-150:] + "\033[0m")
                else:
                    print(f"  ... {r.transcript}")
            if (
                resp.speech_event_type == speech_pb2.SPEECH_EVENT_TYPE_END_OF_SINGLE_UTTERANCE
                and not args.json
            ):
                print("(end of utterance)")
            sys.stdout.flush()
    if pending:
        sys.stdout.write("\n")
    return 0


def _global_args(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Connection options. On the main parser with their defaults; on every subcommand again with no
    default, so `stt --server X transcribe f` and `stt transcribe f --server X` both work."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    g = p.add_argument_group("connection")
    g.add_argument(
        "--server", "-s", default=d(None), help="gateway address (env STT_SERVER, default localhost:50051)"
    )
    g.add_argument(
        "--timeout", type=float, default=d(600.0), help="deadline per call in seconds (default 600)"
    )
    g.add_argument("--api-key", default=d(None), help="API key (env STT_API_KEY)")
    g.add_argument(
        "--tls", action="store_true", default=d(False), help="use TLS with the system's roots (env STT_TLS)"
    )
    g.add_argument(
        "--tls-ca", default=d(None), metavar="FILE", help="trust this CA; implies --tls (env STT_TLS_CA_FILE)"
    )
    g.add_argument(
        "--tls-cert",
        default=d(None),
        metavar="FILE",
        help="client certificate for mTLS (env STT_TLS_CERT_FILE)",
    )
    g.add_argument(
        "--tls-key", default=d(None), metavar="FILE", help="client key for mTLS (env STT_TLS_KEY_FILE)"
    )
    g.add_argument(
        "--tls-server-name",
        default=d(None),
        metavar="NAME",
        help="name the server's certificate must carry, if not the address (env STT_TLS_SERVER_NAME)",
    )


def _conn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "timeout": args.timeout,
        "api_key": args.api_key,
        "tls": True if args.tls else None,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
    }


def _client(args: argparse.Namespace) -> Any:
    from stt.client import Client

    return Client(args.server, **_conn_kwargs(args))


def cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    with _client(args) as client:
        info = client.server_info()
    print(json.dumps(json_format.MessageToDict(info, preserving_proto_field_name=True), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt", description="Speech-to-text over gRPC.")
    _global_args(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _global_args(p, defaults=False)
        return p

    p = command("up", "run the whole stack (gateway, transcriber, jobstore) on this machine")
    p.add_argument("--port", type=int, default=50051, help="gateway port (default 50051)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--data-dir", default="./data", help="keep jobs and audio here (default ./data)")
    p.add_argument(
        "--http-port", type=int, default=None,
        help="HTTP port: OpenAI-compatible API, jobs over REST, WebSockets, the web page "
        "(default STT_HTTP_PORT or 8000)",
    )  # fmt: skip
    p.add_argument("--no-http", action="store_true", help="do not serve HTTP (gRPC only)")
    p.set_defaults(func=cmd_up)

    p = command("certs", "make a development CA and certificates for every service (needs the server)")
    p.add_argument("dir", nargs="?", default="certs", help="output directory (default ./certs)")
    p.add_argument("--force", action="store_true", help="make a new CA even if DIR has one")
    p.add_argument("--days", type=int, default=825, help="validity of the certificates in days")
    p.set_defaults(func=cmd_certs)

    p = command("transcribe", "transcribe a file and print the transcript")
    p.add_argument("file", help="audio file, or - for stdin")
    p.add_argument("--format", "-f", choices=formats.FORMATS, default="text")
    _add_config_args(p)
    p.set_defaults(func=cmd_transcribe)

    p = command("stream", "stream a file for live recognition (interim and final results)")
    p.add_argument("file", help="audio file (WAV streams as-is; other formats are decoded first), or -")
    p.add_argument("--realtime", action="store_true", help="send at the pace of speech, like a microphone")
    p.add_argument("--interim", action="store_true", help="show interim results, updated in place")
    p.add_argument("--json", action="store_true", help="print every response as one JSON object per line")
    p.add_argument("--language", "-l", default=None)
    p.add_argument(
        "--finals",
        choices=["stable", "utterance-end"],
        default=None,
        help="when words become final: as soon as they are stable (lowest latency) or when the "
        "utterance ends (later, fewer word errors); default: the server's",
    )
    p.set_defaults(func=cmd_stream)

    p = command("submit", "upload a file as a durable job")
    p.add_argument("file", help="audio file, or - for stdin")
    p.add_argument("--priority", "-p", choices=["high", "normal", "low"], default="normal")
    p.add_argument("--request-id", default=None, help="idempotency key (default: a new UUID)")
    p.add_argument("--keep-audio", action="store_true", help="keep the audio after completion (for retry)")
    p.add_argument("--wait", "-w", action="store_true", help="show progress, then print the transcript")
    p.add_argument(
        "--format", "-f", choices=formats.FORMATS, default="text", help="transcript format with --wait"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_submit)

    p = command("jobs", "list, inspect, watch, cancel, retry or delete jobs")
    p.add_argument("action", choices=["list", "get", "watch", "cancel", "retry", "delete"])
    p.add_argument("job_id", nargs="?", default=None)
    p.add_argument(
        "--status", choices=["queued", "running", "completed", "failed", "cancelled"], default=None
    )
    p.add_argument("--limit", type=int, default=50, help="list at most this many (newest first)")
    p.set_defaults(func=cmd_jobs)

    p = command("transcript", "print a completed job's transcript")
    p.add_argument("job_id")
    p.add_argument("--format", "-f", choices=formats.FORMATS, default="text")
    p.set_defaults(func=cmd_transcript)

    p = command("queue", "queue statistics per priority, and your quotas")
    p.set_defaults(func=cmd_queue)

    p = command("info", "the server's model, languages, features, limits and your quotas")
    p.set_defaults(func=cmd_info)

    p = command("health", "report the status of each service")
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
        if exc.retry_after is not None:
            print(f"  retry after {exc.retry_after:.1f}s", file=sys.stderr)
        if exc.request_id:
            print(f"  request id: {exc.request_id}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad option values, unreadable files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

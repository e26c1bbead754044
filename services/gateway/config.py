"""Gateway settings (env STT_*)."""

from __future__ import annotations

import os
import tempfile
from typing import Literal

from pydantic import SecretStr

from services.gateway.chunking import VadSettings
from services.gateway.quotas import PRIORITIES, Quotas, TenantQuota, parse_tenant_quotas
from services.shared.config import CommonSettings


class GatewaySettings(CommonSettings):
    gateway_port: int = 50051
    # Transcribers: comma-separated host:port entries, DNS names (re-resolved; every address is
    # used) or file:/path listing one host:port per line.
    transcriber_address: str = "127.0.0.1:50052"
    transcriber_refresh_seconds: float = 5.0
    # Deadline for one window at a transcriber (includes waiting in its queue).
    transcriber_timeout_seconds: float = 120.0
    # How long a call waits for a SERVING transcriber before answering UNAVAILABLE.
    transcriber_ready_wait_seconds: float = 5.0
    # Recognize limits: bytes in one request, decoded audio duration.
    max_recognize_bytes: int = 32 * 1024 * 1024
    max_recognize_seconds: float = 900.0
    # Windows of one request sent to the pool at once.
    max_parallel_windows: int = 16
    # Audio decodes running at once (each holds up to max_recognize_seconds of samples).
    max_concurrent_decodes: int = 4
    # Voice activity detection used to cut audio at pauses.
    vad_threshold: float = 0.35
    vad_min_silence_ms: int = 300
    vad_speech_pad_ms: int = 200

    # Live streams: the longest stream, re-transcription step, window cap, endpointing, buffer bound.
    max_stream_seconds: float = 4 * 3600.0
    stream_step_seconds: float = 0.3
    stream_max_window_seconds: float = 15.0
    stream_endpoint_silence_seconds: float = 0.5
    stream_max_buffer_seconds: float = 60.0
    # LocalAgreement: hypotheses that must agree before a word is final, and audio that must follow it.
    stream_agreement: int = 2
    stream_hold_seconds: float = 0.2
    # ... or two agreeing hypotheses and this much audio after the word.
    stream_settle_seconds: float = 1.2
    # Until the window holds stream_commit_window_seconds (an utterance's start), only words of at
    # least stream_commit_probability are made final by agreement (0 = off, the default). With 2 s /
    # 0.3, simulated on the four bench stream clips (audio arriving as model time passes; 4 runs each):
    # WER 12.65 % -> 10.7 %, final-word latency mean 0.66 -> 0.76 s, p95 1.31 -> 1.60 s; but the
    # bench's real-time stream (clip 0, 3 runs each) gained nothing (WER 10.38-12.57 % vs
    # 10.38-10.93 %) and its p95 went from 1.38-1.50 s to 1.59-1.84 s, so it is off by default.
    stream_commit_window_seconds: float = 0.0
    stream_commit_probability: float = 0.3
    # Beam size where a live utterance's final is decided (0: the transcriber's default); interim
    # hypotheses use stream_interim_beam_size (1: greedy, cheapest; they are re-made every step).
    stream_beam_size: int = 5
    # A stream that sends no audio for this long ends (DEADLINE_EXCEEDED, STREAM_IDLE); its first
    # message (the config) must come within stream_config_timeout_seconds.
    stream_idle_seconds: float = 30.0
    stream_config_timeout_seconds: float = 10.0
    stream_interim_beam_size: int = 1
    # While this gateway has at most stream_light_load_streams live streams per serving transcriber,
    # hypotheses use beam stream_light_load_beam_size instead (0 = never): a greedy hypothesis of a
    # short window is often a confident guess that the next one repeats, and agreement makes it final.
    # Simulated on the four bench stream clips (real recordings, audio arriving as model time passes):
    # WER 13.1-13.5 % greedy -> 10.7 % with beam 3 (10.3-10.4 % with beam 5, 10.5-10.7 % with beam 2)
    # at the same final-word latency; model time 79 s greedy, 80 s beam 3, 119 s beam 5 for 359 s of
    # audio. Sent at real time: 13.2 % -> 10.4 %, final-word p95 1.19 -> 1.15 s. Above the threshold
    # every stream's tick is batched with the others' and beams would lengthen it: greedy.
    stream_light_load_beam_size: int = 3
    stream_light_load_streams: int = 2
    # At light load too, a live hypothesis of a stream with stable finals also hears this much audio
    # before its window, the final words said in it given as the start of its text (a decoder
    # prefix: the model goes on after them): the first words of an utterance, and the words after a
    # commit, are decided with the speech before them heard rather than at the window's edge. Real
    # time on the four bench stream clips (2026-12-06, AMD EPYC, `bench.stream_sim`): mean WER
    # 12.4 % (none) -> 8.7 % (3 s), 9.1 % (5 s), 8.9 % (10 s); final-word mean 0.69 -> 0.77-0.83 s,
    # p95 1.15 -> 1.26-1.35 s; model time +40 % (3 s) to +65 % (10 s). Greedy hypotheses with 10 s:
    # 14.2 % on the first clip (beam 3 is what makes it pay).
    # 0 = none (always so above stream_light_load_streams; utterance-end streams' hypotheses are
    # interims only and never have it).
    stream_hypothesis_context_seconds: float = 3.0
    # ... but only while this gateway has at most this many live streams per serving transcriber
    # (times stream_capacity_share): with 2 real-time streams on one 2-core transcriber, hypotheses
    # with left context took final-word p95 from 1.07 s to 1.95 s (each costs ~40 % more model time).
    # A GPU transcriber has room for more.
    stream_hypothesis_context_streams: int = 1
    # Where the live window restarts after words become final: "commit" (after the last final word),
    # "sentence" (after a final sentence end), "none" (only at pauses and at the window cap).
    stream_trim: Literal["commit", "sentence", "none"] = "none"
    # When live words become final for streams that do not say (StreamingRecognitionConfig.
    # final_result_timing): "stable" (as soon as hypotheses agree, within the utterance) or
    # "utterance_end" (only by the utterance's final pass: later, fewer word errors).
    stream_final_results: Literal["stable", "utterance_end"] = "stable"
    # Audio before an utterance that its final pass also hears (left context; words already final
    # there are not repeated): in simulation on the real recordings 6 s took streaming WER from
    # 10.6 % to 9.1 % (offline 6.4 %) for one longer model call per utterance. 0 = none.
    stream_final_context_seconds: float = 6.0
    # The same for streams whose words are final only at utterance ends (final_result_timing
    # UTTERANCE_END): there the words already final in the context are the start of the pass's text
    # (a decoder prefix: the model goes on after them) and the pass has the encoder's full 30 s
    # context. In a deterministic replay of utterance-end finals over 11 real-speech streams, pooled
    # WER 10.04 % with 6 s decoded again, 9.02 % with 20 s as a prefix (offline 8.26 %); in real
    # time over the bench's four streams 9.00 % -> 8.57 % (offline 7.29 %); 6 s as a prefix was
    # worse (bench stream 10.9 % against 7.65 %). A pass costs ~1.0 s of model time instead of
    # ~0.45 s: finals ~0.7 s later (light load only, see below). 0 = none.
    stream_utterance_end_final_context_seconds: float = 20.0
    # Above stream_light_load_streams live streams per serving transcriber, an utterance's final pass
    # uses at most beam stream_loaded_final_beam_size and stream_loaded_final_context_seconds of left
    # context instead (negative: as at light load). With 8 real-time streams on one 2-core
    # transcriber, finals with beam 5 and 6 s of context were ~2 of every 7 windows in a tick but
    # most of its time (ticks of 0.95 s against 0.13 s without them).
    stream_loaded_final_beam_size: int = 1
    stream_loaded_final_context_seconds: float = 0.0
    # Above stream_heavy_load_streams live streams per serving transcriber (0 = never), words are
    # final after stream_loaded_agreement hypotheses (at most stream_agreement): one instead of two.
    # On 2 cores, 8 real-time streams get a hypothesis every ~0.55 s each, and agreement of two then
    # put final words 1.13-1.17 s (p95 1.94-2.04 s) behind speech; with one, 0.85-0.90 s (p95
    # 1.33-1.38 s), for ~3.5 points of WER (words decided on less right context).
    stream_heavy_load_streams: int = 4
    stream_loaded_agreement: int = 1
    # Admission control: live streams admitted per transcriber, estimated from the measured model cost
    # of live windows so that a batched tick (one call per transcriber worker) lasts at most
    # stream_target_tick_seconds; stream_capacity_initial until a transcriber has been measured;
    # stream_capacity > 0 fixes the number per transcriber instead. Several gateways sharing the
    # transcribers: stream_capacity_share = 1 / number of gateways. 0.55 s: on 2 cores (2 workers)
    # 10 real-time streams had final-word p95 1.39 s, 12 1.58 s, 14 1.89 s (2026-12-06); 0.7 s
    # admitted 14.
    stream_target_tick_seconds: float = 0.55
    stream_capacity_initial: int = 8
    stream_capacity: int = 0
    stream_capacity_share: float = 1.0

    # Jobs: where the jobstore is, and this gateway's dispatcher.
    jobstore_address: str = "127.0.0.1:50053"
    jobstore_timeout_seconds: float = 30.0
    # Jobs this gateway transcribes at once (0: this gateway only serves the API, no dispatching).
    # Enough that the windows of several short jobs queue together and share model calls (with 2,
    # 8 concurrent 66 s jobs ran one job's 3 windows per call).
    dispatch_concurrency: int = 4
    # Lease on a claimed job, and how often it is renewed (also how fast a cancel is noticed).
    job_lease_seconds: float = 30.0
    job_heartbeat_seconds: float = 2.0
    # Upload limits for jobs (checked while receiving and while decoding, before a job exists).
    max_job_bytes: int = 1024 * 1024 * 1024
    max_job_seconds: float = 4 * 3600.0
    max_job_attempts: int = 3
    # Where uploads and decoded job audio are spooled (default: <system temp>/stt-spool; `stt up`
    # uses <data dir>/spool). Each process works in its own subdirectory, removed when it stops;
    # what a crashed process left is removed at start and every spool_sweep_seconds.
    spool_dir: str | None = None
    spool_sweep_seconds: float = 60.0
    # Identity of this dispatcher in leases (default host:pid).
    worker_id: str | None = None
    # API keys: entries `KEY:TENANT[:ro]` or `sha256:HEX:TENANT[:ro]`, comma-separated (several per
    # tenant for rotation; `:ro` read-only). Empty: every caller is tenant "default", which the
    # gateway allows only on loopback or with STT_ALLOW_ANONYMOUS=true.
    api_keys: SecretStr | None = None

    # Per-tenant quotas (0: no limit), defaults for every tenant; STT_TENANT_QUOTAS (JSON) overrides
    # them per tenant: {"acme": {"concurrent_streams": 2, "max_priority": "normal"}}.
    quota_concurrent_streams: int = 50
    quota_concurrent_recognize: int = 32
    quota_queued_jobs: int = 1000
    quota_stored_audio_bytes: int = 50 * 1024**3
    quota_requests_per_second: float = 0.0
    quota_max_priority: Literal["low", "normal", "high"] = "high"
    tenant_quotas: str = ""
    # Gateway-wide: request bytes held in memory at once (Recognize bodies and their decoding), and
    # how long a call waits for room before RESOURCE_EXHAUSTED (SERVER_BUSY). 0: no limit.
    max_inflight_bytes: int = 256 * 1024 * 1024
    inflight_wait_seconds: float = 10.0
    # The HTTP front door (OpenAI-compatible REST, jobs over REST, WebSockets, the web page), served
    # by the same process and event loop as the gRPC server.
    http_enabled: bool = True
    http_port: int = 8000
    # Model names /v1/audio/transcriptions accepts besides the loaded model's own name.
    http_model_aliases: str = "whisper-1"
    # Origins allowed to call the API from a browser page served elsewhere (CORS): "*" or a
    # comma-separated list; empty: same origin only.
    http_cors_origins: str = ""

    def spool_root(self) -> str:
        return self.spool_dir or os.path.join(tempfile.gettempdir(), "stt-spool")

    def vad(self) -> VadSettings:
        return VadSettings(
            threshold=self.vad_threshold,
            min_silence_ms=self.vad_min_silence_ms,
            speech_pad_ms=self.vad_speech_pad_ms,
        )

    def api_key_entries(self) -> str:
        return self.api_keys.get_secret_value() if self.api_keys else ""

    def default_quota(self) -> TenantQuota:
        return TenantQuota(
            concurrent_streams=self.quota_concurrent_streams,
            concurrent_recognize=self.quota_concurrent_recognize,
            queued_jobs=self.quota_queued_jobs,
            stored_audio_bytes=self.quota_stored_audio_bytes,
            requests_per_second=self.quota_requests_per_second,
            max_priority=PRIORITIES[self.quota_max_priority],
        )

    def quotas(self) -> Quotas:
        default = self.default_quota()
        return Quotas(default, parse_tenant_quotas(self.tenant_quotas, default))

    def model_aliases(self) -> list[str]:
        return [a.strip() for a in self.http_model_aliases.split(",") if a.strip()]

    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.http_cors_origins.split(",") if o.strip()]

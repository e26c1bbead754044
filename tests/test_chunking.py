"""Unit tests for window planning and merging (no model, no grpc)."""

import itertools

import numpy as np

from services.gateway.chunking import VadSettings, Window, merge, plan_windows, speech_regions
from services.shared.domain import SAMPLE_RATE, Segment, Word
from tests.support import audio

SR = SAMPLE_RATE


def _regions(spans):
    return [(int(a * SR), int(b * SR)) for a, b in spans]


def test_short_audio_is_one_window():
    a = np.zeros(10 * SR, dtype=np.float32)
    w = plan_windows(a, _regions([(1, 3), (5, 8)]))
    assert len(w) == 1
    assert w[0].start <= 1 * SR and w[0].end >= 8 * SR


def test_windows_at_most_30s_and_cut_in_pauses():
    a = np.zeros(100 * SR, dtype=np.float32)
    spans = [(i * 5 + 0.5, i * 5 + 4.0) for i in range(20)]  # 3.5 s of speech every 5 s
    ws = plan_windows(a, _regions(spans))
    assert len(ws) >= 4
    for w in ws:
        assert w.seconds <= 30.0 + 1e-6
    for prev, nxt in itertools.pairwise(ws):
        assert prev.end <= nxt.start  # disjoint
    # No speech region is split between two windows.
    for a_, b_ in spans:
        inside = [w for w in ws if w.start <= a_ * SR and b_ * SR <= w.end]
        assert len(inside) == 1, (a_, b_)


def test_long_speech_is_split_at_its_quietest_point():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(70 * SR) * 0.3).astype(np.float32)
    a[40 * SR : 40 * SR + SR // 5] = 0.0  # a short quiet moment at 40 s
    ws = plan_windows(a, _regions([(0, 70)]))
    assert all(w.seconds <= 30.0 + 1e-6 for w in ws)
    assert ws[0].start == 0 and ws[-1].end == 70 * SR
    cuts = [w.end / SR for w in ws[:-1]]
    assert any(abs(c - 40.1) < 0.2 for c in cuts), cuts


def test_silence_gives_no_windows():
    a = audio.silence(20)
    assert plan_windows(a, speech_regions(a, VadSettings())) == []


def test_vad_finds_spoken_sentences():
    clip = audio.conversation(audio.SENTENCES[:3], pause=1.5, lead=2.0)
    regions = speech_regions(clip.samples, VadSettings())
    assert regions, "no speech found"
    for start, end, _ in clip.spans:
        covered = [r for r in regions if r[0] / SR <= start + 0.3 and r[1] / SR >= end - 0.3]
        assert covered, (start, end, [(a / SR, b / SR) for a, b in regions])


def test_merge_shifts_and_keeps_times_monotonic():
    windows = [Window(0, 10 * SR), Window(10 * SR, 25 * SR)]
    first = [Segment(0.5, 3.0, "a b", [Word("a", 0.5, 1.0), Word("b", 1.0, 3.0)])]
    # The model may put a word slightly past the window end, or out of order.
    second = [
        Segment(0.2, 16.0, "c d", [Word("c", 0.2, 0.9), Word("d", 0.1, 16.0)]),
    ]
    merged = merge(windows, [first, second])
    assert [s.text for s in merged] == ["a b", "c d"]
    words = [w for s in merged for w in s.words]
    assert [w.word for w in words] == ["a", "b", "c", "d"]
    assert words[2].start == 10.2
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(w.end <= 25.0 and w.start <= w.end for w in words)
    assert merged[1].end <= 25.0


def test_windows_given_out_piece_by_piece_are_the_whole_plan():
    """The incremental planner plans what the whole-audio plan does, however the regions arrive."""
    from services.gateway.chunking import WindowPlanner

    rng = np.random.default_rng(3)
    a = (rng.standard_normal(300 * SR) * 0.1).astype(np.float32)
    spans = [(i * 7 + 0.5, i * 7 + 5.0) for i in range(38)] + [(268.0, 299.0)]
    regions = _regions(spans)
    whole = plan_windows(a, regions)
    planner = WindowPlanner(lambda lo, hi: a[lo:hi])
    out = []
    for k, region in enumerate(regions):
        out += planner.add([region], region[1] if k + 1 < len(regions) else a.shape[0])
    out += planner.finish(a.shape[0])
    assert out == whole


def _planned(spans, total_seconds):
    from services.gateway.chunking import WindowPlanner

    a = np.zeros(int(total_seconds * SR), dtype=np.float32)
    planner = WindowPlanner(lambda lo, hi: a[lo:hi])
    windows = planner.add(_regions(spans), a.shape[0])
    return planner, windows + planner.finish(a.shape[0])


def test_rebalance_cuts_the_last_windows_evenly_in_the_same_pauses():
    # 3.5 s of speech every 5 s for 206 s: 7 windows of up to 30 s (one transcriber of two would
    # do 4 of them); cut again into 8, each of the two does 4 of about the same length.
    spans = [(i * 5 + 0.5, i * 5 + 4.0) for i in range(41)]
    planner, windows = _planned(spans, 206.0)
    assert len(windows) == 7
    again = planner.rebalance(windows, 8)
    assert len(again) == 8

    def imbalance(ws):  # audio seconds of the busier of two replicas taking windows in turn
        return abs(sum(w.seconds for w in ws[0::2]) - sum(w.seconds for w in ws[1::2]))

    assert imbalance(windows) > 20.0
    assert imbalance(again) < 6.0
    assert max(w.seconds for w in again) - min(w.seconds for w in again) < 8.0
    assert all(w.seconds <= 30.0 + 1e-6 for w in again)
    assert all(p.end <= n.start for p, n in itertools.pairwise(again))
    assert again[-1].end <= 206 * SR
    for a_, b_ in spans:  # every stretch of speech whole, in exactly one window
        assert sum(1 for w in again if w.start <= a_ * SR and b_ * SR <= w.end) == 1, (a_, b_)
    # The first windows given out stay; only the tail is cut again, after them.
    tail = planner.rebalance(windows[3:], 5)
    assert len(tail) == 5 and tail[0].start >= windows[2].end
    for a_, b_ in spans[24:]:
        assert sum(1 for w in tail if w.start <= a_ * SR and b_ * SR <= w.end) == 1, (a_, b_)


def test_rebalance_leaves_what_it_cannot_cut():
    spans = [(i * 5 + 0.5, i * 5 + 4.0) for i in range(41)]
    planner, windows = _planned(spans, 206.0)
    assert planner.rebalance(windows[:3], 4) == windows[:3]  # not the planner's last windows
    assert planner.rebalance(windows, 0) == windows
    # Speech without pauses cannot be cut finer than its pieces: at most as many windows as pieces.
    planner, windows = _planned([(0.5, 40.0), (41.0, 80.0)], 81.0)
    again = planner.rebalance(windows, 10)
    assert 2 < len(again) <= 4 and all(w.seconds <= 30.0 + 1e-6 for w in again)
    # Audio that fits in one window is not this planner's to cut.
    planner, windows = _planned([(1.0, 9.0)], 10.0)
    assert planner.rebalance(windows, 2) == windows


def test_balance_leaves_a_single_replica_alone():
    spans = [(i * 5 + 0.5, i * 5 + 4.0) for i in range(41)]
    planner, windows = _planned(spans, 206.0)
    assert planner.balance(windows, 1) == windows  # (rebalance into as many would move the cuts)
    assert planner.rebalance(windows, 7) != windows
    assert len(planner.balance(windows, 2)) == 8


def test_fewest_groups_of_every_suffix_is_what_filling_gives():
    from services.gateway.chunking import _fewest_groups, _fill

    rng = np.random.default_rng(7)
    limit = 30 * SR
    for _ in range(50):
        t, pieces = 0, []
        for _ in range(int(rng.integers(1, 60))):
            t += int(rng.integers(1, 20 * SR))
            length = int(rng.integers(SR // 10, limit))
            pieces.append((t, t + length))
            t += length
        need = _fewest_groups(pieces, limit)
        assert need == [len(_fill(pieces[j:], limit)) for j in range(len(pieces))] + [0]


def test_balance_keeps_the_plan_rather_than_make_a_tiny_window():
    """A 0.27 s blip between two long stretches of speech: cutting the plan into 10 for 2 replicas
    would make it a window of its own (a whole encoder pass for nothing, and where Whisper invents
    words) and share the work worse; the plan stays."""
    from services.gateway.chunking import _busiest

    spans = [(1.1, 16.05), (17.44, 43.0), (44.05, 47.65), (48.96, 62.9), (64.61, 87.04), (87.55, 87.82),
             (88.24, 102.76), (104.43, 119.91), (120.75, 124.13), (125.06, 144.25), (145.8, 164.9),
             (165.93, 183.16), (183.49, 184.86)]  # fmt: skip
    planner, windows = _planned(spans, 185.5)
    again = planner.balance(windows, 2)
    assert min(w.seconds for w in again) >= min(w.seconds for w in windows) - 1e-6
    assert _busiest(again, 2) <= _busiest(windows, 2)
    assert all(w.seconds <= 30.0 + 1e-6 for w in planner.rebalance(windows, 1))  # (never one window)


def test_balanced_count():
    from services.gateway.chunking import balanced_count

    w30 = [Window(0, 30 * SR)] * 7
    assert balanced_count(w30, 1) == 7
    assert balanced_count(w30, 2) == 8
    assert balanced_count(w30, 3) == 9
    assert balanced_count(w30[:1], 4) == 1  # one window is the whole speech: not cut for speed
    assert balanced_count([Window(0, 20 * SR)] * 2, 4) == 2  # 10 s windows: not worth it


def test_streaming_planner_gives_windows_before_the_audio_ends_and_the_same_however_fed():
    from services.gateway.chunking import StreamingPlanner

    clip = audio.conversation(audio.SENTENCES * 3, pause=1.2, lead=1.0)
    samples = clip.samples
    assert samples.shape[0] > 100 * SR

    def run(step: int) -> tuple[list[Window], int]:
        planner = StreamingPlanner(VadSettings(), block_seconds=20.0)
        out: list[Window] = []
        first_at = 0
        for off in range(0, samples.shape[0], step):
            got = planner.feed(samples[off : off + step])
            if got and not out:
                first_at = off + step
            out += got
        return out + planner.finish(), first_at

    windows, first_at = run(SR // 3)
    assert windows and first_at < samples.shape[0] // 2  # the first window long before the end
    assert run(7 * SR + 123)[0] == windows
    assert all(w.seconds <= 30.0 + 1e-6 for w in windows)
    assert all(p.end <= n.start for p, n in itertools.pairwise(windows))
    for start, end, _ in clip.spans:  # every sentence inside one window
        assert any(w.start_seconds <= start + 0.2 and end - 0.2 <= w.end_seconds for w in windows)

"""Raw faster-whisper in its own process, the baseline for start-up time and memory.

python -m bench._rawproc startup                      # load + warm up, print READY, exit
python -m bench._rawproc memory LONG.npy CLIP.npy N   # print JSON: RSS after load, peak over the
                                                      # long file, RSS after 20 and N clip calls
"""

from __future__ import annotations

import json
import sys

import numpy as np

from bench.common import LANGUAGE, SR, load_whisper, proc_status, raw_transcribe


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else ""
    model = load_whisper()
    if mode == "startup":
        t = np.arange(SR, dtype=np.float32) / SR
        tone = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        segments, _ = model.transcribe(tone, language=LANGUAGE, beam_size=5, word_timestamps=True)
        list(segments)
        print("READY", flush=True)
        return 0
    if mode == "memory":
        long, clip, n = np.load(argv[1]), np.load(argv[2]), int(argv[3])
        out: dict[str, object] = {"after_load": proc_status()}
        _, wall, _ = raw_transcribe(model, long, vad_filter=True)
        out["after_long"] = proc_status()
        out["long_wall_seconds"] = round(wall, 3)
        for i in range(n):
            raw_transcribe(model, clip)
            if i + 1 == min(20, n):
                out["after_20"] = proc_status()
        out["after_n"] = proc_status()
        out["n"] = n
        print(json.dumps(out), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""What every measure gets: the mode, the corpus, the shared stack, lazily loaded baselines."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import THREADS, StackHolder, load_whisper, log
from bench.corpus import Corpus


@dataclass
class Context:
    quick: bool
    out: Path
    tmp: str
    corpus: Corpus
    stack: StackHolder
    results: dict[str, Any] = field(default_factory=dict)  # measures finished so far
    _raw: Any = None
    _engine: Any = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def raw(self) -> Any:
        """faster-whisper WhisperModel (cpu, int8, cpu_threads=THREADS), loaded once."""
        async with self._lock:
            if self._raw is None:
                self._raw = await asyncio.to_thread(load_whisper)
                log(f"raw faster-whisper loaded ({THREADS} threads)")
            return self._raw

    async def engine(self) -> Any:
        """The transcriber's Engine (same settings as the stack's transcriber), loaded once."""
        from services.transcriber.config import TranscriberSettings
        from services.transcriber.engine import Engine

        async with self._lock:
            if self._engine is None:
                eng = Engine(TranscriberSettings(host="127.0.0.1", cpu_threads=THREADS))
                await asyncio.to_thread(eng.load)
                self._engine = eng
                log("in-process transcriber engine loaded")
            return self._engine

    def npy(self, name: str, samples: np.ndarray) -> str:
        path = os.path.join(self.tmp, f"{name}.npy")
        if not os.path.exists(path):
            np.save(path, samples)
        return path

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

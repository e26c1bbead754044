"""The web page in a real browser: Debian's headless Chromium driven by Selenium through the system
chromedriver (nothing downloaded), against the in-process gateway. It uploads a recording and checks
the transcript, downloads subtitles, runs live captions from a fake microphone fed with a WAV of real
speech, and follows a job to completion. A screenshot of each state goes to the run's output
directory (STT_TEST_ARTIFACTS, default tests/.artifacts/browser)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.gateway.server import Gateway
from tests.support import audio
from tests.support.speech import by_name, load_16k
from tests.support.text import wer

pytestmark = pytest.mark.timeout(240)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("STT_TEST_ARTIFACTS", ROOT / "tests" / ".artifacts")) / "browser"
JFK = by_name("jfk_inaugural_16k")
LIBRI = by_name("librispeech_2412-153948-0000")


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone's input: 1 s of silence, a real recording, 2 s of silence."""
    samples = np.concatenate([audio.silence(1.0), load_16k(LIBRI), audio.silence(2.0)])
    path = tmp_path_factory.mktemp("mic") / "libri.wav"
    path.write_bytes(audio.encode(samples, "wav"))
    return path


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(mic_wav: Path, downloads: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromium-driver are needed: bash scripts/install-system-deps.sh")
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager never fetches anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium Manager does not run
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1280,1100", "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}%noloop",
        "--disable-background-networking", "--no-first-run", "--disable-component-update",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Selenium blocks; the gateway runs on the test's event loop, so the browser work runs in a thread."""
    import asyncio

    return asyncio.to_thread(fn)


async def test_page_file_transcript_downloads_and_job(browser: Any, gateway: Gateway, downloads: Path):
    from selenium.webdriver.common.by import By

    url = f"http://127.0.0.1:{gateway.http_port}/"

    def scenario() -> dict[str, Any]:
        d = browser
        d.get(url)
        wait_for(lambda: "model:" in d.find_element(By.ID, "server-status").text, 20, "the model name")
        shot(d, "01-page-loaded")
        d.find_element(By.ID, "file-input").send_keys(str(JFK.path))
        status = d.find_element(By.ID, "file-status")
        wait_for(lambda: status.get_attribute("data-done") or "error" in status.get_attribute("class"), 90,
                 "the transcript")  # fmt: skip
        words = d.find_elements(By.CSS_SELECTOR, "#transcript .word")
        text = " ".join(w.text for w in words)
        starts = [float(w.get_attribute("data-start")) for w in words]
        api_words = d.execute_script("return currentResult.words.length")
        # Click a word in the middle: the player jumps there.
        target = words[len(words) // 2]
        target.click()
        position = wait_for(
            lambda: d.execute_script("return document.getElementById('player').currentTime") or None, 10,
            "the player to move",
        )  # fmt: skip
        shot(d, "02-file-transcribed")
        d.find_element(By.ID, "download-srt").click()
        d.find_element(By.ID, "download-vtt").click()
        srt = wait_for(lambda: _downloaded(downloads, ".srt"), 10, "the SRT download")
        vtt = wait_for(lambda: _downloaded(downloads, ".vtt"), 10, "the VTT download")
        # The same file as a job: it shows up in the jobs list and its bar fills.
        d.find_element(By.ID, "submit-job").click()
        # The list is re-rendered every second: read the completed row in one script.
        row = wait_for(
            lambda: d.execute_script(
                """const r = document.querySelector('#jobs tbody tr[data-status="completed"]');
                   if (!r) return null;
                   const bar = r.querySelector('progress');
                   return {bar: [bar.value, bar.max], links: [...r.querySelectorAll('.links a')].map(a => a.textContent)};"""
            ),
            90, "the job to complete in the list",
        )  # fmt: skip
        shot(d, "03-job-completed")
        return {
            "text": text,
            "starts": starts,
            "api_words": api_words,
            "clicked": float(target.get_attribute("data-start")),
            "position": position,
            "srt": srt,
            "vtt": vtt,
            "bar": tuple(row["bar"]),
            "links": row["links"],
        }

    got = await run_in_thread(scenario)
    assert wer(JFK.text, got["text"]) <= 0.15, got["text"]
    assert got["starts"] == sorted(got["starts"]) and len(got["starts"]) == got["api_words"] >= 15
    assert abs(got["position"] - got["clicked"]) < 0.5
    assert got["srt"].startswith("1\n00:00:00,") and " --> " in got["srt"]
    assert got["vtt"].startswith("WEBVTT\n\n")
    assert (
        wer(
            JFK.text,
            " ".join(
                line for line in got["srt"].splitlines() if line and "-->" not in line and not line.isdigit()
            ),
        )
        <= 0.15
    )
    assert got["bar"][0] == got["bar"][1] > 0
    assert got["links"] == ["text", "srt", "vtt", "json"]


def _downloaded(folder: Path, suffix: str) -> str | None:
    for path in folder.iterdir():
        if path.suffix == suffix:
            return path.read_text()
    return None


async def test_live_captions_from_a_fake_microphone(browser: Any, gateway: Gateway):
    from selenium.webdriver.common.by import By

    url = f"http://127.0.0.1:{gateway.http_port}/"

    def scenario() -> dict[str, Any]:
        d = browser
        d.get(url)
        wait_for(lambda: "model:" in d.find_element(By.ID, "server-status").text, 20, "the model name")
        d.find_element(By.ID, "live-start").click()
        section = d.find_element(By.ID, "live-section")
        wait_for(lambda: section.get_attribute("data-state") == "listening", 15, "the microphone")
        interims: list[str] = []
        shot_taken = False
        deadline = time.monotonic() + LIBRI.seconds + 10
        while time.monotonic() < deadline:
            interim = d.find_element(By.CSS_SELECTOR, "#captions .interim").text
            finals = d.find_elements(By.CSS_SELECTOR, "#captions .final")
            if interim:
                interims.append(interim)
                if finals and not shot_taken:  # black finals and a grey interim together
                    shot(d, "04-live-captions-interim")
                    shot_taken = True
            if wer(LIBRI.text, " ".join(f.text for f in finals)) <= 0.15:
                break
            time.sleep(0.1)
        d.find_element(By.ID, "live-stop").click()
        wait_for(lambda: section.get_attribute("data-state") == "stopped", 30, "the stream to end")
        shot(d, "05-live-captions-final")
        finals = d.find_elements(By.CSS_SELECTOR, "#captions .final")
        colors = {
            "final": finals[0].value_of_css_property("color") if finals else "",
            "interim": d.find_element(By.CSS_SELECTOR, "#captions .interim").value_of_css_property("color"),
        }
        return {
            "text": " ".join(f.text for f in finals),
            "interims": interims,
            "status": d.find_element(By.ID, "live-status").text,
            "colors": colors,
        }

    got = await run_in_thread(scenario)
    assert wer(LIBRI.text, got["text"]) <= 0.25, got["text"]
    assert got["interims"], "no interim text was shown"
    assert got["status"] == "stopped"
    assert got["colors"]["final"] in ("rgba(0, 0, 0, 1)", "rgb(0, 0, 0)")
    assert got["colors"]["interim"] in ("rgba(156, 163, 175, 1)", "rgb(156, 163, 175)")

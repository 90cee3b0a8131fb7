"""Decompression bombs against a real ``python -m service`` process: a few kB that declare billions of
pixels are refused with 413 fast, and refusing a hundred of them does not grow the process's peak
memory (VmHWM, reset before each batch through /proc/<pid>/clear_refs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer
from tests.hostile import bomb_bmp, bomb_gif, bomb_ico, bomb_jpeg, bomb_tiff, valid_image
from tests.images import bomb_png

ROUNDS = 100
MAX_LATENCY_S = 0.100
MAX_PEAK_GROWTH_KB = 50 * 1024


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # "5": VmHWM := VmRSS (Linux >= 4.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LiveServer({}, tmp_path_factory.mktemp("bombs") / "server.log")  # default limits: 40 Mpx, 10 MB
    s.wait_ready()
    yield s
    s.stop()


TOO_MANY_PIXELS = (413, "image has too many pixels")


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        pytest.param(bomb_png, TOO_MANY_PIXELS, id="png-50000x50000"),
        pytest.param(bomb_jpeg, TOO_MANY_PIXELS, id="jpeg-50000x50000"),
        pytest.param(bomb_gif, TOO_MANY_PIXELS, id="gif-50000x50000"),
        pytest.param(bomb_tiff, TOO_MANY_PIXELS, id="tiff-50000x50000"),
        pytest.param(bomb_bmp, TOO_MANY_PIXELS, id="bmp-50000x50000"),
        # 81 Mpx: past the service's 40 Mpx limit, short of Pillow's own bomb check (89 Mpx)
        pytest.param(lambda: bomb_ico(9_000, 9_000), TOO_MANY_PIXELS, id="ico-with-9000x9000-png-inside"),
        # 16 Mpx, within the limit, but no icon frame exceeds 256x256: Pillow would decode it while
        # opening, which the service does on the event loop for every image
        pytest.param(lambda: bomb_ico(4_000, 4_000), (400, "could not decode image"),
                     id="ico-with-4000x4000-png-inside"),
    ],
)
def test_predict_bomb_refused_fast_without_memory_growth(server, make: Callable[[], bytes],
                                                         refusal: tuple[int, str]):
    bomb = make()
    assert len(bomb) < 100_000, len(bomb)
    pid = server.proc.pid
    with httpx.Client(base_url=server.url, timeout=30) as c:
        warm = c.post("/predict", content=valid_image("png", 3), headers={"content-type": "image/png"})
        assert warm.status_code == 200, warm.text
        reset_peak(pid)
        before = memory_kb(pid)
        latencies = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            r = c.post("/predict", content=bomb, headers={"content-type": "application/octet-stream"})
            latencies.append(time.perf_counter() - started)
            assert r.status_code == refusal[0], r.text
            assert r.json() == {"detail": refusal[1]}, r.text
        after = memory_kb(pid)
        ok = c.post("/predict", content=valid_image("png", 4), headers={"content-type": "image/png"})
    growth = after["VmHWM"] - before["VmHWM"]
    print(f"{ROUNDS} refused, slowest {max(latencies) * 1000:.1f} ms, peak memory +{growth / 1024:.1f} MB "
          f"(VmHWM {before['VmHWM'] // 1024} -> {after['VmHWM'] // 1024} MB)")
    assert max(latencies) < MAX_LATENCY_S, sorted(latencies)[-5:]
    assert growth < MAX_PEAK_GROWTH_KB, (before, after)
    assert ok.status_code == 200, ok.text
    assert ok.json()["predictions"][0]["top_k"][0]["label"] == "4", ok.text

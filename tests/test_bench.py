"""The benchmark's own arithmetic: wrk's output read right, medians per cell, targets pointing the right way.
(The figures themselves come from running it: `make bench`; no timing is asserted here.)"""

from __future__ import annotations

import pytest

from bench.run import PAYLOADS, median_alone, median_cells, parse_ms, targets


@pytest.mark.parametrize(
    ("text", "ms"),
    [("850.00us", 0.85), ("3.02ms", 3.02), ("1.25s", 1250.0), ("2.00m", 120_000.0)],
)
def test_parse_ms_reads_every_wrk_unit(text, ms):
    assert parse_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "3ms5", "12h", "fast"])
def test_parse_ms_refuses_what_wrk_never_prints(text):
    with pytest.raises(ValueError, match="unparsable"):
        parse_ms(text)


def cell(req_s: float, p50: float = 10.0, p99: float = 20.0, images: int = 1) -> dict:
    return {"req_s": req_s, "img_s": req_s * images, "p50_ms": p50, "p99_ms": p99, "non_2xx": 0}


def test_median_cells_takes_the_median_of_each_cell_over_repeats():
    runs = [{"cells": {("resnet20", "batching_on", "png32", 32): cell(v)}} for v in (100.0, 300.0, 200.0)]
    assert median_cells(runs)["resnet20"]["batching_on"]["png32"][32]["req_s"] == 200.0


def server(req_s: float, p50: float, p99: float) -> dict:
    return {p: {c: cell(req_s, p50, p99, 32 if p == "multipart32" else 1) for c in (1, 8, 32)} for p in PAYLOADS}


def test_targets_met_when_batching_doubles_throughput_and_halves_tails():
    cells = {"resnet20": {"batching_on": server(1000.0, 5.0, 40.0), "batching_off": server(400.0, 5.0, 100.0),
                          "naive_app": server(400.0, 5.0, 100.0)}}
    alone = {"resnet20": {"best_img_s": 40_000.0}}
    rows = {name: (value, met) for name, value, _, met in targets(cells, alone)}
    assert rows["c=32 PNG req/s, on / off"] == (2.5, True), rows
    assert rows["c=32 PNG p99, on / off"] == (0.4, True), rows
    assert rows["c=1 PNG p50, on / off"] == (1.0, True), rows
    assert rows["multipart32 img/s, on / ORT best batch"] == (0.8, True), rows


def test_targets_missed_when_batching_is_slower():
    cells = {"resnet20": {"batching_on": server(300.0, 9.0, 150.0), "batching_off": server(400.0, 5.0, 100.0),
                          "naive_app": server(400.0, 5.0, 100.0)}}
    alone = {"resnet20": {"best_img_s": 40_000.0}}
    rows = {name: met for name, _, _, met in targets(cells, alone)}
    assert not any(rows.values()), rows


def test_median_alone_picks_best_batch_from_the_medians():
    pairs = ((700, 1500), (750, 900), (800, 1400))
    runs = [{"device": "cpu", "modes": {"numpy": {1: b1, 32: b32}}} for b1, b32 in pairs]
    alone = median_alone(runs)
    assert alone["batch1_img_s"] == 750 and alone["best_batch"] == 32 and alone["best_img_s"] == 1400, alone

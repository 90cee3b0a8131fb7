"""The benchmark's own arithmetic: wrk's and h2load's output read right, medians per cell, targets pointing the right
way, and the zero-cost model obeying the contract. (The figures themselves come from running it: `make bench`; no
timing is asserted here.)"""

from __future__ import annotations

import asyncio

import onnx
import pytest

from bench import open_loop
from bench.harness import wait_ready
from bench.open_loop import parse_rates
from bench.run import PAYLOADS, markdown, median_alone, median_cells, named_file, parse_ms, targets
from bench.zero_cost import zero_cost_model
from service.settings import Settings
from tests.images import encode, one_per_class


@pytest.mark.parametrize(
    ("text", "ms"),
    [("850.00us", 0.85), ("3.02ms", 3.02), ("1.25s", 1250.0), ("2.00m", 120_000.0)],
)
def test_parse_ms_reads_every_wrk_unit(text, ms):
    assert parse_ms(text) == pytest.approx(ms)


def test_parse_wrk_counts_only_2xx_as_served():
    from bench.run import parse_wrk

    out = """Running 3s test @ http://127.0.0.1:8000/predict
  1 threads and 32 connections
  Latency Distribution
     50%   27.00ms
     90%   40.00ms
     99%   47.00ms
  4000 requests in 3.00s, 3.10MB read
  Non-2xx or 3xx responses: 1000
Requests/sec:   1333.33
Transfer/sec:      1.03MB
"""
    x = parse_wrk(out)
    assert (x["requests"], x["non_2xx"], x["all_req_s"]) == (4000, 1000, 1333.33), x
    assert x["req_s"] == pytest.approx(1000.0, rel=1e-4), x
    assert (x["p50_ms"], x["p99_ms"]) == (27.0, 47.0), x


@pytest.mark.parametrize("text", ["", "3ms5", "12h", "fast"])
def test_parse_ms_refuses_what_wrk_never_prints(text):
    with pytest.raises(ValueError, match="unparsable"):
        parse_ms(text)


def test_named_file_reads_name_and_path(default_model):
    assert named_file(f"int8={default_model}") == ("int8", default_model.resolve())


@pytest.mark.parametrize("text", [
    pytest.param("{model}", id="no-name"),
    pytest.param("={model}", id="empty-name"),
    pytest.param("int8={model}.missing", id="no-such-file"),
])
def test_named_file_refuses_what_is_not_name_and_file(default_model, text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=PATH"):
        named_file(text.format(model=default_model))


def cell(req_s: float, p50: float = 10.0, p99: float = 20.0, images: int = 1) -> dict:
    return {"req_s": req_s, "img_s": req_s * images, "p50_ms": p50, "p99_ms": p99, "non_2xx": 0}


def test_median_cells_takes_the_median_of_each_cell_over_repeats():
    runs = [{"cells": {("resnet20", "batching_on", "png32", 32): cell(v)}} for v in (100.0, 300.0, 200.0)]
    assert median_cells(runs)["resnet20"]["batching_on"]["png32"][32]["req_s"] == 200.0


def server(req_s: float, p50: float, p99: float) -> dict:
    return {p: {c: cell(req_s, p50, p99, 32 if p == "multipart32" else 1) for c in (1, 8, 32)} for p in PAYLOADS}


def test_targets_met_when_the_service_doubles_the_naive_app_and_leads_torchserve():
    cells = {"resnet20": {"batching_on": server(1000.0, 5.0, 40.0), "naive_app": server(400.0, 5.0, 100.0),
                          "torchserve": server(800.0, 5.0, 60.0)}}
    cells["resnet20"]["batching_on"]["png32"][64] = cell(1000.0)
    cells["resnet20"]["torchserve"]["png32"][64] = cell(700.0)
    cells["resnet20"]["naive_app"]["jpeg640"][8] = cell(500.0)  # the cell closest to the naive app
    alone = {"resnet20": {"best_img_s": 40_000.0}}
    rows = {name: (round(value, 3), met) for name, value, _, met in targets(cells, alone)}
    assert rows == {
        "c=32 PNG req/s, on / naive app": (2.5, True),
        "c=32 PNG p99, on / naive app": (0.4, True),
        "c=32 PNG req/s, on / TorchServe": (1.25, True),
        "c=64 PNG req/s, on / TorchServe": (1.429, True),
        "every cell req/s, on / naive app (lowest: jpeg640 c=8)": (2.0, True),
        "c=1 PNG p50, on / naive app": (1.0, True),
        "multipart32 img/s, on / ORT best batch": (0.8, True),
    }, rows


def test_targets_missed_when_the_service_is_slower_than_the_naive_app():
    cells = {"resnet20": {"batching_on": server(300.0, 9.0, 150.0), "naive_app": server(400.0, 5.0, 100.0)}}
    alone = {"resnet20": {"best_img_s": 40_000.0}}
    rows = {name: met for name, _, _, met in targets(cells, alone)}
    assert len(rows) == 5 and not any(rows.values()), rows


def test_median_alone_picks_best_batch_from_the_medians():
    pairs = ((700, 1500), (750, 900), (800, 1400))
    runs = [{"device": "cpu", "modes": {"numpy": {1: b1, 32: b32}}} for b1, b32 in pairs]
    alone = median_alone(runs)
    assert alone["batch1_img_s"] == 750 and alone["best_batch"] == 32 and alone["best_img_s"] == 1400, alone


# --- the zero-cost model --------------------------------------------------------------------------------------------


def test_zero_cost_model_obeys_contract_and_serves_through_the_same_path(tmp_path, default_model):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    path = zero_cost_model(default_model, tmp_path / "zero.onnx")
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops == ["GlobalAveragePool", "Flatten", "Gemm", "Softmax"], ops  # nothing that costs per pixel but a mean
    images = [img for img, _ in one_per_class()[:2]]
    with TestClient(create_app(Settings(model_path=path))) as c:
        wait_ready(c)
        card = c.get("/model").json()
        answers = [c.post("/predict", content=encode(img, "PNG"), headers={"content-type": "image/png"})
                   for img in images]
    assert card["metadata"]["name"] == "zero-cost" and card["labels"] == [str(d) for d in range(10)], card
    for r in answers:
        assert r.status_code == 200, r.text
        assert sum(r.json()["predictions"][0]["probabilities"]) == pytest.approx(1.0, abs=1e-5), r.text
    first, second = (r.json()["predictions"][0]["probabilities"] for r in answers)
    assert first != second  # the output depends on the image, so a batch mix-up would still show


def test_decode_bench_times_the_service_path_on_every_single_image_payload(default_model, capsys):
    from bench.decode import main

    main(["--model", str(default_model), "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "default.onnx: L, input (32, 32), fit to content True", lines
    timed = {(line.split()[0], line.split("  ")[1].strip()): float(line.split()[-2]) for line in lines[1:]
             if "service" in line}
    assert set(timed) == {(p, f"service, jpeg_luma {s}") for p in ("png32", "jpeg640", "jpeg12mp")
                          for s in ("true", "false")}, lines
    assert not any(line.startswith("png32") and "decode:" in line for line in lines), lines
    assert all(us > 0 for us in timed.values()), lines


# --- open loop ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "capacity", "rates"),
    [
        pytest.param("2x", 1000.0, [2000.0], id="multiple-of-capacity"),
        pytest.param("1500", None, [1500.0], id="absolute"),
        pytest.param("0.5x,1x,2.5x", 400.0, [200.0, 400.0, 1000.0], id="list"),
    ],
)
def test_parse_rates_resolves_against_capacity(text, capacity, rates):
    assert [r.resolve(capacity) for r in parse_rates(text)] == rates


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("2X", id="capital-x"),
        pytest.param("x2", id="factor-after"),
        pytest.param("0x", id="zero"),
        pytest.param("-100", id="negative"),
        pytest.param("fast", id="word"),
        pytest.param("2x,,3x", id="empty-item"),
    ],
)
def test_parse_rates_refuses_malformed(text):
    with pytest.raises(ValueError, match="unparsable open-loop rate"):
        parse_rates(text)


def test_relative_rate_without_capacity_refused():
    with pytest.raises(ValueError, match="no capacity was measured"):
        parse_rates("2x")[0].resolve(None)


@pytest.mark.parametrize(
    ("rate", "seconds", "planned"),
    [
        pytest.param(2500, 10, (5, 2, 25_000), id="fast-5-every-2ms"),
        pytest.param(130, 2, (3, 23, 261), id="uneven-3-every-23ms-within-1pct"),
        pytest.param(50, 4, (1, 20, 200), id="slow-1-every-20ms"),
        pytest.param(1, 3, (1, 991, 3), id="slowest-first-period-within-1pct"),
    ],
)
def test_plan_spreads_the_rate_over_short_periods(rate, seconds, planned):
    per_period, period_ms, n = open_loop.plan(rate, seconds)
    assert (per_period, period_ms, n) == planned
    assert per_period * 1000 / period_ms == pytest.approx(rate, rel=0.01)


@pytest.mark.parametrize(("rate", "seconds"), [pytest.param(0.5, 10, id="under-1-per-s"),
                                               pytest.param(100, 0, id="no-time")])
def test_plan_refuses_what_h2load_cannot_pace(rate, seconds):
    with pytest.raises(ValueError, match="at least 1 req/s"):
        open_loop.plan(rate, seconds)


H2LOAD_LOG = "\n".join(f"{1_700_000_000_000_000 + i * 1000}\t{status}\t{us}" for i, (status, us) in enumerate(
    [(200, 1000), (200, 3000), (200, 2000), (429, 150), (429, 170), (503, 90), (-1, 30_000_000), (200, 4000),
     (404, 300)])) + "\n"


def test_summarise_counts_goodput_refusals_and_failures_from_the_log():
    x = open_loop.summarise(open_loop.parse_log(H2LOAD_LOG), sent=10, offered_req_s=10.0, elapsed_s=2.0)
    assert (x["ok"], x["status_429"], x["status_5xx"], x["other_status"]) == (4, 2, 1, 1), x
    assert x["errors"] == 2, x  # the failed stream (-1) and the one request missing from the log
    assert x["goodput_req_s"] == 2.0, x
    # latency of the 2xx only: the quick 429s and the 30 s failure do not flatter or spoil it
    assert x["p50_ms"] == pytest.approx(2.5) and x["p99_ms"] == pytest.approx(3.97), x
    assert x["refused_p50_ms"] == pytest.approx(0.16) and x["refused_p99_ms"] == pytest.approx(0.1698), x


@pytest.mark.parametrize("line", [pytest.param("1700000000000000\t200", id="two-columns"),
                                  pytest.param("1700000000000000\tOK\t1000", id="status-not-a-number"),
                                  pytest.param("garbage", id="garbage")])
def test_parse_log_refuses_lines_h2load_never_writes(line):
    with pytest.raises(ValueError, match="unparsable h2load log line"):
        open_loop.parse_log(line + "\n")


@pytest.mark.parametrize(("out", "seconds"), [("finished in 10.02s, 2497.00 req/s", 10.02),
                                              ("finished in 512.50ms, 39.02 req/s", 0.5125),
                                              ("finished in 850us, 1176.47 req/s", 0.00085)])
def test_elapsed_seconds_reads_every_h2load_unit(out, seconds):
    assert open_loop.elapsed_seconds("starting benchmark...\n" + out) == pytest.approx(seconds)


def test_targets_judge_zero_cost_and_open_loop_when_measured():
    zero = {"batching_on": {"png32": {1: cell(1000.0, p50=0.5), 64: cell(4500.0)}},
            "naive_app": {"png32": {1: cell(1500.0, p50=0.6), 64: cell(1400.0)}}}
    overload = {"goodput_req_s": 850.0, "capacity_req_s": 1000.0, "status_5xx": 3, "p99_ms": 250.0, "status_429": 900,
                "refused_p99_ms": 400.0}
    open_cells = {"resnet20": {"batching_on": {"png32": {"2x": overload}}}}
    rows = {name: (round(value, 3), met) for name, value, _, met in targets({"zero": zero}, {}, open_cells)}
    assert rows == {
        "zero-cost c=64 PNG req/s, on / naive app": (3.214, True),
        "zero-cost c=1 PNG p50, on / naive app": (0.833, True),
        "open loop 2x capacity, PNG goodput / capacity": (0.85, False),
        "open loop 2x capacity, 5xx": (3, False),
        "open loop 2x capacity, accepted p99 ms / deadline ms": (0.025, True),
        "open loop 2x capacity, 429 p99 ms": (400.0, False),
    }, rows


def test_markdown_shows_open_loop_row_with_goodput_share():
    x = {"offered_req_s": 2000.0, "capacity_req_s": 1000.0, "goodput_req_s": 930.0, "status_429": 1100, "status_5xx": 0,
         "errors": 0, "p50_ms": 4.0, "p99_ms": 45.0, "refused_p50_ms": 1.5, "refused_p99_ms": 30.0, "elapsed_s": 10.1,
         "client_cores": 0.05}
    meta = {"date": "2026-12-02", "machine": "test", "repeats": 1, "seconds": 2}
    md = markdown({}, {}, [], meta, {"resnet20": {"batching_on": {"png32": {"2x": x}}}})
    row = ("| resnet20 | batching_on | png32 | 2x | 2000 | 1000 | 930 (0.93) | 1100 | 0 | 0 | 4.0/45.0 | 1.5/30.0 "
           "| 10.1 | 0.05 | - |")
    assert row in md, md
    x.update(machine_user_cores=0.7, machine_nice_cores=0.9, machine_kernel_cores=0.3, machine_idle_cores=0.1)
    md = markdown({}, {}, [], meta, {"resnet20": {"batching_on": {"png32": {"2x": x}}}})
    assert row.replace("| - |", "| 0.70 / 0.90 / 0.30 / 0.10 |") in md, md


@pytest.mark.parametrize(
    ("before", "after", "split"),
    [
        pytest.param("cpu  100 0 50 850 0 0 0 0 0 0", "cpu  150 100 70 870 0 5 5 0 0 0",
                     {"user": 0.5, "nice": 1.0, "kernel": 0.3, "idle": 0.2, "steal": 0.0}, id="two-cores-busy"),
        pytest.param("cpu  0 0 0 0 0 0 0 0", "cpu  0 0 0 180 20 0 0 0", {"user": 0, "nice": 0, "kernel": 0,
                     "idle": 2.0, "steal": 0}, id="idle-with-iowait"),
    ],
)
def test_cpu_split_reads_proc_stat_as_cores(before, after, split):
    got = open_loop.cpu_split(open_loop.proc_stat(before + "\ncpu0 1 2 3\n"), open_loop.proc_stat(after), cores=2)
    assert got == pytest.approx({f"machine_{k}_cores": v for k, v in split.items()}), got
    assert sum(got.values()) == pytest.approx(2.0)


@pytest.mark.parametrize("text", ["", "intr 1 2 3", "cpu 1 2"], ids=["empty", "not-the-cpu-line", "too-few-fields"])
def test_proc_stat_refuses_unparsable_first_line(text):
    with pytest.raises(ValueError, match="unparsable /proc/stat"):
        open_loop.proc_stat(text)


def test_cpu_split_without_readings_is_empty():
    assert open_loop.cpu_split(None, {"user": 1}, cores=2) == {}


def test_path_cost_drives_the_app_in_process(tmp_path, default_model):
    from bench.path_cost import measure
    from bench.run import write_payloads

    body, ctype, _ = write_payloads(tmp_path)["png32"]
    got = asyncio.run(measure(Settings(model_path=zero_cost_model(default_model, tmp_path / "zero.onnx"), grpc_port=0,
                                       access_log=False), body.read_bytes(), ctype, concurrency=4, requests=40))
    assert got["non200"] == 0, got
    assert 0 < got["loop_us"] <= got["cpu_us"], got

"""Triton's HTTP extensions that its clients call (repository index, model configuration, statistics,
classification) and compressed bodies (gzip/deflate requests inflated under the upload limit, gzip answers),
through tritonclient.http against ``python -m service`` as a real process."""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from bench.harness import Server as LiveServer
from bench.harness import serve_service, start_service
from service.protocol import EXTENSIONS
from tests.images import encode, one_per_class

LIMIT = 200_000
ENV = {"RESNET_MAX_UPLOAD_BYTES": str(LIMIT), "RESNET_MAX_BATCH_SIZE": "8", "RESNET_MAX_BATCH_DELAY_MS": "3"}
PNGS = [encode(img, "PNG") for img, _ in one_per_class()]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    with serve_service(ENV, tmp_path_factory.mktemp("extensions") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


def images(data: list[bytes]) -> triton.InferInput:
    inp = triton.InferInput("input", [len(data)], "BYTES")
    inp.set_data_from_numpy(np.array(data, dtype=np.object_))
    return inp


def test_server_metadata_advertises_each_extension(http):
    r = http.get("/v2")
    assert r.status_code == 200, r.text
    assert r.json()["extensions"] == EXTENSIONS
    assert {"classification", "model_repository", "model_configuration", "statistics"} <= set(EXTENSIONS)


# --- model repository, configuration ---------------------------------------------------------------------------


def test_repository_index_lists_the_model_ready(client, spec):
    assert client.get_model_repository_index() == [{"name": "default", "version": spec.version, "state": "READY"}]


def test_repository_index_of_a_model_that_failed_to_load(tmp_path):
    server = start_service({"RESNET_MODEL_PATH": str(tmp_path / "missing.onnx")}, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.post(server.url + "/v2/repository/index", json={"ready": False}, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, server.log_path.read_text()
                time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json() == []  # never loaded: nothing to name; readiness says why
    finally:
        server.stop()


def test_repository_index_ready_only_filter(http, spec):
    r = http.post("/v2/repository/index", json={"ready": True})
    assert r.status_code == 200, r.text
    assert r.json() == [{"name": "default", "version": spec.version, "state": "READY"}]


@pytest.mark.parametrize("versioned", [pytest.param(False, id="unversioned"), pytest.param(True, id="versioned")])
def test_model_config_says_what_triton_tools_read(client, spec, versioned):
    config = client.get_model_config("default", spec.version if versioned else "")
    assert config == {
        "name": "default", "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 8,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [1, 32, 32]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]},
                   {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}],
        "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": 3000},
    }


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/v2/models/resnet/config", 404, id="config-unknown-model"),
        pytest.param("/v2/models/default/versions/1/config", 404, id="config-unknown-version"),
        pytest.param("/v2/models/resnet/stats", 404, id="stats-unknown-model"),
        pytest.param("/v2/models/default/versions/1/stats", 404, id="stats-unknown-version"),
    ],
)
def test_extension_of_unknown_model_is_404(http, path, status):
    r = http.get(path)
    assert r.status_code == status, r.text
    assert "unknown" in r.json()["error"], r.text


# --- statistics ----------------------------------------------------------------------------------------------------


def model_stats(client: triton.InferenceServerClient) -> dict:
    (stats,) = client.get_inference_statistics("default")["model_stats"]
    return stats


def test_statistics_count_what_the_batcher_ran(client, spec):
    before = model_stats(client)
    client.infer("default", [images(PNGS)])  # 10 images: batches of at most 8
    client.infer("default", [images(PNGS[:1])])
    after = model_stats(client)
    assert (after["name"], after["version"]) == ("default", spec.version)
    assert after["inference_count"] - before["inference_count"] == 11
    assert after["execution_count"] - before["execution_count"] >= 3  # 10 -> at least 8 + 2, then 1
    runs = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert max(runs) <= 8 and sum(size * n for size, n in runs.items()) == after["inference_count"], after
    stats, was = after["inference_stats"], before["inference_stats"]
    for name in ("success", "queue", "compute_input", "compute_infer"):
        assert stats[name]["count"] - was[name]["count"] == 2, (name, stats)
        assert stats[name]["ns"] > was[name]["ns"], (name, stats)
    assert stats["success"]["ns"] >= stats["compute_infer"]["ns"]  # a request's time includes its batch's run
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0


def test_statistics_count_failures(client, http):
    before = model_stats(client)["inference_stats"]["fail"]["count"]
    r = http.post("/v2/models/default/infer", json={"inputs": [{
        "name": "input", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]})  # "hello": not an image
    assert r.status_code == 400, r.text
    assert model_stats(client)["inference_stats"]["fail"]["count"] == before + 1


def test_statistics_for_every_model_is_the_one(client, http):
    r = http.get("/v2/models/stats")
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()["model_stats"]] == ["default"]


# --- classification ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [pytest.param(True, id="binary"), pytest.param(False, id="json")])
@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_classification_gives_top_k_as_triton_does(client, binary, output):
    full = client.infer("default", [images(PNGS)]).as_numpy(output)
    result = client.infer("default", [images(PNGS)], outputs=[
        triton.InferRequestedOutput(output, binary_data=binary, class_count=3)])
    top = result.as_numpy(output)
    assert result.get_output(output)["datatype"] == "BYTES"
    assert top.shape == (10, 3)
    for digit, (row, values) in enumerate(zip(top, full, strict=True)):
        fields = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
        assert [int(i) for _, i, _ in fields] == list(np.argsort(-values)[:3])
        assert fields[0][1] == fields[0][2] == str(digit)  # the top class is the digit, and its label says so
        np.testing.assert_allclose([float(v) for v, _, _ in fields], np.sort(values)[::-1][:3], atol=1e-5)


def test_classification_count_above_classes_gives_every_class(client):
    result = client.infer("default", [images(PNGS[:1])], outputs=[
        triton.InferRequestedOutput("probabilities", class_count=50)])
    assert result.as_numpy("probabilities").shape == (1, 10)


# --- compressed bodies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_algorithm", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_algorithm", [None, "gzip", "deflate"])
def test_tritonclient_compression_gives_the_same_answer(client, request_algorithm, response_algorithm):
    plain = client.infer("default", [images(PNGS)]).as_numpy("probabilities")
    packed = client.infer("default", [images(PNGS)], request_compression_algorithm=request_algorithm,
                          response_compression_algorithm=response_algorithm).as_numpy("probabilities")
    np.testing.assert_array_equal(packed, plain)


def test_response_gzipped_when_asked_and_worth_it(http):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 1, 32, 32], "data": [0.0] * 8192}]}
    big = http.post("/v2/models/default/infer", json=body, headers={"accept-encoding": "gzip"})
    assert big.status_code == 200, big.text
    assert big.headers["content-encoding"] == "gzip"
    small = http.get("/v2/health/ready", headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in small.headers, small.headers
    plain = http.post("/v2/models/default/infer", json=body, headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json() == big.json()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_predict_accepts_compressed_image(http, encoding):
    packed = gzip.compress(PNGS[3]) if encoding == "gzip" else zlib.compress(PNGS[3])
    r = http.post("/predict", content=packed, headers={"content-type": "image/png", "content-encoding": encoding})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["top_k"][0]["label"] == "3"


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def gzip_bomb(inflated: int) -> bytes:
    """``inflated`` zero bytes, gzipped a megabyte at a time (never held whole)."""
    packer, zeros = zlib.compressobj(9, wbits=31), bytes(2**20)
    return b"".join([packer.compress(zeros) for _ in range(inflated // 2**20)] + [packer.flush()])


def test_gzip_bomb_is_413_fast_with_flat_memory(server, http):
    bomb = gzip_bomb(64 * 2**20)  # 64 MiB of zeros
    assert len(bomb) < LIMIT  # inside the limit on the wire: only the inflated size can trip it
    peak = peak_rss_kib(server.proc.pid)
    started = time.perf_counter()
    r = http.post("/v2/models/default/infer", content=bomb, headers={"content-encoding": "gzip"})
    elapsed = time.perf_counter() - started
    assert r.status_code == 413, r.text
    assert r.json() == {"error": f"body too large: limit {LIMIT} bytes (RESNET_MAX_UPLOAD_BYTES)"}, r.text
    assert elapsed < 2.0, elapsed  # milliseconds in fact; generous for a shared machine
    assert peak_rss_kib(server.proc.pid) - peak < 20 * 1024  # KiB: inflation stopped at the limit

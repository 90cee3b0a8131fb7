"""Dynamic micro-batching: the batcher's rules, then the whole service under concurrency (no mix-up,
health under load, 429 backpressure, 504 deadlines)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.harness import wait_ready
from service.activity import NO_WORKER, Activity
from service.app import create_app
from service.batching import MicroBatcher
from service.errors import InferenceFailed, QueueFull
from service.preprocessing import Preprocessor
from service.runtime import Model, softmax
from service.settings import Settings
from tests.conftest import loading_as
from tests.images import encode, one_per_class, validation_digits

# --- the batcher's rules, with a plain numpy "model" (row sums) so every answer is checkable --------


class Recorder:
    """Runs a batch by summing each image; records the batch sizes it saw."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.alone: list[bool] = []  # per batch: run as all the work on the machine
        self.threads: list[int] = []  # per batch: the thread it ran on
        self.delay, self.fail_on = delay, fail_on

    def __call__(self, model: object, x: np.ndarray, alone: bool) -> np.ndarray:
        self.sizes.append(len(x))
        self.alone.append(alone)
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)
        if self.fail_on is not None and len(self.sizes) == self.fail_on:
            raise RuntimeError("injected")
        return x.reshape(len(x), -1).sum(1, keepdims=True)


class Weights:
    """A stand-in for a loaded model: an object the batcher compares by identity (and may only hold weakly)."""

    def __init__(self, name: str) -> None:
        self.name = name


MODELS = {name: Weights(name) for name in ("m", "old", "new")}


def run_async(coro):
    return asyncio.run(coro)


async def submit_many(batcher: MicroBatcher, values: list[float], model: object = MODELS["m"]) -> list[float]:
    async def one(v: float) -> float:
        with batcher.reserve(1) as r:
            await asyncio.sleep(0)  # decoding happens here in the service
            (res,) = await r.submit([np.full((1, 2, 2), v, np.float32)], model)
            return float(res.logits[0])

    return list(await asyncio.gather(*(one(v) for v in values)))


def test_batcher_groups_concurrent_requests_and_answers_each_its_own():
    async def main() -> tuple[list[float], list[int]]:
        rec = Recorder(delay=0.01)
        batcher = MicroBatcher(rec, ThreadPoolExecutor(1), max_batch_size=8, max_delay_s=0.05, max_queue=100)
        batcher.start()
        got = await submit_many(batcher, [float(i) for i in range(40)])
        await batcher.stop()
        return got, rec.sizes

    got, sizes = run_async(main())
    assert got == [4.0 * i for i in range(40)]  # each 2x2 image of value i sums to 4i
    assert sum(sizes) == 40 and max(sizes) == 8 and len(sizes) <= 10


def test_batcher_lone_request_is_not_delayed():
    async def main() -> float:
        batcher = MicroBatcher(Recorder(), ThreadPoolExecutor(1), max_batch_size=32, max_delay_s=10.0, max_queue=10)
        batcher.start()
        start = time.perf_counter()
        await submit_many(batcher, [1.0])
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    # Nothing else was on its way, so no waiting for the 10 s delay; the bound leaves a shared machine 2.5 s.
    assert run_async(main()) < 2.5


@pytest.mark.parametrize(
    ("requests", "max_batch_size", "other_worker_images", "alone"),
    [
        pytest.param(1, 32, 0, [True], id="lone-request"),
        pytest.param(1, 32, 3, [False], id="another-worker-busy"),
        pytest.param(1, 32, NO_WORKER, [True], id="another-worker-dead"),
        pytest.param(3, 32, 0, [True], id="one-batch-holds-all"),
        pytest.param(6, 4, 0, [False, True], id="the-first-of-two-batches-leaves-work"),
    ],
)
def test_batcher_runs_alone_only_batches_that_are_all_the_work(tmp_path, requests, max_batch_size,
                                                                other_worker_images, alone):
    Activity.create(tmp_path / "activity.bin", 2)
    Activity(tmp_path / "activity.bin", 1).publish(other_worker_images)
    mine = Activity(tmp_path / "activity.bin", 0)

    async def main() -> tuple[list[bool], list[int]]:
        rec = Recorder(delay=0.02)
        batcher = MicroBatcher(rec, ThreadPoolExecutor(1), max_batch_size=max_batch_size, max_delay_s=0.05,
                               max_queue=100, activity=mine)
        batcher.start()
        held, answered = [], asyncio.Event()

        async def watch() -> None:  # what this worker publishes while its batches run
            while not answered.is_set():
                held.append(mine.cells[0])
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        await submit_many(batcher, [1.0] * requests)
        answered.set()
        await watcher
        await batcher.stop()
        return rec.alone, held

    ran_alone, held = run_async(main())
    assert ran_alone == alone
    assert max(held) == requests  # every image it held was published, for the other workers to see
    assert mine.cells[0] == 0  # and none once answered


@pytest.mark.parametrize(
    ("inline_s", "delay", "other_worker_images", "models", "on_loop"),
    [
        pytest.param(0.002, 0.0, 0, ["m", "m", "m"], [False, True, True], id="short-lone-batches-after-the-first"),
        pytest.param(0.002, 0.01, 0, ["m", "m", "m"], [False, False, False], id="batches-longer-than-the-limit"),
        pytest.param(0.002, 0.0, 3, ["m", "m", "m"], [False, False, False], id="another-worker-busy"),
        pytest.param(0.0, 0.0, 0, ["m", "m", "m"], [False, False, False], id="off"),
        pytest.param(0.002, 0.0, 0, ["old", "new", "new"], [False, False, True], id="a-reloaded-model-measured-first"),
    ],
)
def test_batcher_runs_short_lone_batches_on_the_event_loop(tmp_path, inline_s, delay, other_worker_images, models,
                                                           on_loop):
    Activity.create(tmp_path / "activity.bin", 2)
    Activity(tmp_path / "activity.bin", 1).publish(other_worker_images)

    async def main() -> tuple[list[float], list[bool]]:
        rec = Recorder(delay=delay)
        batcher = MicroBatcher(rec, ThreadPoolExecutor(1), max_batch_size=32, max_delay_s=0.05, max_queue=100,
                               activity=Activity(tmp_path / "activity.bin", 0), inline_s=inline_s)
        batcher.start()
        got = [(await submit_many(batcher, [float(i)], MODELS[name]))[0] for i, name in enumerate(models)]  # in turn
        await batcher.stop()
        return got, [t == threading.get_ident() for t in rec.threads]

    got, ran_on_loop = run_async(main())
    assert got == [4.0 * i for i in range(len(models))]  # each 2x2 image of value i sums to 4i, wherever it ran
    assert ran_on_loop == on_loop


@pytest.mark.parametrize(
    ("reserved", "queued", "other_worker_images", "idle"),
    [
        pytest.param([1], 0, 0, True, id="a-lone-request"),
        pytest.param([1], 0, NO_WORKER, True, id="another-worker-dead"),
        pytest.param([1, 1], 0, 0, False, id="another-request-decoding"),
        pytest.param([1], 1, 0, False, id="an-image-queued"),
        pytest.param([1], 0, 2, False, id="another-worker-busy"),
    ],
)
def test_batcher_idle_only_while_the_images_just_reserved_are_all_the_work(tmp_path, reserved, queued,
                                                                           other_worker_images, idle):
    Activity.create(tmp_path / "activity.bin", 2)
    Activity(tmp_path / "activity.bin", 1).publish(other_worker_images)

    async def main() -> bool:
        # Never started: nothing dispatches the queued image while the question is asked.
        batcher = MicroBatcher(Recorder(), ThreadPoolExecutor(1), max_batch_size=32, max_delay_s=0.05, max_queue=100,
                               activity=Activity(tmp_path / "activity.bin", 0))
        batcher._task = asyncio.get_running_loop().create_future()  # reserve() admits only a started batcher
        if queued:
            with batcher.reserve(queued) as reservation:
                queued_task = asyncio.ensure_future(reservation.submit([np.ones((1, 2, 2))], MODELS["m"]))
                await asyncio.sleep(0)
        held = [batcher.reserve(n) for n in reserved]
        answer = batcher.idle(reserved[-1])
        for r in held:
            r.release()
        if queued:
            queued_task.cancel()
        return answer

    assert run_async(main()) is idle


def test_activity_shows_other_workers_images_until_a_dead_one_is_vacated(tmp_path):
    path = tmp_path / "activity.bin"
    Activity.create(path, 3)
    first, second = Activity(path, 0), Activity(path, 1)
    assert first.others_idle() and second.others_idle()
    second.publish(5)
    assert not first.others_idle() and second.others_idle()  # its own images are not another worker's
    Activity.vacate(path, 1)  # the supervisor's call when worker 1 dies
    assert first.others_idle()
    assert Activity().others_idle()  # one worker, no file: no other worker


def test_batcher_never_mixes_models_in_one_batch():
    async def main() -> list[int]:
        rec = Recorder()
        batcher = MicroBatcher(rec, ThreadPoolExecutor(1), max_batch_size=16, max_delay_s=0.02, max_queue=100)
        batcher.start()
        await asyncio.gather(submit_many(batcher, [1.0] * 4, MODELS["old"]),
                             submit_many(batcher, [2.0] * 4, MODELS["new"]))
        await batcher.stop()
        return rec.sizes

    sizes = run_async(main())
    assert sum(sizes) == 8 and max(sizes) <= 4


def test_batcher_after_reload_holds_no_reference_to_the_old_model():
    async def main() -> tuple[list[bool], list[float]]:
        batcher = MicroBatcher(Recorder(), ThreadPoolExecutor(1), max_batch_size=4, max_delay_s=0, max_queue=10,
                               inline_s=0.002)
        batcher.start()
        old = Weights("old")
        gone = weakref.ref(old)
        got = await submit_many(batcher, [1.0, 1.0], old)
        del old  # the service has reloaded: only the batcher could still hold the old model now
        await asyncio.sleep(0.01)  # the batcher is idle, waiting for the next request
        gc.collect()
        freed = gone() is None
        got += await submit_many(batcher, [2.0], MODELS["new"])
        await batcher.stop()
        return freed, got

    freed, got = run_async(main())
    assert freed  # and not held until the next batch
    assert got == [4.0, 4.0, 8.0]


def test_batcher_full_queue_refuses_with_retry_after():
    async def main() -> None:
        batcher = MicroBatcher(Recorder(), ThreadPoolExecutor(1), max_batch_size=4, max_delay_s=0, max_queue=3)
        batcher.start()
        held = batcher.reserve(3)
        with pytest.raises(QueueFull) as err:
            batcher.reserve(1)
        assert err.value.retry_after_s == 1.0
        held.release()
        batcher.reserve(1).release()
        await batcher.stop()

    run_async(main())


def test_batcher_failure_fails_only_that_batch():
    async def main() -> tuple[list, list[float]]:
        batcher = MicroBatcher(Recorder(fail_on=1), ThreadPoolExecutor(1), max_batch_size=4, max_delay_s=0,
                               max_queue=10)
        batcher.start()
        first = await asyncio.gather(submit_many(batcher, [1.0]), return_exceptions=True)
        second = await submit_many(batcher, [2.0])
        await batcher.stop()
        return first, second

    first, second = run_async(main())
    assert isinstance(first[0], InferenceFailed)
    assert second == [8.0]


def test_batcher_drops_cancelled_work():
    async def main() -> list[int]:
        rec = Recorder(delay=0.05)
        batcher = MicroBatcher(rec, ThreadPoolExecutor(1), max_batch_size=1, max_delay_s=0, max_queue=10)
        batcher.start()
        busy = asyncio.ensure_future(submit_many(batcher, [1.0]))
        await asyncio.sleep(0.01)  # the first batch is running
        doomed = asyncio.ensure_future(submit_many(batcher, [2.0, 3.0]))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await busy
        await asyncio.sleep(0.1)
        assert batcher.depth == 0
        await batcher.stop()
        return rec.sizes

    assert run_async(main()) == [1]  # the cancelled request's images never reached the model


# --- the service under concurrency ------------------------------------------------------------------


@pytest.fixture(scope="module")
def distinct_pngs() -> list[bytes]:
    images, _ = validation_digits()
    return [encode(img, "PNG") for img in images[:240]]


def test_concurrent_requests_get_their_own_probabilities(live_server, distinct_pngs, default_model):
    # Every request admitted, however slowly this shared machine drains the burst: the test is about answers.
    server = live_server(RESNET_MAX_BATCH_SIZE="32", RESNET_MAX_BATCH_DELAY_MS="5", RESNET_MAX_QUEUE_WAIT_MS="600000")
    model = Model.load(Settings(model_path=default_model, device="cpu"))
    pre = Preprocessor(model.spec, 10**7)
    alone = [softmax(model.run(pre(data).x[None]))[0] for data in distinct_pngs]  # each image by itself

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(distinct_pngs))
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(
                c.post("/predict", content=data, headers={"content-type": "image/png"}) for data in distinct_pngs
            ))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    worst = max(np.abs(np.array(r.json()["predictions"][0]["probabilities"]) - want).max()
                for r, want in zip(responses, alone, strict=True))
    assert worst <= 1e-6, worst
    text = httpx.get(server.url + "/metrics").text
    count = float(next(x for x in text.splitlines()
                       if x.startswith("resnet_serve_predict_batch_size_count")).split()[-1])
    assert count < len(distinct_pngs), "requests were batched together"


def test_health_answers_fast_under_full_load(live_server):
    server = live_server(RESNET_MAX_QUEUE="2048", RESNET_MAX_BATCH_IMAGES="64", RESNET_REQUEST_TIMEOUT_MS="120000")
    heavy = encode(one_per_class()[1][0].resize((1500, 1500)).convert("RGB"), "PNG")
    probes: list[float] = []

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as c, \
                httpx.AsyncClient(base_url=server.url, timeout=5) as probe:
            await probe.get("/health/live")  # an orchestrator's probe connection exists before the load
            load = [asyncio.ensure_future(c.post("/predict", content=heavy, headers={"content-type": "image/png"}))
                    for _ in range(64)]
            await asyncio.sleep(0.3)
            for _ in range(10):
                for path in ("/health/live", "/health/ready"):
                    start = time.perf_counter()
                    r = await probe.get(path)
                    probes.append(time.perf_counter() - start)
                    assert r.status_code == 200, r.text
                await asyncio.sleep(0.05)
            busy_at_end = sum(not f.done() for f in load)
            return [r.status_code for r in await asyncio.gather(*load)] + [busy_at_end]

    *statuses, busy_at_end = asyncio.run(main())
    assert busy_at_end > 0, "the load must still be running while health is probed"
    assert all(s == 200 for s in statuses), sorted(set(statuses))
    # The median holds the 50 ms line; 19 of the 20 probes stay under an orchestrator's probe timeout (1 s by
    # default in Kubernetes): on 2 cores shared with other test runs one probe may stall through no fault here.
    assert float(np.median(probes)) < 0.05 and sorted(probes)[-2] < 1.0, probes


def test_full_queue_answers_429_with_retry_after(live_server):
    server = live_server(RESNET_MAX_QUEUE="4", RESNET_MAX_BATCH_IMAGES="4")
    heavy = encode(one_per_class()[2][0].resize((1200, 1200)).convert("RGB"), "PNG")

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=40)) as c:
            return await asyncio.gather(*(
                c.post("/predict", content=heavy, headers={"content-type": "image/png"}) for _ in range(40)
            ))

    responses = asyncio.run(main())
    refused = [r for r in responses if r.status_code == 429]
    assert refused, "40 concurrent heavy requests must overflow a queue of 4"
    assert refused[0].json() == {"detail": "server busy: inference queue is full"}
    assert refused[0].headers["retry-after"] == "1"
    assert all(r.status_code in (200, 429) for r in responses), [r.text for r in responses]
    assert any(r.status_code == 200 for r in responses)


class SlowModel(Model):
    def run(self, x: np.ndarray, alone: bool = False) -> np.ndarray:
        if getattr(self, "slow", False):
            time.sleep(0.3)
        return super().run(x, alone)


def test_request_past_deadline_gets_504_and_its_work_is_dropped(default_model):
    load = loading_as(SlowModel)

    settings = Settings(model_path=default_model, request_timeout_ms=100, max_batch_size=1)
    with TestClient(create_app(settings, load_model=load)) as c:
        wait_ready(c)
        model = c.app.state.service.serving.model
        model.slow = True
        png = encode(one_per_class()[0][0], "PNG")
        r = c.post("/predict", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 504, r.text
        assert r.json() == {"detail": "request timed out"}
        time.sleep(0.4)
        assert c.app.state.service.batcher.depth == 0
        model.slow = False
        r = c.post("/predict", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text




class FailsSecondBatch(Model):
    """First batch slow (so the next requests queue up into one batch), second batch raises."""

    calls = 0

    def run(self, x: np.ndarray, alone: bool = False) -> np.ndarray:
        if not getattr(self, "armed", False):
            return super().run(x, alone)
        FailsSecondBatch.calls += 1
        if FailsSecondBatch.calls == 1:
            time.sleep(0.5)
        elif FailsSecondBatch.calls == 2:
            self.failed_batch = len(x)
            raise RuntimeError("injected onnxruntime failure")
        return super().run(x, alone)


def test_failed_batch_fails_each_of_its_requests_with_500_then_serves(default_model):
    load = loading_as(FailsSecondBatch)

    png = encode(one_per_class()[0][0], "PNG")
    with TestClient(create_app(Settings(model_path=default_model), load_model=load)) as c:
        wait_ready(c)
        model = c.app.state.service.serving.model
        model.armed = True
        post = lambda: c.post("/predict", content=png, headers={"content-type": "image/png"})  # noqa: E731
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(post)
            time.sleep(0.15)  # the first batch is running; the next four queue behind it
            rest = [pool.submit(post) for _ in range(4)]
            responses = [first.result()] + [f.result() for f in rest]
        assert responses[0].status_code == 200, responses[0].text
        failed = responses[1:]
        assert model.failed_batch == 4
        assert all(r.status_code == 500 for r in failed), [r.text for r in failed]
        assert all(r.json()["detail"] == "inference failed" for r in failed)
        assert len({r.json()["error_id"] for r in failed}) == 4  # each logged under its own id
        r = post()
        assert r.status_code == 200, r.text


def test_batcher_refuses_when_the_queue_would_drain_too_slowly():
    """Admission by time: with a measured rate of 100 images/s, 30 queued images are 0.3 s of work."""

    async def main() -> None:
        batcher = MicroBatcher(Recorder(), ThreadPoolExecutor(1), max_batch_size=4, max_delay_s=0, max_queue=1000,
                               max_wait_s=0.25)
        batcher.start()
        assert batcher.reserve(30).n == 30  # no rate measured yet: an empty queue always admits
        batcher.drain.add(100, 1.0, time.perf_counter())  # 100 images in 1 s of inference
        with pytest.raises(QueueFull) as err:
            batcher.reserve(1)
        assert err.value.retry_after_s == 1.0  # 0.3 s of queue, rounded up to HTTP's one second
        batcher.drain.add(4000, 1.0, time.perf_counter())  # now 4100 images in 2 s: 30 queued drain in 15 ms
        assert batcher.reserve(1).n == 1
        await batcher.stop()

    asyncio.run(main())


def test_drain_rate_counts_only_the_recent_window():
    from service.batching import DrainRate

    rate = DrainRate(window_s=2.0)
    assert rate.per_second() is None
    rate.add(10, 0.1, at=100.0)
    rate.add(30, 0.1, at=101.0)
    assert rate.per_second() == pytest.approx(200.0)
    rate.add(5, 0.1, at=103.5)  # the first two fell out of the window
    assert rate.per_second() == pytest.approx(50.0)


# --- refusals answered by the HTTP server itself, from the request's head -----------------------------------


class GatedModel(Model):
    """Holds each batch until ``gate`` is set, once ``gated`` is on (after warm-up)."""

    def run(self, x: np.ndarray, alone: bool = False) -> np.ndarray:
        if getattr(self, "gated", False):
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().run(x, alone)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def full_queue(default_model, unused_port):
    """``full_queue(**settings)``: a real uvicorn server in this process (as ``python -m service`` configures it)
    whose queue of one image is full: one request is held in inference, one waits behind it. Returns its port and
    a function that releases them."""
    import threading

    import uvicorn

    from service.__main__ import uvicorn_config

    started = []

    def start(**overrides) -> tuple[int, object]:
        settings = Settings(model_path=default_model, port=unused_port, grpc_port=0, max_batch_size=1, max_queue=1,
                            max_batch_images=1, max_batch_delay_ms=0, request_timeout_ms=60_000, **overrides)
        app = create_app(settings, load_model=loading_as(GatedModel))
        server = uvicorn.Server(uvicorn_config(settings, app))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{unused_port}"
        wait_ready(url, timeout=60)
        model = app.state.service.serving.model
        model.gate, model.entered, model.gated = threading.Event(), threading.Event(), True
        headers = {"content-type": "image/png", **({"authorization": f"Bearer {KEY}"} if settings.api_keys else {})}
        pool = ThreadPoolExecutor(2)
        held = [pool.submit(httpx.post, url + "/predict", content=PNG, headers=headers, timeout=60)]
        assert model.entered.wait(30), "the first request never reached inference"  # then the second queues
        held.append(pool.submit(httpx.post, url + "/predict", content=PNG, headers=headers, timeout=60))
        deadline = time.monotonic() + 30
        while app.state.service.batcher.depth < 1 and time.monotonic() < deadline:  # the second one queued
            time.sleep(0.01)
        assert app.state.service.batcher.depth == 1, "the queue never filled"
        started.append((server, thread, model, held, pool))

        def release() -> None:
            """Opens the gate; the two held requests are answered."""
            model.gate.set()
            assert [f.result().status_code for f in held] == [200, 200], [f.result().text for f in held]

        return unused_port, release

    yield start
    for server, thread, model, held, pool in started:
        model.gate.set()
        assert [f.result().status_code for f in held] == [200, 200], [f.result().text for f in held]
        server.should_exit = True
        thread.join(30)
        pool.shutdown()


KEY = "k" * 20
PNG = encode(one_per_class()[1][0], "PNG")


def head(extra: str = "", length: int = len(PNG)) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nhost: t\r\ncontent-type: image/png\r\ncontent-length: {length}\r\n"
            f"{extra}\r\n").encode()


def read_response(sock) -> bytes:
    """One whole response (head and a body of its content-length) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head_part.split(b"\r\n") if line.lower().startswith(
        b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_full_queue_refuses_at_once_before_the_body_arrives(full_queue):
    """The 429 comes back once the head is in, before any body byte is sent; the connection closes once the
    body has been read and dropped (a retry comes on a new connection, to any worker)."""
    import socket

    port, release = full_queue()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head())
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answer
        assert b"\r\nretry-after: 1\r\n" in answer and b"\r\nconnection: close\r\n" in answer, answer
        assert answer.endswith(b'{"detail":"server busy: inference queue is full"}'), answer
        sock.sendall(PNG)  # the refused request's body: dropped
        assert sock.recv(65536) == b"", "the server must close once the refused body has arrived"
    release()  # the queue drains: the next request is served
    r = httpx.post(f"http://127.0.0.1:{port}/predict", content=PNG, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("authorization", "status"), [
    pytest.param(f"Bearer {KEY}", 429, id="valid-key-refused-early"),
    pytest.param("Bearer wrong-key-wrong-key", 401, id="wrong-key-left-to-the-endpoint"),
    pytest.param(None, 401, id="no-key-left-to-the-endpoint"),
])
def test_early_refusal_never_answers_before_authentication(full_queue, authorization, status):
    port, _ = full_queue(api_keys=[KEY])
    headers = {"content-type": "image/png", **({"authorization": authorization} if authorization else {})}
    r = httpx.post(f"http://127.0.0.1:{port}/predict", content=PNG, headers=headers, timeout=30)
    assert r.status_code == status, r.text


def test_early_refusals_counted_in_metrics(full_queue):
    port, _ = full_queue()
    url = f"http://127.0.0.1:{port}"
    counted = 'resnet_serve_http_requests_total{method="POST",route="/predict",status="429"}'

    def refusals() -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(counted))

    before = refusals()
    statuses = [httpx.post(url + "/predict", content=PNG, headers={"content-type": "image/png"}, timeout=30)
                .status_code for _ in range(3)]
    assert statuses == [429] * 3, statuses
    assert refusals() - before == 3


@pytest.mark.parametrize(("extra", "first_line"), [
    pytest.param("", b"HTTP/1.1 429 Too Many Requests", id="refused-early"),
    pytest.param("expect: 100-continue\r\n", b"HTTP/1.1 100 Continue", id="expect-100-left-to-the-app"),
])
def test_early_refusal_answers_from_the_head_only_where_the_app_would_not_wait(full_queue, extra, first_line):
    """With only the head sent: refused at once, unless the client waits for 100-continue (the app's first
    read sends it)."""
    import socket

    port, _ = full_queue()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head(extra))
        answer = sock.recv(65536)
    assert answer.startswith(first_line + b"\r\n"), answer


def test_declared_body_over_the_limit_refused_413_not_429(full_queue):
    import socket

    port, _ = full_queue(max_upload_bytes=len(PNG))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head(length=len(PNG) + 1))  # declared over the limit: the app's check answers
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer


@pytest.mark.parametrize(("path", "status", "error"), [
    pytest.param("/v2/models/default/infer", 429, "server busy: inference queue is full", id="v2-infer"),
    pytest.param("/v2/models/default/versions/{version}/infer", 429, "server busy: inference queue is full",
                 id="v2-versioned-infer"),
    pytest.param("/v2/models/other/infer", 404, "unknown model 'other'", id="unknown-model-left-to-the-route"),
    pytest.param("/v2/models/default/versions/0/infer", 404, "unknown version '0' of model 'default'",
                 id="unknown-version-left-to-the-route"),
])
def test_full_queue_refuses_v2_inference_from_its_head(full_queue, path, status, error):
    """The Open Inference Protocol's infer routes are refused like /predict, in that protocol's error shape; a
    name or version that is not served is the route's 404 (answered before the body too: nothing reads it)."""
    import json
    import socket

    port, _ = full_queue()
    version = httpx.get(f"http://127.0.0.1:{port}/v2/models/default", timeout=30).json()["versions"][0]
    target = path.format(version=version)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {target} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                     f"content-length: 500\r\n\r\n".encode())
        answer = read_response(sock)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"error": error}, answer

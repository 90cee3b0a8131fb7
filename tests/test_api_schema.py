"""API fuzzing from the service's own OpenAPI schema (schemathesis) against a real ``python -m service``
with API keys on: generated requests to every documented operation, valid and invalid, get no 5xx,
and every response conforms to the schema (status codes, content types, headers, bodies)."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from bench.harness import serve_service
from service.app import create_app
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL
from tests.hostile import VALID, valid_image

KEY = "schemathesis-key"

SCHEMA_EXAMPLES = 100  # per operation and generation phase (hypothesis max_examples)
cases: Counter[str] = Counter()

# The schema the app publishes at /openapi.json, built without starting it (no lifespan, no model).
# schemathesis.pytest.from_fixture would fetch it from the live server, but needs pytest < 9 (_nodeid).
schema = schemathesis.openapi.from_dict(create_app(Settings(model_path=DEFAULT_MODEL)).openapi())

# The schema can only say "binary"; a *valid* binary here is an image. Schema-valid (positive) cases
# send real images in every accepted format, so a 400 for one of them is a finding, not noise.
# Undecodable bytes are test_fuzz.py's business.
IMAGES = st.builds(valid_image, st.sampled_from(sorted(VALID)), st.integers(0, 9))
schemathesis.openapi.format("binary", IMAGES)
for media in ("image/*", "application/octet-stream"):
    schemathesis.openapi.media_type(media, IMAGES)

# V2 paths name a model and version: half the cases name the served ones, or all would end in 404.
SERVED = {"name": "default", "version": hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()[:12]}


@schema.hook
def flatmap_path_parameters(context, path_parameters: dict | None) -> st.SearchStrategy:
    if not path_parameters:
        return st.just(path_parameters)
    return st.fixed_dictionaries({k: st.sampled_from([SERVED.get(k, v), v]) for k, v in path_parameters.items()})


# V2 infer declares its body as any JSON object (the real shape is the KServe spec's), so a schema-valid
# body is not a valid inference request and its 400 is right: that one check cannot apply there.
V2_INFER_EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_service({"RESNET_API_KEYS": KEY}, tmp_path_factory.mktemp("schema") / "server.log") as s:
        yield s


@schema.parametrize()
@settings(max_examples=SCHEMA_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_conform_to_openapi(case, server):
    excluded = V2_INFER_EXCLUDED if case.path.startswith("/v2/") and case.path.endswith("/infer") else []
    response = case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                      excluded_checks=excluded, timeout=30)
    cases[f"{case.method} {case.path} {response.status_code}"] += 1


def test_api_fuzzing_reached_every_operation_and_outcome(server, capsys):
    """Runs after the generated cases (file order): they proved something only if they got through."""
    with capsys.disabled():
        print(f"\nschemathesis: {sum(cases.values())} requests: {dict(sorted(cases.items()))}")
    assert server.proc.poll() is None, server.log_path.read_text()[-2000:]
    for op in ("GET /health/live", "GET /health/ready", "GET /model", "POST /predict", "POST /admin/reload",
               "GET /v2/models/{name}", "GET /v2/models/{name}/versions/{version}/ready"):
        assert cases[f"{op} 200"] > 0, (op, cases)
    assert cases["POST /predict 422"] > 0, cases  # invalid top_k (negative cases)
    assert not [k for k in cases if k.endswith((" 500", " 503", " 504"))], cases

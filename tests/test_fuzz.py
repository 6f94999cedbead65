"""Schemathesis against the shim's own OpenAPI document, through both backends: no 5xx, every
answer as documented. A longer run: FOS_FUZZ_EXAMPLES=5000 uv run pytest tests/test_fuzz.py"""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings

from shim.app import create_app

from fakes import FakeBackend

EXAMPLES = int(os.environ.get("FOS_FUZZ_EXAMPLES", "300"))

# The document does not depend on the backend; the requests go to the live servers below.
schema = schemathesis.openapi.from_dict(create_app(FakeBackend()).openapi())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_fuzz(case, server):
    # Schema-valid requests may still be refused on meaning (an unknown model name, an input_type
    # the model has no prompt for), so "schema-valid must succeed" is the one check left out.
    case.call_and_validate(base_url=server.url, excluded_checks=[schemathesis.checks.positive_data_acceptance])

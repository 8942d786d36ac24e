"""``make serve``: every flow served from one process, its parameter schemas sealed."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from prefect import get_client
from prefect.exceptions import PrefectHTTPStatusError

from deployments.serve import serve


async def test_served_deployments_refuse_an_undeclared_parameter_before_a_run_exists() -> None:
    serving = asyncio.create_task(serve())
    try:
        async with get_client() as client:
            deadline = time.monotonic() + 120
            while True:
                assert not serving.done(), serving  # it serves until cancelled
                with contextlib.suppress(Exception):
                    deployment = await client.read_deployment_by_name("topic-to-video/served")
                    schema = deployment.parameter_openapi_schema or {}
                    if schema.get("additionalProperties") is False:
                        break
                assert time.monotonic() < deadline, "the served schema was never sealed"
                await asyncio.sleep(0.5)
            with pytest.raises(PrefectHTTPStatusError) as refused:
                await client.create_flow_run_from_deployment(
                    deployment.id, parameters={"topic": "A fox", "api_key": "np-secret"}
                )
            assert refused.value.response.status_code == 409
            assert "api_key" in refused.value.response.text
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving

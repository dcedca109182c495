"""Admin routes for facts and memorization jobs; every route needs the admin bearer key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from server.deps import StateDep
from server.errors import APIError, error_responses
from server.facts_protocol import (
    FactList,
    FactOut,
    FactsAccepted,
    FactsRequest,
    FactStatus,
    JobOut,
)
from server.facts_service import FactsService

# Declared as a security scheme, so the document says which routes need the key; the 401 is ours.
_bearer = HTTPBearer(auto_error=False, description="MOME_ADMIN_KEY")


def require_admin(state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                          Depends(_bearer)] = None) -> FactsService:
    """The facts service, for a request that carries the admin key (401 otherwise)."""
    if state.facts is None:
        raise APIError("this server runs without memory experts (MOME_MEMORY=false)", 404)
    token = credentials.credentials if credentials is not None else ""
    if (not token or not state.admin_key  # an empty key never matches
            or not hmac.compare_digest(token.encode(), state.admin_key.encode())):
        raise APIError("the admin API needs `Authorization: Bearer <MOME_ADMIN_KEY>`", 401)
    if not state.engine.ready:
        raise APIError("the model is still loading; retry shortly", 503)
    return state.facts


FactsDep = Annotated[FactsService, Depends(require_admin)]
MAX_PAGE = 1000
# What every admin route can answer besides its own: no key, no memory, loading, too large.
router = APIRouter(prefix="/v1", responses=error_responses(401, 404, 413, 503))


def _link(operation_id: str, parameter: str, pointer: str) -> dict:
    """An OpenAPI link: where the next request finds its path parameter in this response."""
    return {"operationId": operation_id, "parameters": {parameter: f"$response.body#{pointer}"}}


# The ids a post returns, as the routes that take them (clients and stateful fuzzing follow them).
_POSTED = {202: {"description": "Accepted: the facts are queued for memorization", "links": {
    "GetFact": _link("get_fact_v1_facts__fact_id__get", "fact_id", "/fact_ids/0"),
    "DeleteFact": _link("delete_fact_v1_facts__fact_id__delete", "fact_id", "/fact_ids/0"),
    "GetJob": _link("get_job_v1_jobs__job_id__get", "job_id", "/job_id")}}}


@router.post("/facts", status_code=202, responses={**_POSTED, **error_responses(400, 422)})
async def post_facts(request: FactsRequest, facts: FactsDep) -> FactsAccepted:
    return await run_in_threadpool(facts.submit, request.facts)


@router.get("/facts", responses=error_responses(400, 422))
async def list_facts(facts: FactsDep, status: FactStatus | None = None,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                     after: str | None = None) -> FactList:
    """Facts oldest first, `limit` a page; the next page starts `after` the last id."""
    return await run_in_threadpool(facts.list, limit, after, status)


@router.get("/facts/{fact_id}")
async def get_fact(fact_id: str, facts: FactsDep) -> FactOut:
    return facts.to_out(facts.get(fact_id))


@router.delete("/facts/{fact_id}", status_code=204, responses=error_responses(409))
async def delete_fact(fact_id: str, facts: FactsDep) -> Response:
    await facts.delete(fact_id)
    return Response(status_code=204)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, facts: FactsDep) -> JobOut:
    return facts.job(job_id)


@router.get("/memory")
async def memory_info(facts: FactsDep) -> dict:
    """The memory layer's configuration and the store's size (mome's own route)."""
    return facts.memory_info()

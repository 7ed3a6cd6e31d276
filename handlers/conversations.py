"""Conversations: the listing of agent runs, with the seed's visibility rule applied by the backend
(project conversations plus the caller's own private ones; `workflow:superadmin` sees all)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from handlers.runs import filters_of, page_response
from server.context import backends, principal_of
from server.permissions import LIST_RUNS, require


async def list_conversations(token_info: dict[str, Any], body: dict[str, Any] | None = None) -> Response:
    principal = require(principal_of(token_info), LIST_RUNS)
    filters = filters_of(body)
    context = backends()
    context.rates.charge_temporal(principal)  # a listing reaches Temporal (server.rate_limit)
    return page_response(await context.runs.list_runs(principal, filters, conversations_only=True))

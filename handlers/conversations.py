"""Conversations: the listing of agent runs, with the seed's visibility rule applied by the backend
(project conversations plus the caller's own private ones; `workflow:superadmin` sees all)."""

from __future__ import annotations

from typing import Any

from core.principals import LIST_RUNS, Principal, require
from handlers.deps import Deps
from handlers.runs import filters_of, page_answer


async def list_conversations(deps: Deps, principal: Principal, *, body: dict[str, Any] | None = None) -> bytes:
    require(principal, LIST_RUNS)
    filters = filters_of(body)
    deps.rates.charge_temporal(principal)  # a listing reaches Temporal (handlers.rate_limits)
    return page_answer(await deps.runs.list_runs(principal, filters, conversations_only=True))

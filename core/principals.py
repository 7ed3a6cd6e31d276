"""Who is calling, and what each operation lets them do.

`Principal` is built from a verified token's claims by the HTTP layer (`web.auth`); handlers check
the permission their operation needs with `require` (the permission each operation needs is in its
description in the document).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import Forbidden

READ_RUN = ("workflow:read", "workflow:run")
ACT_ON_RUN = ("workflow:run",)
LIST_RUNS = ("workflow:read", "workflow:admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling, taken from the JWT claims."""

    user_id: str
    kind: str = "user"  # the token's `type` claim: user, apikey, service_account, agent, ...
    project_id: str | None = None
    account_id: str | None = None
    permissions: frozenset[str] = frozenset()
    # When the credential the caller presented stops being valid (epoch seconds, its `exp`); None:
    # never. Long-lived answers (update streams) end at that moment.
    expires_at: float | None = None

    @property
    def ref(self) -> str:
        """Principal reference as stored in `initiated_by`, e.g. `user:123`."""
        return f"{self.kind}:{self.user_id}"

    @property
    def superadmin(self) -> bool:
        return "workflow:superadmin" in self.permissions


def require(principal: Principal, any_of: tuple[str, ...]) -> Principal:
    """Raise `Forbidden` unless the principal has a project and one of the permissions."""
    if principal.project_id is None:
        raise Forbidden("The token has no project; workflow runs belong to a project.")
    if not (principal.permissions & set(any_of)) and not principal.superadmin:
        raise Forbidden(f"This operation needs one of the permissions: {', '.join(any_of)}.")
    return principal

"""Permission checks shared by every handler (the permission each operation needs is in its description)."""

from __future__ import annotations

from backends.errors import Forbidden
from backends.protocol import Principal

READ_RUN = ("workflow:read", "workflow:run")
ACT_ON_RUN = ("workflow:run",)
LIST_RUNS = ("workflow:read", "workflow:admin")


def require(principal: Principal, any_of: tuple[str, ...]) -> Principal:
    """Raise 403 unless the principal has a project and one of the permissions."""
    if principal.project_id is None:
        raise Forbidden("The token has no project; workflow runs belong to a project.")
    if not (principal.permissions & set(any_of)) and not principal.superadmin:
        raise Forbidden(f"This operation needs one of the permissions: {', '.join(any_of)}.")
    return principal

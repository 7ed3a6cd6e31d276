"""Starting sample runs the way a user does: through the CLI (`workflow-runs start`)."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from tests.support.live import CLI, LiveApi


@dataclass(frozen=True)
class Run:
    workflow_id: str
    run_id: str

    @property
    def sentinel(self) -> str:
        """The message of the last update a test posts to this run: a reader stops on it."""
        return f"sentinel-{self.run_id}"

    @property
    def path(self) -> str:
        return f"/workflows/runs/{self.workflow_id}/{self.run_id}"


def start_command(
    live: LiveApi, kind: str, *args: str, project: str = "p1", user: str = "u1"
) -> subprocess.CompletedProcess[str]:
    """`workflow-runs start <kind> ...` against `live`, whatever its outcome."""
    return subprocess.run(
        [*CLI, "start", kind, "--project", project, "--user", user, *args],
        env=live.env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def start(live: LiveApi, kind: str, *args: str, project: str = "p1", user: str = "u1") -> tuple[str, str]:
    """Start a run on `live`'s worker; its `(workflow_id, run_id)`."""
    out = start_command(live, kind, *args, project=project, user=user)
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)
    return ids["workflow_id"], ids["run_id"]


def start_runs(env: Mapping[str, str], count: int, *, project: str, user: str) -> list[Run]:
    """Start `count` AgentConversation runs on a task queue no worker polls: they stay RUNNING and
    nothing but the test posts updates to them."""
    quiet = {**env, "TEMPORAL_TASK_QUEUE": f"unpolled-{secrets.token_hex(4)}"}
    runs = []
    for _ in range(count):
        out = subprocess.run(
            [*CLI, "start", "AgentConversation", "--project", project, "--user", user],
            env=quiet,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        ids = json.loads(out.stdout)
        runs.append(Run(ids["workflow_id"], ids["run_id"]))
    return runs

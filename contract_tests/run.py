"""`make contract-test`: Schemathesis fuzzes a live server against the published document.

Without `BASE_URL` it starts the real embedded stack (Temporal dev server, Redis, the sample worker
and `workflow-runs serve`) in a temporary folder and stops it afterwards. Either way it seeds real
runs in every state through Temporal (`TEMPORAL_ADDRESS`, `JWT_SECRET` must then match the server),
so the fuzzer reaches the handlers instead of the 404 path, then runs `schemathesis run --checks all`
with a fixed seed and no example database (deterministic in CI). `CONTRACT_EXAMPLES` (default 12)
raises the number of generated cases per operation for longer local runs.

`--mock` runs the same Schemathesis pass against mock mode instead (`workflow-runs mock`: the same
app on the in-memory backends, seeded from the document's examples), started on a free port and
stopped afterwards; it needs neither Temporal nor Redis and takes seconds, so `make test` runs it
after the live one. Reports go to build/<name>-mock/.

`make fuzz` (`contract_tests.fuzz`) is the same run with another `Profile`: more cases, hostile
strings, server limits that do not end it early.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli import stack
from core.settings import Settings
from core.tokens import mint_token

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "contract"
CONFIG_TEMPLATE = ROOT / "contract_tests" / "schemathesis.toml"


@dataclass(frozen=True)
class Profile:
    """What differs between the Schemathesis runs over the live stack (contract test, fuzz)."""

    name: str  # log prefix; reports go to build/<name>/
    max_examples: str  # generated cases per operation and phase
    stateful_examples: str  # scenarios of the stateful phase
    server_env: Mapping[str, str] = field(default_factory=dict)  # settings of the embedded API
    schemathesis_args: tuple[str, ...] = ()  # after `schemathesis run`; the CLI overrides the file
    schemathesis_env: Mapping[str, str] = field(default_factory=dict)


def contract_profile() -> Profile:
    examples = os.environ.get("CONTRACT_EXAMPLES", "12")
    return Profile(name="contract", max_examples=examples, stateful_examples=examples)


@dataclass(frozen=True)
class Target:
    base_url: str
    temporal: Settings  # how to reach the Temporal the server uses (address, namespace, TLS)
    jwt_secret: str
    task_queue: str
    # Whose token Schemathesis calls with: the principal the seeded runs belong to.
    user: str = "alice"
    project: str = PROJECT
    report_suffix: str = ""  # build/<profile name><suffix>/


def server_env(profile: Profile, jwt_secret: str, data_dir: Path) -> dict[str, str]:
    """The settings every server under test gets (the live stack's addresses come on top)."""
    return {
        **os.environ,
        "JWT_SECRET": jwt_secret,
        "VALIDATE_RESPONSES": "1",
        "DATA_DIR": str(data_dir),
        # Schemathesis calls as one caller, as fast as the server answers: under the default
        # per-caller rate limits it would mostly check 429s (documented on every operation, so not a
        # failure, but not a test of the operations either). Generous limits, still on.
        "RATE_LIMIT_TEMPORAL_PER_SECOND": "100000",
        "RATE_LIMIT_TEMPORAL_BURST": "100000",
        "RATE_LIMIT_UPDATES_PER_SECOND": "100000",
        "RATE_LIMIT_UPDATES_BURST": "100000",
        **profile.server_env,
    }


@contextlib.contextmanager
def embedded_target(profile: Profile) -> Iterator[Target]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"{profile.name}-"))
    temporal_port, redis_port, api_port = stack.free_port(), stack.free_port(), stack.free_port()
    target = Target(
        base_url=f"http://127.0.0.1:{api_port}/api/v1",
        temporal=Settings(temporal_address=f"127.0.0.1:{temporal_port}"),
        jwt_secret=secrets.token_urlsafe(48),
        task_queue="contract-samples",
    )
    env = {
        **server_env(profile, target.jwt_secret, data_dir),
        "PORT": str(api_port),
        "TEMPORAL_ADDRESS": target.temporal.temporal_address,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "API_URL": target.base_url,
        "TEMPORAL_TASK_QUEUE": target.task_queue,
    }
    cli = [sys.executable, "-m", "cli.main"]
    children: list[stack.Child] = []
    with stack.running(children):
        children.append(stack.start_temporal(data_dir, port=temporal_port))
        children.append(stack.start_redis(data_dir, port=redis_port))
        children.append(stack.spawn("api", [*cli, "serve"], data_dir / "logs", env))
        children.append(stack.spawn("worker", [*cli, "worker"], data_dir / "logs", env))
        stack.wait_for_port("127.0.0.1", api_port, 60, children[2].proc)
        print(f"{profile.name}: embedded stack in {data_dir} (logs in {data_dir / 'logs'})", flush=True)
        yield target


@contextlib.contextmanager
def mock_target(profile: Profile) -> Iterator[tuple[Target, dict[str, tuple[str, str]]]]:
    """`workflow-runs mock` on a free port, and its seeded runs: the document's completed example
    run and its running conversation (whose initiator's token sees both)."""
    from backends.memory import MOCK_PROJECT
    from backends.memory import seed as seed_examples
    from web.app import published_document

    seeded = seed_examples(published_document())
    completed = next(r for r in seeded.runs if r.status == "COMPLETED" and not r.details.get("interactive"))
    running = next(r for r in seeded.runs if r.status == "RUNNING" and r.details.get("interactive"))
    kind, _, user = seeded.initiated_by.partition(":")
    data_dir = Path(tempfile.mkdtemp(prefix=f"{profile.name}-mock-"))
    api_port = stack.free_port()
    target = Target(
        base_url=f"http://127.0.0.1:{api_port}/api/v1",
        temporal=Settings(),
        jwt_secret=secrets.token_urlsafe(48),
        task_queue="",
        user=user or kind,
        project=MOCK_PROJECT,
        report_suffix="-mock",
    )
    # Nothing listens at these addresses: mock mode must never need them.
    env = {
        **server_env(profile, target.jwt_secret, data_dir),
        "PORT": str(api_port),
        "TEMPORAL_ADDRESS": "127.0.0.1:1",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    children: list[stack.Child] = []
    with stack.running(children):
        children.append(stack.spawn("api-mock", [sys.executable, "-m", "cli.main", "mock"], data_dir / "logs", env))
        stack.wait_for_port("127.0.0.1", api_port, 60, children[0].proc)
        print(f"{profile.name}: mock mode in {data_dir} (logs in {data_dir / 'logs'})", flush=True)
        yield (
            target,
            {
                "completed": (completed.workflow_id, completed.run_id),
                "conversation": (running.workflow_id, running.run_id),
            },
        )


def seed(target: Target) -> dict[str, tuple[str, str]]:
    """Real runs in every state; returns `name -> (workflow_id, run_id)`."""
    from core import temporal_connection
    from workloads.starter import start_workflow

    async def start_all() -> dict[str, tuple[str, str]]:
        client = await temporal_connection.connect(target.temporal)

        async def start(kind: str, **kwargs: object) -> tuple[str, str]:
            return await start_workflow(client, kind, project=PROJECT, task_queue=target.task_queue, **kwargs)  # type: ignore[arg-type]

        runs = {
            "completed": await start("StandardContentIngestion", user="alice", input={"documentId": "doc-contract"}),
            "conversation": await start("AgentConversation", user="alice", interaction="support"),
            "private": await start("AgentConversation", user="alice", visibility="private"),
            "to_cancel": await start("AgentConversation", user="alice"),
            "to_terminate": await start("AgentConversation", user="alice"),
            "failed": await start("RetryingActivity", user="bob", input={"fail_attempts": 99, "delay_seconds": 0}),
        }
        to_cancel, to_terminate = runs["to_cancel"], runs["to_terminate"]
        await client.get_workflow_handle(to_cancel[0], run_id=to_cancel[1]).cancel()
        await client.get_workflow_handle(to_terminate[0], run_id=to_terminate[1]).terminate(reason="contract seed")
        return runs

    runs = asyncio.run(start_all())
    token = mint_token(target.jwt_secret, user="alice", project=PROJECT)
    expected = {"completed": "COMPLETED", "to_cancel": "CANCELED", "to_terminate": "TERMINATED", "failed": "FAILED"}
    with httpx.Client(base_url=target.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        deadline = time.monotonic() + 120
        pending = dict(expected)
        while pending:
            for name, status in list(pending.items()):
                workflow_id, run_id = runs[name]
                if http.get(f"/workflows/runs/{workflow_id}/{run_id}").json().get("status") == status:
                    del pending[name]
            if time.monotonic() > deadline:
                raise SystemExit(f"contract-test: seeded runs never reached their states: {pending}")
            time.sleep(0.5)
    return runs


def write_config(runs: dict[str, tuple[str, str]], path: Path, profile: Profile) -> None:
    completed, conversation = runs["completed"], runs["conversation"]
    text = CONFIG_TEMPLATE.read_text(encoding="utf-8")
    for placeholder, value in {
        "@COMPLETED_WORKFLOW_ID@": completed[0],
        "@COMPLETED_RUN_ID@": completed[1],
        "@RUNNING_WORKFLOW_ID@": conversation[0],
        "@RUNNING_RUN_ID@": conversation[1],
        "@MAX_EXAMPLES@": profile.max_examples,
        "@STATEFUL_EXAMPLES@": profile.stateful_examples,
    }.items():
        text = text.replace(placeholder, value)
    path.write_text(text, encoding="utf-8")


def run_schemathesis(profile: Profile, target: Target, runs: dict[str, tuple[str, str]]) -> int:
    report_dir = ROOT / "build" / f"{profile.name}{target.report_suffix}"
    report_dir.mkdir(parents=True, exist_ok=True)
    config = report_dir / "schemathesis.toml"
    write_config(runs, config, profile)
    env = {
        **os.environ,
        **profile.schemathesis_env,
        "API_TOKEN": mint_token(target.jwt_secret, user=target.user, project=target.project),
    }
    argv = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file", str(config),
        "run", f"{target.base_url}/openapi.json",
        "--url", target.base_url,
        "--checks", "all",
        "--workers", "1",
        "--report", "junit", "--report-dir", str(report_dir),
        *profile.schemathesis_args,
    ]  # fmt: skip
    print(f"{profile.name}:", " ".join(argv), flush=True)
    return subprocess.run(argv, env=env, cwd=ROOT, check=False).returncode


def main(profile: Profile | None = None, *, mock: bool = False) -> int:
    profile = profile or contract_profile()
    if mock:
        started = time.monotonic()
        with mock_target(profile) as (target, runs):
            status = run_schemathesis(profile, target, runs)
        print(f"{profile.name}: mock mode done in {time.monotonic() - started:.1f} s", flush=True)
        return status
    base_url = os.environ.get("BASE_URL")
    if base_url:
        # The server's own settings, read as it reads them (Temporal profile and TLS included).
        settings = Settings.from_env()
        if not settings.jwt_secret:
            sys.exit("contract test: BASE_URL needs JWT_SECRET, the secret the server verifies tokens with")
        target = Target(
            base_url=base_url.rstrip("/"),
            temporal=settings,
            jwt_secret=settings.jwt_secret,
            task_queue=settings.temporal_task_queue,
        )
        return run_schemathesis(profile, target, seed(target))
    with embedded_target(profile) as target:
        return run_schemathesis(profile, target, seed(target))


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m contract_tests.run", description=__doc__.split("\n")[0])
    parser.add_argument("--mock", action="store_true", help="against mock mode (in memory) instead of the live stack")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(mock=arguments().mock))

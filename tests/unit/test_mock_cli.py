"""`workflow-runs mock`: the API on the in-memory backends, seeded from the document's examples,
with a dev token that sees every seeded run, and never a connection to Temporal or Redis."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from backends.memory import MOCK_PROJECT, seed
from cli import main as cli
from cli import stack
from core.settings import Settings, read_dev_jwt_secret
from web.app import create_app, published_document


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No JWT key, no Temporal profile file, an empty data dir; Temporal and Redis at addresses
    where nothing listens."""
    for name in ("JWT_SECRET", "JWT_PUBLIC_KEY", "JWKS_URL", "JWT_AUDIENCE", "JWT_ISSUER", "PORT", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1")
    monkeypatch.delenv("VALIDATE_RESPONSES", raising=False)
    return tmp_path


def printed_token(output: str) -> str:
    match = re.search(r"export TOKEN=(\S+)", output)
    assert match is not None, output
    return match.group(1)


def run_mock(monkeypatch: pytest.MonkeyPatch, *argv: str) -> list[tuple[Settings, int, Any]]:
    served: list[tuple[Settings, int, Any]] = []

    def serve(settings: Settings, *, port: int, backends_factory: Any = None) -> None:
        served.append((settings, port, backends_factory))

    monkeypatch.setattr(cli, "serve", serve)
    cli.main(["mock", *argv])
    return served


def test_mock_serves_on_the_port_with_the_dev_secret_and_validated_responses(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    [(settings, port, factory)] = run_mock(monkeypatch, "--port", "9321")
    assert port == 9321 and factory is not None
    assert settings.jwt_secret == read_dev_jwt_secret(str(clean_env))  # created as `dev` does
    assert settings.validate_responses
    output = capsys.readouterr().out
    assert "http://127.0.0.1:9321/api/v1" in output
    for run in seed(published_document()).runs:
        assert f"{run.workflow_id}/{run.run_id}" in output
    assert settings.jwt_secret is not None
    claims = jwt.decode(printed_token(output), settings.jwt_secret, algorithms=["HS256"])
    assert claims["project"]["id"] == MOCK_PROJECT
    assert f"{claims['type']}:{claims['sub']}" == seed(published_document()).initiated_by


def test_the_app_mock_serves_answers_on_its_seeded_runs_and_keeps_what_is_posted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    [(settings, _, factory)] = run_mock(monkeypatch)
    headers = {"Authorization": f"Bearer {printed_token(capsys.readouterr().out)}"}
    seeded = seed(published_document())
    running = next(run for run in seeded.runs if run.status == "RUNNING")
    with create_app(settings, factory).test_client() as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
        listed = client.post("/api/v1/workflows/runs", json={"page_size": 200}, headers=headers).json()["runs"]
        assert {run["run_id"] for run in listed} == {run.run_id for run in seeded.runs}
        posted = client.post(
            f"/api/v1/workflows/runs/{running.run_id}/updates", json={"message": "from a test"}, headers=headers
        )
        assert posted.status_code == 200, posted.text
        updates = client.get(f"/api/v1/workflows/runs/{running.workflow_id}/{running.run_id}/updates", headers=headers)
        assert [u["message"] for u in updates.json()["messages"]] == ["from a test"]
    with create_app(settings, factory).test_client() as client:  # another app starts from the examples again
        updates = client.get(f"/api/v1/workflows/runs/{running.workflow_id}/{running.run_id}/updates", headers=headers)
        assert updates.json()["messages"] == []


def test_the_mock_command_starts_without_temporal_or_redis(clean_env: Path) -> None:
    port = stack.free_port()
    command = [sys.executable, "-m", "cli.main", "mock", "--port", str(port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        try:
            assert proc.stdout is not None
            banner = ""
            while "export TOKEN=" not in banner:  # printed, flushed, before the server starts
                line = proc.stdout.readline()
                assert line, banner
                banner += line.decode()
            stack.wait_for_port("127.0.0.1", port, 60, proc)
            base = f"http://127.0.0.1:{port}"
            ready = httpx.get(f"{base}/health/ready")
            assert ready.json() == {"status": "ok", "checks": {"temporal": "ok", "redis": "ok"}}
            headers = {"Authorization": f"Bearer {printed_token(banner)}"}
            listed = httpx.post(f"{base}/api/v1/workflows/runs", json={}, headers=headers)
            assert listed.status_code == 200 and listed.json()["runs"]
            proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()

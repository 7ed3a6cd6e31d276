"""The embedded stack never adopts a process it did not start: `dev` refuses a port in use before
starting anything, and a server that exits at start fails loudly. Ports are held by sockets the
tests bind themselves; no Temporal or Redis is started."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import main as cli
from cli import stack
from core.settings import Settings

# What decides what `dev` starts and how: unset for these tests.
ENV = (
    "PORT",
    "HOST",
    "API_URL",
    "VALIDATE_RESPONSES",
    "JWT_SECRET",
    "JWT_PUBLIC_KEY",
    "JWKS_URL",
    "TEMPORAL_ADDRESS",
    "TEMPORAL_PROFILE",
    "REDIS_URL",
)


@pytest.fixture
def taken() -> Iterator[int]:
    """A free port that a listening socket of this test then holds."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((stack.LOCALHOST, 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def dev_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment for `dev` (no Temporal profile file either), nothing started."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # dev's SIGTERM handler: not in pytest

    def must_not_start(*args: Any, **kwargs: Any) -> stack.Child:
        raise AssertionError("dev started a process although a port is taken")

    for name in ("start_temporal", "start_redis", "spawn"):
        monkeypatch.setattr(stack, name, must_not_start)
    return tmp_path


def run_dev(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dev", *argv])
    code = exited.value.code
    assert isinstance(code, int)
    return code


def test_port_in_use_sees_a_listening_socket_and_not_a_free_port(taken: int) -> None:
    assert stack.port_in_use(stack.LOCALHOST, taken)
    assert not stack.port_in_use(stack.LOCALHOST, stack.free_port())


def test_a_port_freed_by_its_listener_is_free_again() -> None:
    with socket.socket() as holder:
        holder.bind((stack.LOCALHOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert stack.port_in_use(stack.LOCALHOST, port)
    assert not stack.port_in_use(stack.LOCALHOST, port)


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        (
            "--temporal-port",
            "(Temporal) is in use by another process: point TEMPORAL_ADDRESS at that server on purpose,"
            " or pick another port with --temporal-port",
        ),
        (
            "--redis-port",
            "(Redis) is in use by another process: point REDIS_URL at that server on purpose,"
            " or pick another port with --redis-port",
        ),
        ("--port", "(the API) is in use by another process: stop that process, or pick another port with --port"),
    ],
)
def test_dev_exits_2_with_one_line_when_a_port_it_would_bind_is_taken(
    dev_env: Path, taken: int, capsys: pytest.CaptureFixture[str], which: str, expected: str
) -> None:
    ports = {"--port": stack.free_port(), "--temporal-port": stack.free_port(), "--redis-port": stack.free_port()}
    ports[which] = taken
    argv = [text for flag, port in ports.items() for text in (flag, str(port))]
    assert run_dev(*argv) == 2
    out, err = capsys.readouterr()
    assert err == f"workflow-runs dev: port {taken} {expected}\n"
    assert out == ""  # no banner
    assert not (dev_env / "jwt-secret").exists()  # nothing was done at all


@pytest.mark.parametrize("pointed_by", ["TEMPORAL_ADDRESS", "the Temporal profile file"])
def test_dev_does_not_check_a_server_it_was_pointed_at(
    dev_env: Path, taken: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], pointed_by: str
) -> None:
    # The address names the process on `taken` on purpose: dev uses it and starts no Temporal;
    # Redis then dies at start, which ends dev with its reason, not with a banner.
    address = f"{stack.LOCALHOST}:{taken}"
    if pointed_by == "TEMPORAL_ADDRESS":
        monkeypatch.setenv("TEMPORAL_ADDRESS", address)
    else:
        profile = dev_env / "temporal.toml"
        profile.write_text(f'[profile.default]\naddress = "{address}"\n', encoding="utf-8")
        monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(profile))

    def redis_dies(*args: Any, **kwargs: Any) -> stack.Child:
        raise stack.StartError("redis-server exited with status 1 at start; see x.log: Bad directive")

    monkeypatch.setattr(stack, "start_redis", redis_dies)
    code = run_dev(
        "--temporal-port", str(taken), "--redis-port", str(stack.free_port()), "--port", str(stack.free_port())
    )
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == "workflow-runs dev: redis-server exited with status 1 at start; see x.log: Bad directive\n"


class FakeChild:
    def stop(self) -> None:
        pass


def test_dev_serves_the_stack_it_started_and_hands_its_settings_down_not_through_os_environ(
    dev_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_APPENDFSYNC", "everysec")
    started: dict[str, Any] = {}

    def start_temporal(data_dir: Path, *, port: int) -> FakeChild:
        started["temporal"] = port
        return FakeChild()

    def start_redis(data_dir: Path, *, port: int, maxmemory: str, appendfsync: str) -> FakeChild:
        started["redis"] = (port, maxmemory, appendfsync)
        return FakeChild()

    def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> FakeChild:
        started["worker"] = (argv[-1], env)
        return FakeChild()

    def serve(settings: Settings, *, port: int) -> None:
        started["api"] = (settings, port)

    monkeypatch.setattr(stack, "start_temporal", start_temporal)
    monkeypatch.setattr(stack, "start_redis", start_redis)
    monkeypatch.setattr(stack, "spawn", spawn)
    monkeypatch.setattr(cli, "serve", serve)
    environment = dict(os.environ)

    cli.main(["dev", "--port", "18080", "--temporal-port", "17233", "--redis-port", "16379"])

    assert dict(os.environ) == environment
    secret = (dev_env / "jwt-secret").read_text(encoding="utf-8")
    settings, port = started["api"]
    assert port == settings.port == 18080
    assert (settings.temporal_address, settings.redis_url) == ("127.0.0.1:17233", "redis://127.0.0.1:16379/0")
    assert (settings.api_url, settings.validate_responses, settings.jwt_secret) == (
        "http://127.0.0.1:18080/api/v1",
        True,
        secret,
    )
    assert started["temporal"] == 17233
    assert started["redis"] == (16379, "1gb", "everysec")
    command, worker_env = started["worker"]
    assert command == "worker"
    assert {name: worker_env[name] for name in ("TEMPORAL_ADDRESS", "REDIS_URL", "API_URL", "JWT_SECRET")} == {
        "TEMPORAL_ADDRESS": "127.0.0.1:17233",
        "REDIS_URL": "redis://127.0.0.1:16379/0",
        "API_URL": "http://127.0.0.1:18080/api/v1",
        "JWT_SECRET": secret,
    }
    out = capsys.readouterr().out
    assert "  Temporal    127.0.0.1:17233\n  Redis       redis://127.0.0.1:16379/0\n" in out
    assert "export TOKEN=" in out


def test_start_redis_and_start_temporal_refuse_a_taken_port_without_starting_anything(
    taken: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack, "spawn", lambda *args, **kwargs: pytest.fail("spawned"))
    with pytest.raises(stack.PortInUse, match=rf"port {taken} \(Redis\)"):
        stack.start_redis(tmp_path, port=taken)
    with pytest.raises(stack.PortInUse, match=rf"port {taken} \(Temporal\)"):
        stack.start_temporal(tmp_path, port=taken)


def test_a_child_that_exits_at_start_fails_loudly_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('FATAL CONFIG FILE ERROR: bad maxmemory', flush=True); sys.exit(3)"
    child = stack.spawn("dies", [sys.executable, "-c", script], tmp_path)
    with pytest.raises(stack.StartError) as failed:
        stack.wait_for_port(
            stack.LOCALHOST, stack.free_port(), 30.0, child.proc, what="the server", log_path=child.log_path
        )
    message = str(failed.value)
    assert message.startswith("the server exited with status 3 at start; see ")
    assert message.endswith("FATAL CONFIG FILE ERROR: bad maxmemory") and "\n" not in message


def test_a_child_gone_when_its_port_answers_did_not_start_whatever_answers(taken: int, tmp_path: Path) -> None:
    # Something else listens on the port (here, this test); the child itself has already exited.
    child = stack.spawn("gone", [sys.executable, "-c", "pass"], tmp_path)
    child.proc.wait()
    with pytest.raises(stack.StartError, match="exited with status 0 at start"):
        stack.wait_for_port(stack.LOCALHOST, taken, 30.0, child.proc, what="the server", log_path=child.log_path)

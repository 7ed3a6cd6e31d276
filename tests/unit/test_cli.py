"""The commands build their settings once, from the environment, and never write it back: `serve`
hands uvicorn its port and the settings the app is built from; `token` signs with the secret
the settings resolved; the commands that use CODEC_KEY check it at start. (`dev` is tested in
test_stack.py, and here with SAMPLES_ENCRYPT.)"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from temporalio.api.common.v1 import Payload
from uvicorn.config import STARTUP_FAILURE

from cli import main as cli
from cli import stack
from core.codec_wire import payloads_json
from core.settings import Settings, create_dev_jwt_secret
from workloads.codec import EncryptionCodec


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No JWT key, no Temporal profile file, an empty data dir."""
    for name in ("JWT_SECRET", "JWT_PUBLIC_KEY", "JWKS_URL", "JWT_AUDIENCE", "JWT_ISSUER", "PORT", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))
    return tmp_path


def exit_code(*argv: str) -> object:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    return exited.value.code


def claims(token: str, secret: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, secret, algorithms=["HS256"])
    return decoded


def test_token_signs_with_jwt_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    cli.main(["token", "--user", "u", "--project", "p"])
    token = capsys.readouterr().out.strip()
    assert claims(token, "s" * 32)["project"]["id"] == "p"


def test_token_signs_with_the_dev_secret_file(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = create_dev_jwt_secret(str(clean_env))
    cli.main(["token", "--user", "u", "--project", "p", "--ttl", "60"])
    assert claims(capsys.readouterr().out.strip(), secret)["sub"] == "u"


def test_token_without_a_secret_says_how_to_get_one(clean_env: Path) -> None:
    code = exit_code("token", "--user", "u", "--project", "p")
    assert (
        code == f"no JWT_SECRET set and no {clean_env / 'jwt-secret'}: run `workflow-runs dev` first or set JWT_SECRET"
    )


def test_an_invalid_setting_stops_any_command_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.setenv("PORT", "abc")
    code = exit_code("token", "--user", "u", "--project", "p")
    assert code == 2
    assert capsys.readouterr() == ("", "workflow-runs token: PORT must be a whole number, 0 or more, not 'abc'\n")


@pytest.mark.parametrize(("argv", "port"), [((), 8001), (("--port", "9123"), 9123)])
def test_serve_gives_uvicorn_the_port_and_its_settings_and_leaves_the_environment_alone(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, argv: tuple[str, ...], port: int
) -> None:
    monkeypatch.setenv("PORT", "8001")
    create_dev_jwt_secret(str(clean_env))
    served: list[tuple[Settings, int]] = []
    monkeypatch.setattr(cli, "serve", lambda settings, *, port: served.append((settings, port)))
    environment = dict(os.environ)
    cli.main(["serve", *argv])
    assert dict(os.environ) == environment
    [(settings, bound)] = served
    assert bound == port
    assert settings == Settings.from_env()


def test_serve_without_any_jwt_key_says_how_to_get_one(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "serve", lambda *args, **kwargs: pytest.fail("served"))
    code = exit_code("serve")
    assert (
        code == f"no JWT_SECRET set and no {clean_env / 'jwt-secret'}: run `workflow-runs dev` first or set JWT_SECRET"
    )


# -- encrypted payloads: the key, the codec server, dev with SAMPLES_ENCRYPT -----------------------

CODEC_VARIABLES = (
    "CODEC_KEY",
    "CODEC_KEY_ID",
    "SAMPLES_ENCRYPT",
    "TEMPORAL_CODEC_ENDPOINT",
    "TEMPORAL_CODEC_AUTH",
    "CODEC_CORS_ORIGINS",
    "CODEC_MAX_BODY_BYTES",
    "HOST",
    "REDIS_URL",
    "TEMPORAL_ADDRESS",
)


@pytest.fixture
def codec_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in CODEC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # dev's SIGTERM handler: not in pytest
    return clean_env


@pytest.mark.parametrize(
    ("argv", "variables", "message"),
    [
        (("codec-server",), {}, "CODEC_KEY is empty: set it to the base64 of 32 random bytes."),
        (("codec-server",), {"CODEC_KEY": "not base64!"}, "CODEC_KEY is not base64"),
        (("worker",), {"SAMPLES_ENCRYPT": "1"}, "CODEC_KEY is empty"),
        (
            ("start", "RetryingActivity", "--project", "p", "--user", "u"),
            {"SAMPLES_ENCRYPT": "1"},
            "CODEC_KEY is empty",
        ),
        # A key that is set is checked whatever the command: an invalid value stops it, as any setting's does.
        (("serve",), {"CODEC_KEY": base64.b64encode(b"k" * 16).decode()}, "CODEC_KEY decodes to 16 bytes"),
    ],
)
@pytest.mark.usefixtures("codec_env")
def test_a_missing_or_invalid_codec_key_stops_the_commands_that_need_it_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    variables: dict[str, str],
    message: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert exit_code(*argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"workflow-runs {argv[0]}: {message}")
    assert err.count("\n") == 1
    assert "not base64!" not in err  # the message names the setting, never its value


def test_the_codec_server_serves_the_key_on_host_and_port(codec_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    key = os.urandom(32)
    monkeypatch.setenv("CODEC_KEY", base64.b64encode(key).decode())
    monkeypatch.setenv("HOST", "0.0.0.0")  # noqa: S104  # only handed to the fake server
    served: list[uvicorn.Config] = []

    class FakeServer:
        def __init__(self, config: uvicorn.Config) -> None:
            self.config, self.started = config, True

        def run(self) -> None:
            served.append(self.config)

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    cli.main(["codec-server", "--port", "9181"])
    [config] = served
    assert (config.host, config.port) == ("0.0.0.0", 9181)  # noqa: S104
    assert isinstance(config.app, Starlette)
    app = config.app

    async def decoded() -> bytes:
        payload = EncryptionCodec(key).encrypt(Payload(metadata={"encoding": b"json/plain"}, data=b'{"a":1}'))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://codec") as http:
            answer = await http.post(
                "/decode", content=payloads_json([payload]), headers={"Content-Type": "application/json"}
            )
        return base64.b64decode(answer.json()["payloads"][0]["data"])

    assert asyncio.run(decoded()) == b'{"a":1}'


class FakeChild:
    def stop(self) -> None:
        pass


def run_encrypting_dev(monkeypatch: pytest.MonkeyPatch, *argv: str) -> dict[str, Any]:
    """`dev` with SAMPLES_ENCRYPT=1, every child faked: what each was started with."""
    monkeypatch.setenv("SAMPLES_ENCRYPT", "1")
    started: dict[str, Any] = {}

    def start_temporal(data_dir: Path, *, port: int, **ui: Any) -> FakeChild:
        started["temporal"] = (port, ui)
        return FakeChild()

    def start_redis(data_dir: Path, *, port: int, maxmemory: str, appendfsync: str) -> FakeChild:
        return FakeChild()

    def start_codec_server(data_dir: Path, env: dict[str, str], *, port: int) -> FakeChild:
        started["codec"] = (port, env)
        return FakeChild()

    def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> FakeChild:
        started[argv[-1]] = env
        return FakeChild()

    monkeypatch.setattr(stack, "start_temporal", start_temporal)
    monkeypatch.setattr(stack, "start_redis", start_redis)
    monkeypatch.setattr(stack, "start_codec_server", start_codec_server)
    monkeypatch.setattr(stack, "spawn", spawn)
    monkeypatch.setattr(cli, "serve", lambda settings, *, port: started.setdefault("api", settings))
    ports = [str(stack.free_port()) for _ in range(4)]
    cli.main(
        [
            "dev",
            "--port",
            ports[0],
            "--temporal-port",
            ports[1],
            "--redis-port",
            ports[2],
            "--codec-port",
            ports[3],
            *argv,
        ]
    )
    started["codec_port"] = int(ports[3])
    return started


def test_dev_with_samples_encrypt_keeps_a_key_serves_the_codec_and_points_worker_and_api_at_them(
    codec_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAMPLES_ENCRYPT", "1")
    environment = dict(os.environ)
    started = run_encrypting_dev(monkeypatch)
    assert dict(os.environ) == environment  # what dev hands its children, it hands them, not os.environ

    key = (codec_env / "codec-key").read_text(encoding="utf-8")
    assert len(base64.b64decode(key)) == 32
    codec_port, codec_child_env = started["codec"]
    assert codec_child_env["CODEC_KEY"] == key
    assert "CODEC_CORS_ORIGINS" not in codec_child_env  # no Web UI: no browser calls it
    assert (started["worker"]["SAMPLES_ENCRYPT"], started["worker"]["CODEC_KEY"]) == ("1", key)
    api: Settings = started["api"]
    assert api.temporal_codec_endpoint == f"http://127.0.0.1:{codec_port}"
    assert started["temporal"][1] == {}  # headless, as without encryption
    out = capsys.readouterr().out
    assert f"  codec       http://127.0.0.1:{codec_port} (payloads encrypted; Web UI off" in out
    assert key not in out

    # The key is kept: runs encrypted before a restart stay readable.
    started = run_encrypting_dev(monkeypatch)
    assert started["worker"]["CODEC_KEY"] == key


def test_dev_with_a_web_ui_gives_it_the_codec_endpoint_and_lets_its_origin_call_the_codec(
    codec_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ui_port = stack.free_port()
    started = run_encrypting_dev(monkeypatch, "--temporal-ui-port", str(ui_port))
    codec = f"http://127.0.0.1:{started['codec_port']}"
    assert started["temporal"][1] == {"ui_port": ui_port, "ui_codec_endpoint": codec}
    assert started["codec"][1]["CODEC_CORS_ORIGINS"] == f"http://127.0.0.1:{ui_port},http://localhost:{ui_port}"


def test_dev_uses_the_codec_server_temporal_codec_endpoint_names_and_starts_none(
    codec_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPORAL_CODEC_ENDPOINT", "https://codec.example.com")
    started = run_encrypting_dev(monkeypatch)
    assert "codec" not in started
    assert started["api"].temporal_codec_endpoint == "https://codec.example.com"
    assert started["worker"]["SAMPLES_ENCRYPT"] == "1"


def test_dev_refuses_a_taken_codec_port_before_starting_anything(
    codec_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAMPLES_ENCRYPT", "1")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        argv = ["--port", str(stack.free_port()), "--temporal-port", str(stack.free_port())]
        code = exit_code("dev", *argv, "--redis-port", str(stack.free_port()), "--codec-port", str(taken))
    assert code == 2
    assert f"port {taken} (the codec server) is in use by another process" in capsys.readouterr().err


def test_a_worker_that_cannot_build_its_server_fails_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exiting with uvicorn's start-up failure code stops the supervisor; any other code would have
    # it replace the worker, which would fail the same way, every few seconds, for ever.
    def broken(settings: Settings, *, port: int) -> cli.GracefulServer:
        raise RuntimeError("cannot build")

    monkeypatch.setattr(cli, "graceful_server", broken)
    config = uvicorn.Config("web.app:app_from_env", log_config=None)
    worker = cli.WorkerProcess(config, [], settings=Settings(), port=0)
    with pytest.raises(SystemExit) as exited:
        worker.target()
    assert exited.value.code == STARTUP_FAILURE

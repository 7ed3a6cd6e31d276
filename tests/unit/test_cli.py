"""The commands build their settings once, from the environment, and never write it back: `serve`
hands uvicorn its port and the settings the app is built from; `token` signs with the secret
the settings resolved. (`dev` is tested in test_stack.py.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jwt
import pytest

from cli import main as cli
from core.settings import Settings, create_dev_jwt_secret


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

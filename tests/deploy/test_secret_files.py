"""Secrets reach the pods as files: PONY_X_FILE names the file holding setting PONY_X (the mounted Secret keys of
deploy/base/patches/secret-files.yaml), the variable itself wins, and an unreadable file is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pony_common.config import ConfigError, Settings
from tests.deploy.manifests import find, of_kind


def test_a_setting_is_read_from_the_file_its_file_variable_names(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("postgresql+psycopg://pony:s3cret@db:5432/pony\n")
    (tmp_path / "broker").write_text("amqp://pony:s3cret@mq:5672//")
    settings = Settings.from_env(
        {"PONY_DATABASE_URL_FILE": str(tmp_path / "db"), "PONY_BROKER_URL_FILE": str(tmp_path / "broker")}
    )
    assert settings.database_url == "postgresql+psycopg://pony:s3cret@db:5432/pony"
    assert settings.broker_url == "amqp://pony:s3cret@mq:5672//"
    assert "PONY_DATABASE_URL_FILE" not in settings.extra


def test_the_variable_wins_over_its_file(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("postgresql+psycopg://from-file/pony")
    env = {"PONY_DATABASE_URL": "postgresql+psycopg://from-env/pony", "PONY_DATABASE_URL_FILE": str(tmp_path / "db")}
    assert Settings.from_env(env).database_url == "postgresql+psycopg://from-env/pony"


def test_a_missing_secret_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PONY_BROKER_URL_FILE: cannot read"):
        Settings.from_env({"PONY_BROKER_URL_FILE": str(tmp_path / "absent")})


def test_settings_that_are_files_themselves_keep_their_meaning(tmp_path: Path) -> None:
    # PONY_CLIENT_TOKEN_FILE is a setting of its own (a path), not "the file holding PONY_CLIENT_TOKEN".
    (tmp_path / "token").write_text("t0ken")
    settings = Settings.from_env({"PONY_CLIENT_TOKEN_FILE": str(tmp_path / "token")})
    assert settings.client_token_file == str(tmp_path / "token")


def test_the_file_variables_point_into_the_mounted_secrets(dev) -> None:
    (files,) = [c for c in of_kind(dev, "ConfigMap") if c["metadata"]["name"].startswith("pony-secret-files")]
    worker = find(dev, "Deployment", "worker-caption")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
    keys = set()
    for source in next(v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")["projected"][
        "sources"
    ]:
        secret = find(dev, "Secret", source["secret"]["name"])
        keys |= set(secret["data"])
    assert {f"{mount['mountPath']}/{key}" for key in keys} == set(files["data"].values())
    assert set(files["data"]) == {f"{key}_FILE" for key in keys}

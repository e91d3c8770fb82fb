"""The settings object: env over params, one S3 endpoint for every consumer, secrets masked and
refused in params, `${VAR}` interpolation, and errors that name the key and the fix."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dynroute.platform.config.params import Params
from dynroute.platform.config.settings import Settings
from dynroute.platform.url_secrets import MASK, SettingsError, mask_url

ENDPOINT = "http://127.0.0.1:9000"


def params(**sections) -> Params:
    """Params with some fields of some sections replaced: params(tune={"storage": ...})."""
    base = Params()
    return replace(base, **{name: replace(getattr(base, name), **values)
                            for name, values in sections.items()})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository root with an S3 DVC remote and no endpointurl."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = storage\n['remote \"storage\"']\n    url = s3://data/dvc\n")
    return tmp_path


def render(p: Params | None = None, root: Path | None = None, **env: str) -> Settings:
    return Settings.render(p or Params(), env=env, root=root or Path("/nonexistent-root"))


# -- precedence ---------------------------------------------------------------------------------


def test_defaults_come_from_params_and_paths_are_made_absolute(tmp_path):
    s = render(root=tmp_path)
    assert s.ray_address == "local" and s.ray_is_local
    assert s.run_storage == str(tmp_path / "artifacts/runs")
    assert s.tune_results == str(tmp_path / "artifacts/tune")
    assert s.tracking_uri == "local"
    assert s.optuna_storage == str(tmp_path / "artifacts/tune/optuna.journal")
    assert not s.optuna_is_rdb
    assert s.s3_endpoint is None and s.s3_env() == {}
    assert s.dvc_remote is None


def test_environment_overrides_params():
    p = params(tracking={"uri": "http://params-host:5000"},
               tune={"storage": "postgresql://u@params-db/optuna"})
    assert render(p).tracking_uri == "http://params-host:5000"
    s = render(p, MLFLOW_TRACKING_URI="http://env-host:5000",
               DYNROUTE_OPTUNA_STORAGE="postgresql://u@env-db/optuna",
               RAY_ADDRESS="ray://head:10001")
    assert s.tracking_uri == "http://env-host:5000"
    assert s.optuna_storage == "postgresql://u@env-db/optuna" and s.optuna_is_rdb
    assert s.ray_address == "ray://head:10001" and not s.ray_is_local
    assert s.sources["tracking_uri"] == "MLFLOW_TRACKING_URI"
    assert s.sources["optuna_storage"] == "DYNROUTE_OPTUNA_STORAGE"


def test_s3_storage_is_kept_as_a_uri():
    s = render(params(run={"storage": "s3://bucket/runs/"}))
    assert s.run_storage == "s3://bucket/runs"


@pytest.mark.parametrize("address", ["auto", "head:6379", "10.0.0.1:6379", "ray://head:10001",
                                     "http://head:8265"])
def test_ray_addresses_that_ray_accepts(address):
    assert render(RAY_ADDRESS=address).ray_address == address


# -- one S3 endpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                                 "MLFLOW_S3_ENDPOINT_URL"])
def test_every_consumer_gets_the_same_endpoint_whichever_variable_sets_it(repo, var):
    (repo / ".dvc" / "config.local").write_text(
        f"['remote \"storage\"']\n    endpointurl = {ENDPOINT}\n")
    s = render(root=repo, **{var: ENDPOINT + "/"})
    env = s.s3_env()
    assert env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"] == ENDPOINT  # Arrow, MLflow
    assert s.dvc_remote_options() == {"endpointurl": ENDPOINT}  # DVC
    assert s.arrow_s3_options()["endpoint_override"] == "127.0.0.1:9000"
    assert s.arrow_s3_options()["scheme"] == "http"
    assert s.dvc_remote == "storage" and s.dvc_remote_url == "s3://data/dvc"


def test_the_s3_specific_variable_wins_over_the_global_one():
    s = render(AWS_ENDPOINT_URL_S3=ENDPOINT, AWS_ENDPOINT_URL="http://127.0.0.1:4566")
    assert s.s3_endpoint == ENDPOINT and s.sources["s3_endpoint"] == "AWS_ENDPOINT_URL_S3"


def test_an_mlflow_endpoint_that_disagrees_is_refused():
    with pytest.raises(SettingsError, match=r"MLFLOW_S3_ENDPOINT_URL.*disagree"):
        render(AWS_ENDPOINT_URL_S3=ENDPOINT, MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:9001")


def test_a_dvc_endpointurl_that_disagrees_is_refused(repo):
    (repo / ".dvc" / "config.local").write_text(
        "['remote \"storage\"']\n    endpointurl = http://127.0.0.1:9999\n")
    with pytest.raises(SettingsError, match=r"endpointurl = http://127.0.0.1:9999.*"
                                            r"AWS_ENDPOINT_URL_S3=http://127.0.0.1:9999"):
        render(root=repo)
    with pytest.raises(SettingsError, match="dvc remote modify storage endpointurl"):
        render(root=repo, AWS_ENDPOINT_URL_S3=ENDPOINT)


def test_s3_env_adds_credentials_only_when_asked():
    s = render(AWS_ENDPOINT_URL_S3=ENDPOINT, AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
               AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI", AWS_DEFAULT_REGION="eu-west-1")
    assert "AWS_SECRET_ACCESS_KEY" not in s.s3_env()
    assert s.s3_env()["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert s.s3_env(credentials=True)["AWS_SECRET_ACCESS_KEY"] == "wJalrXUtnFEMI"


def test_relative_local_dvc_remote_resolves_from_the_dvc_folder(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = local\n['remote \"local\"']\n    url = ../.dvc-remote\n")
    assert render(root=tmp_path).dvc_remote_url == str((tmp_path / ".dvc-remote").resolve())


# -- secrets ------------------------------------------------------------------------------------

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEID", "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-key",
           "AWS_SESSION_TOKEN": "session-tok-123", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-456",
           "MLFLOW_TRACKING_TOKEN": "mlflow-tok-789", "RAY_AUTH_TOKEN": "ray-tok-abc"}


def test_secrets_never_appear_in_repr_str_or_describe():
    s = render(DYNROUTE_OPTUNA_STORAGE="postgresql://optuna:db-pass-xyz@db:5432/optuna",
               MLFLOW_TRACKING_URI="https://bob:mlflow-url-pw@mlflow.example.com", **SECRETS)
    assert s.optuna_storage.endswith("db-pass-xyz@db:5432/optuna")  # the real value, for Optuna
    for text in (repr(s), str(s), s.describe()):
        for secret in [*SECRETS.values(), "db-pass-xyz", "mlflow-url-pw"]:
            assert secret not in text
        assert "postgresql://optuna:***@db:5432/optuna" in text
        assert "https://bob:***@mlflow.example.com" in text
    for name in SECRETS:
        assert f"{name}" in s.describe()


def test_describe_is_a_table_of_every_endpoint():
    lines = render(AWS_ENDPOINT_URL_S3=ENDPOINT).describe().splitlines()
    assert lines[0].split() == ["endpoint", "value", "from"]
    names = {"Ray address", "Ray storage (runs)", "MLflow tracking URI", "S3 endpoint",
             "Optuna storage (journal)", "DVC remote"}
    assert all(any(line.startswith(n) for line in lines) for n in names)
    assert any(line.startswith("S3 endpoint") and line.endswith("AWS_ENDPOINT_URL_S3")
               for line in lines)


@pytest.mark.parametrize("key,value", [
    ("tune.storage", "postgresql://optuna:hunter2@db/optuna"),
    ("tune.storage", "postgresql://db/optuna?user=optuna&password=hunter2"),
    ("tracking.uri", "https://alice:hunter2@mlflow.example.com"),
])
def test_a_secret_in_params_is_refused_with_the_env_var_hint(key, value):
    section, name = key.split(".")
    with pytest.raises(SettingsError) as err:
        render(params(**{section: {name: value}}), DYNROUTE_DB_PASSWORD="unused")
    message = str(err.value)
    assert key in message and "${" in message and "environment variable" in message
    assert "hunter2" not in message


def test_a_secret_in_params_is_refused_even_when_the_env_overrides_it():
    """params.yaml is committed: its literal password is a leak whatever wins at run time."""
    p = params(tune={"storage": "postgresql://optuna:hunter2@db/optuna"})
    with pytest.raises(SettingsError, match=r"tune.storage"):
        render(p, DYNROUTE_OPTUNA_STORAGE="postgresql://optuna@other-db/optuna")
    with pytest.raises(SettingsError, match=r"run.storage"):
        render(params(run={"storage": "s3://k:hunter2@bucket/x"}))


# -- ${VAR} interpolation -------------------------------------------------------------------


def test_interpolation_resolves_from_the_environment_and_encodes_passwords():
    p = params(tune={"storage": "postgresql://optuna:${DB_PASSWORD}@${DB_HOST}:5432/optuna"})
    s = render(p, DB_PASSWORD="p@ss/w:rd", DB_HOST="db.internal")
    assert s.optuna_storage == "postgresql://optuna:p%40ss%2Fw%3Ard@db.internal:5432/optuna"
    assert "p%40ss" not in s.describe() and "p@ss" not in repr(s)
    assert "postgresql://optuna:***@db.internal:5432/optuna" in s.describe()


def test_interpolation_in_a_storage_path():
    s = render(params(run={"storage": "s3://${BUCKET}/runs"}), BUCKET="team-bucket")
    assert s.run_storage == "s3://team-bucket/runs"


def test_an_unset_variable_is_named_with_the_key():
    p = params(tune={"storage": "postgresql://optuna:${DB_PASSWORD}@db/optuna"})
    with pytest.raises(SettingsError, match=r"tune.storage refers to \$\{DB_PASSWORD\}.*export "
                                            r"DB_PASSWORD"):
        render(p)


@pytest.mark.parametrize("value", ["s3://${BUCKET/runs", "s3://${1BAD}/runs"])
def test_a_malformed_placeholder_is_refused(value):
    with pytest.raises(SettingsError, match=r"run.storage"):
        render(params(run={"storage": value}), BUCKET="b")


# -- malformed values ---------------------------------------------------------------------------


@pytest.mark.parametrize("env,match", [
    ({"AWS_ENDPOINT_URL_S3": "127.0.0.1:9000"}, "AWS_ENDPOINT_URL_S3.*http"),
    ({"AWS_ENDPOINT_URL": "ftp://store"}, "AWS_ENDPOINT_URL = 'ftp://store'"),
    ({"MLFLOW_S3_ENDPOINT_URL": "http://host:port"}, "MLFLOW_S3_ENDPOINT_URL.*port"),
    ({"RAY_ADDRESS": "head"}, "RAY_ADDRESS='head'.*host:port"),
    ({"RAY_ADDRESS": "ray://head"}, "RAY_ADDRESS"),
    ({"RAY_AUTH_MODE": "tokens"}, "RAY_AUTH_MODE.*token or disabled"),
    ({"MLFLOW_TRACKING_URI": "./mlruns"}, "MLFLOW_TRACKING_URI.*file store.*sqlite"),
    ({"DYNROUTE_OPTUNA_STORAGE": "postgres://u@db/o"}, "DYNROUTE_OPTUNA_STORAGE.*postgresql://"),
    ({"DYNROUTE_OPTUNA_STORAGE": "redis://db:6379"}, "DYNROUTE_OPTUNA_STORAGE.*journal file"),
])
def test_malformed_environment_values_name_the_variable(env, match):
    with pytest.raises(SettingsError, match=match):
        render(**env)


@pytest.mark.parametrize("section,values,match", [
    ("run", {"storage": "http://bucket/runs"}, "run.storage.*s3://"),
    ("run", {"storage": "s3:///runs"}, "run.storage.*names no bucket"),
    ("run", {"storage": ""}, "run.storage is empty"),
    ("tune", {"results": "bucket:runs"}, "tune.results"),
    ("tracking", {"uri": "mlflow.example.com"}, "tracking.uri.*http://"),
    ("tracking", {"uri": "file:///tmp/mlruns"}, "tracking.uri.*file store"),
    ("tune", {"storage": "s3://bucket/optuna"}, "tune.storage.*RDB URL"),
])
def test_malformed_params_values_name_the_key(section, values, match):
    with pytest.raises(SettingsError, match=match):
        render(params(**{section: values}))


def test_a_dvc_config_with_credentials_is_refused(repo):
    with (repo / ".dvc" / "config").open("a") as f:
        f.write("    secret_access_key = abc\n")
    with pytest.raises(SettingsError, match=r"secret_access_key.*environment"):
        render(root=repo)


def test_a_dvc_default_remote_without_url_is_named(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = missing\n")
    with pytest.raises(SettingsError, match="dvc remote add missing"):
        render(root=tmp_path)


def test_mask_url_keeps_everything_but_the_password():
    assert mask_url("postgresql+psycopg2://u:p@h:5/d?sslmode=require&password=x") == \
        f"postgresql+psycopg2://u:{MASK}@h:5/d?sslmode=require&password={MASK}"
    assert mask_url("s3://bucket/a@b") == "s3://bucket/a@b"  # '@' in the path is no user info
    assert mask_url("http://host:5000") == "http://host:5000"

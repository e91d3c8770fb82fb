"""One settings object that renders every endpoint from `params.yaml` and the environment.

Every endpoint (Ray address, storage path, MLflow URI, the S3 endpoint in the forms Arrow, MLflow
and DVC each expect, Optuna storage) is rendered once, by `Settings.render` (docs/platform.md,
"Processes and storage"); callers ask it, never `os.environ`, for an endpoint.

Where each value comes from (first match wins):

| endpoint | source |
|---|---|
| Ray address | RAY_ADDRESS, else `local` (a single-node Ray on 127.0.0.1) |
| Ray storage | run.storage, tune.results (a path, made absolute, or s3://bucket/prefix) |
| MLflow tracking URI | MLFLOW_TRACKING_URI, else tracking.uri (`local` / `none` / a URI) |
| S3 endpoint | AWS_ENDPOINT_URL_S3 > AWS_ENDPOINT_URL (as botocore) > MLFLOW_S3_ENDPOINT_URL [1] |
| Optuna storage | DYNROUTE_OPTUNA_STORAGE, else tune.storage (an RDB URL or a journal file) |
| DVC remote | core.remote of .dvc/config, with .dvc/config.local over it (DVC's order) [2] |

[1] MLFLOW_S3_ENDPOINT_URL set beside a winner must name the same endpoint; `s3_env()` gives
    every consumer the winner. [2] The remote's `endpointurl`, when set, must be that endpoint.

Secrets (AWS keys, MLflow password/token, the Ray token, database passwords) come only from the
environment. A URL in params.yaml may name them as `${ENV_VAR}`, resolved at render time; a
literal password there is refused. `repr`, `str` and `describe()` mask every secret.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from dynroute.platform.url_secrets import (
    MASK,
    SCHEME,
    SettingsError,
    interpolate,
    mask_url,
    refuse_literal_secrets,
)

ENV_RAY_ADDRESS = "RAY_ADDRESS"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_OPTUNA_STORAGE = "DYNROUTE_OPTUNA_STORAGE"
# The S3 endpoint, in precedence order; MLflow's own variable must agree with the winner.
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
ENV_MLFLOW_S3_ENDPOINT = "MLFLOW_S3_ENDPOINT_URL"
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN",
)
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_STORAGE_SCHEMES = {"s3", "gs", "gcs", "abfs", "abfss", "hdfs"}  # what Ray's pyarrow storage takes
_RDB_DIALECTS = {"postgresql", "mysql", "mariadb", "sqlite", "oracle", "mssql"}  # SQLAlchemy's
_DVC_SECRET_OPTIONS = {"secret_access_key", "access_key_id", "session_token", "password"}
# ---------------------------------------------------------------------------------------------
# The endpoints, one function each


def _endpoint(value: str, var: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{var} = {value!r} is not an endpoint URL; expected "
                            f"http(s)://host[:port], e.g. http://127.0.0.1:9000")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise SettingsError(f"{var} = {value!r} has a malformed port") from None
    return value.rstrip("/")


def _s3_endpoint(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    endpoint, source = None, None
    for var in S3_ENDPOINT_ENV:
        if env.get(var):
            endpoint, source = _endpoint(env[var], var), var
            break
    mlflow = env.get(ENV_MLFLOW_S3_ENDPOINT)
    if mlflow:
        mlflow = _endpoint(mlflow, ENV_MLFLOW_S3_ENDPOINT)
        if endpoint is None:
            return mlflow, ENV_MLFLOW_S3_ENDPOINT
        if mlflow != endpoint:
            raise SettingsError(
                f"{source}={endpoint} and {ENV_MLFLOW_S3_ENDPOINT}={mlflow} disagree: Arrow/DVC "
                f"and MLflow would use different S3 stores; unset {ENV_MLFLOW_S3_ENDPOINT} "
                f"(Settings.s3_env() sets it from {source}) or make them equal")
    return endpoint, source


def _ray_address(env: Mapping[str, str]) -> str:
    address = env.get(ENV_RAY_ADDRESS, "").strip()
    if not address or address == "local":
        return "local"
    if address == "auto":
        return address
    scheme = SCHEME.match(address)
    rest = address[scheme.end():] if scheme else address
    host, colon, port = rest.rstrip("/").rpartition(":")
    if scheme and scheme.group(1) in ("http", "https") and rest and "/" not in rest.rstrip("/"):
        return address.rstrip("/")  # the jobs API (dashboard), e.g. http://head:8265
    if (scheme is None or scheme.group(1) == "ray") and colon and host and port.isdigit():
        return address
    raise SettingsError(f"{ENV_RAY_ADDRESS}={address!r} is not a Ray address; expected "
                        f"host:port, ray://host:10001, http://host:8265 (jobs), auto, or unset "
                        f"for a local Ray")


def _storage(value: str, key: str, root: Path) -> str:
    if not value.strip():
        raise SettingsError(f"{key} is empty; give a folder or s3://bucket/prefix")
    scheme = SCHEME.match(value)
    if scheme is None:
        if ":" in value.split("/")[0] and not re.match(r"[A-Za-z]:[\\/]", value):
            raise SettingsError(f"{key} = {value!r}: expected a folder or s3://bucket/prefix")
        return str((root / value).absolute()) if not Path(value).is_absolute() else value
    name = scheme.group(1).lower()
    if name == "file":
        return value
    if name not in _STORAGE_SCHEMES:
        raise SettingsError(f"{key} = {mask_url(value)}: Ray storage must be a folder or one of "
                            f"{', '.join(sorted(_STORAGE_SCHEMES))}:// (e.g. s3://bucket/runs)")
    if not value[scheme.end():].split("/")[0]:
        raise SettingsError(f"{key} = {value!r} names no bucket; write {name}://BUCKET/prefix")
    return value.rstrip("/")


def _tracking_uri(value: str, key: str) -> str:
    if value in ("local", "none", "databricks"):
        return value
    scheme = SCHEME.match(value)
    if scheme is None or scheme.group(1).lower() == "file":
        raise SettingsError(
            f"{key} = {mask_url(value)}: MLflow ≥ 3.13 refuses a plain file store and this is no "
            f"server URI; use local (a sqlite-backed server on 127.0.0.1), none, or a URI such "
            f"as http://mlflow.example.com:5000 or sqlite:///mlruns/mlflow.db")
    if scheme.group(1).lower() in ("http", "https") and not urlsplit(value).hostname:
        raise SettingsError(f"{key} = {mask_url(value)} names no host")
    return value


def _optuna_storage(value: str, key: str, root: Path) -> str:
    scheme = SCHEME.match(value)
    if scheme is None:
        if not value.strip():
            raise SettingsError(f"{key} is empty; give a journal file or an RDB URL")
        return str((root / value).absolute()) if not Path(value).is_absolute() else value
    dialect = scheme.group(1).lower().split("+")[0]
    if dialect == "postgres":
        raise SettingsError(f"{key} = {mask_url(value)}: SQLAlchemy 2 does not accept "
                            f"postgres://; write postgresql:// (or postgresql+psycopg2://)")
    if dialect not in _RDB_DIALECTS:
        raise SettingsError(f"{key} = {mask_url(value)}: the Optuna storage is a journal file "
                            f"path or an RDB URL ({', '.join(sorted(_RDB_DIALECTS))}://…)")
    return value


def _dvc_remote(root: Path) -> tuple[str | None, str | None, str | None]:
    """(name, url, endpointurl) of the default remote, reading .dvc/config then config.local."""
    dvc_dir = root / ".dvc"
    merged: dict[str, dict[str, str]] = {}
    for name in ("config", "config.local"):
        path = dvc_dir / name
        if not path.is_file():
            continue
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except configparser.Error as err:
            raise SettingsError(f"{path} is not a valid DVC config: {err}") from None
        for section in parser.sections():
            options = dict(parser[section])
            if name == "config" and section.startswith("'remote"):
                found = sorted(_DVC_SECRET_OPTIONS & set(options))
                if found:
                    raise SettingsError(
                        f"{path} [{section}] holds {', '.join(found)}; that file is committed: "
                        f"take the credentials from the environment (AWS_ACCESS_KEY_ID, "
                        f"AWS_SECRET_ACCESS_KEY) and remove them with `dvc remote modify --unset`")
            # configobj quotes a section with spaces: ['remote "name"']
            key = section[1:-1] if section[:1] == section[-1:] == "'" else section
            merged.setdefault(key, {}).update(options)
    remote = merged.get("core", {}).get("remote")
    if not remote:
        return None, None, None
    options = merged.get(f'remote "{remote}"')
    if not options or "url" not in options:
        raise SettingsError(f"{dvc_dir / 'config'}: core.remote = {remote} but remote "
                            f"{remote!r} has no url; run `dvc remote add {remote} URL`")
    url = options["url"]
    if not SCHEME.match(url) and not Path(url).is_absolute():
        url = str((dvc_dir / url).resolve())  # DVC resolves it from the config's folder
    return remote, url, options.get("endpointurl")


# ---------------------------------------------------------------------------------------------
# The object


@dataclass(frozen=True, repr=False)
class Settings:
    """Every endpoint of a run, rendered; `repr`/`str`/`describe()` mask the secrets.

    The fields hold the real values (an Optuna RDB URL with its password, for `RDBStorage`);
    print them only through `describe()`.
    """

    ray_address: str  # "local": start a single-node Ray on 127.0.0.1
    ray_auth_mode: str  # token | disabled | default (Ray's own default)
    run_storage: str
    tune_results: str
    tracking_uri: str  # local | none | a URI
    s3_endpoint: str | None  # None: AWS's own endpoint
    s3_region: str | None
    optuna_storage: str
    dvc_remote: str | None
    dvc_remote_url: str | None
    sources: Mapping[str, str] = field(default_factory=dict)  # endpoint → where it came from
    _secrets: Mapping[str, str] = field(default_factory=dict)  # env var → value
    _secret_values: frozenset[str] = frozenset()  # resolved ${VAR}s that are secrets

    @classmethod
    def render(cls, params: Any, *, env: Mapping[str, str] | None = None,
               root: str | Path = ".") -> Settings:
        """Render from a `dynroute.platform.config.params.Params` and `env` (default: os.environ).

        `root` is the repository root: relative paths of params.yaml and .dvc/ are read from it.
        Raises SettingsError naming the params key or environment variable that is wrong.
        """
        env = dict(os.environ if env is None else env)
        root = Path(root).absolute()
        found: set[str] = set()

        def from_params(value: str, key: str) -> str:
            refuse_literal_secrets(value, key)
            return interpolate(value, key, env, found)

        def from_env_or_params(var: str, value: str, key: str) -> tuple[str, str]:
            """(value, where it came from): the variable when set, else the params key."""
            refuse_literal_secrets(value, key)  # committed, even when the variable wins
            if env.get(var):
                return interpolate(env[var], var, env, found), var
            return from_params(value, key), key

        tracking, tracking_src = from_env_or_params(
            ENV_TRACKING_URI, params.tracking.uri, "tracking.uri")
        optuna, optuna_src = from_env_or_params(
            ENV_OPTUNA_STORAGE, params.tune.storage, "tune.storage")
        endpoint, endpoint_src = _s3_endpoint(env)
        remote, remote_url, dvc_endpoint = _dvc_remote(root)
        if dvc_endpoint is not None and dvc_endpoint.rstrip("/") != endpoint:
            fix = (f"set {S3_ENDPOINT_ENV[0]}={dvc_endpoint}, or `dvc remote modify {remote} "
                   f"endpointurl {endpoint}`" if endpoint else
                   f"export {S3_ENDPOINT_ENV[0]}={dvc_endpoint}")
            raise SettingsError(
                f".dvc/config: remote {remote!r} has endpointurl = {dvc_endpoint}, but the S3 "
                f"endpoint of Arrow and MLflow is {endpoint or 'AWS (none set)'} "
                f"({endpoint_src or 'no variable'}): DVC would use another store; {fix}")
        auth_mode = env.get("RAY_AUTH_MODE", "default").strip().lower() or "default"
        if auth_mode not in ("token", "disabled", "default"):
            raise SettingsError(f"RAY_AUTH_MODE={env['RAY_AUTH_MODE']!r}: expected token or "
                                f"disabled")
        secrets = {name: env[name] for name in SECRET_ENV if env.get(name)}
        return cls(
            ray_address=_ray_address(env),
            ray_auth_mode=auth_mode,
            run_storage=_storage(from_params(params.run.storage, "run.storage"),
                                 "run.storage", root),
            tune_results=_storage(from_params(params.tune.results, "tune.results"),
                                  "tune.results", root),
            tracking_uri=_tracking_uri(tracking, tracking_src),
            s3_endpoint=endpoint,
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            optuna_storage=_optuna_storage(optuna, optuna_src, root),
            dvc_remote=remote,
            dvc_remote_url=remote_url,
            sources={"ray_address": ENV_RAY_ADDRESS if env.get(ENV_RAY_ADDRESS) else "default",
                     "run_storage": "run.storage", "tune_results": "tune.results",
                     "tracking_uri": tracking_src, "s3_endpoint": endpoint_src or "default",
                     "optuna_storage": optuna_src,
                     "dvc_remote": ".dvc/config" if remote else "none"},
            _secrets=secrets,
            _secret_values=frozenset(v for v in found | set(secrets.values()) if v),
        )

    # -- what the consumers read ---------------------------------------------------------------
    @property
    def ray_is_local(self) -> bool:
        return self.ray_address == "local"

    @property
    def optuna_is_rdb(self) -> bool:
        return SCHEME.match(self.optuna_storage) is not None

    @property
    def tracking_enabled(self) -> bool:
        return self.tracking_uri != "none"

    def s3_env(self, *, credentials: bool = False) -> dict[str, str]:
        """The variables that make Arrow, boto3/s3fs (DVC), MLflow and Ray workers use the same
        S3 store: both endpoint variables set to the one endpoint, and the region.
        `credentials=True` adds the AWS keys found in the environment (e.g. for a Ray
        runtime_env or a server subprocess)."""
        out: dict[str, str] = {}
        if self.s3_endpoint:
            out |= {S3_ENDPOINT_ENV[0]: self.s3_endpoint,
                    ENV_MLFLOW_S3_ENDPOINT: self.s3_endpoint}
        if self.s3_region:
            out["AWS_DEFAULT_REGION"] = self.s3_region
        if credentials:
            out |= {k: v for k, v in self._secrets.items() if k in S3_CREDENTIAL_ENV}
        return out

    def arrow_s3_options(self) -> dict[str, str]:
        """Keyword arguments of `pyarrow.fs.S3FileSystem` for the endpoint and region."""
        out = {"region": self.s3_region or "us-east-1"}
        if self.s3_endpoint:
            parts = urlsplit(self.s3_endpoint)
            out |= {"endpoint_override": parts.netloc + parts.path, "scheme": parts.scheme}
        return out

    def dvc_remote_options(self) -> dict[str, str]:
        """What `dvc remote modify REMOTE KEY VALUE` needs for the S3 endpoint (empty on AWS)."""
        return {"endpointurl": self.s3_endpoint} if self.s3_endpoint else {}

    # -- printing, masked ----------------------------------------------------------------------
    def _mask(self, text: str) -> str:
        text = mask_url(text)
        for secret in sorted(self._secret_values, key=len, reverse=True):
            text = text.replace(secret, MASK).replace(quote(secret, safe=""), MASK)
        return text

    def rows(self) -> list[tuple[str, str, str]]:
        """(endpoint, value, source) for every endpoint, secrets masked."""
        ray = "local (127.0.0.1)" if self.ray_is_local else self.ray_address
        optuna_kind = "RDB" if self.optuna_is_rdb else "journal"
        rows = [
            ("Ray address", ray, self.sources.get("ray_address", "")),
            ("Ray auth", self.ray_auth_mode,
             "default" if self.ray_auth_mode == "default" else "RAY_AUTH_MODE"),
            ("Ray storage (runs)", self.run_storage, "run.storage"),
            ("Ray storage (tune)", self.tune_results, "tune.results"),
            ("MLflow tracking URI", self.tracking_uri, self.sources.get("tracking_uri", "")),
            ("S3 endpoint", self.s3_endpoint or "AWS default",
             self.sources.get("s3_endpoint", "")),
            (f"Optuna storage ({optuna_kind})", self.optuna_storage,
             self.sources.get("optuna_storage", "")),
            ("DVC remote", f"{self.dvc_remote}: {self.dvc_remote_url}" if self.dvc_remote
             else "none", self.sources.get("dvc_remote", "")),
        ]
        rows += [(f"secret {name}", MASK, "environment") for name in sorted(self._secrets)]
        return [(name, self._mask(value), source) for name, value, source in rows]

    def describe(self) -> str:
        """A printable table of the endpoints; every secret shows as ***."""
        rows = [("endpoint", "value", "from"), *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
        lines.insert(1, "-" * len(max(lines, key=len)))
        return "\n".join(lines)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={self._mask(str(value))!r}" if value is not None
                           else f"{name}=None" for name, value in (
            ("ray_address", self.ray_address), ("ray_auth_mode", self.ray_auth_mode),
            ("run_storage", self.run_storage), ("tune_results", self.tune_results),
            ("tracking_uri", self.tracking_uri), ("s3_endpoint", self.s3_endpoint),
            ("s3_region", self.s3_region), ("optuna_storage", self.optuna_storage),
            ("dvc_remote", self.dvc_remote), ("dvc_remote_url", self.dvc_remote_url)))
        secrets = ", ".join(f"{k}={MASK}" for k in sorted(self._secrets))
        return f"Settings({fields}, secrets=[{secrets}])"

    def __str__(self) -> str:
        return self.describe()

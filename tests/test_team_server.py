"""The documented team setup, end to end: ``mlflow server`` on PostgreSQL, artifacts proxied, basic auth on.

A throwaway PostgreSQL cluster and a real ``mlflow server --app-name basic-auth`` process on a free
127.0.0.1 port (see ``tests/servers.py``). Anonymous clients are refused; a user (credentials in
MLFLOW_TRACKING_USERNAME/PASSWORD) trains a tiny model through the server, logs the merged model with the
smolora flavor, registers it, moves it to Production and loads it back through the server by alias.
"""

from __future__ import annotations

import os
import secrets
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from conftest import TINY_TRAINING
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from servers import MlflowServer, pg_bindir, start_mlflow_server, start_postgres

from smolora_mlflow import SmoLoRA, SmoloraConfig
from smolora_mlflow import constants as C

pytestmark = pytest.mark.slow


PROMPTS = ["The food was", "Our waiter", "I would come back because"]
PIP = ["torch", "transformers", "safetensors"]  # explicit: requirement inference is tested elsewhere


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, smolora_cache):
    monkeypatch.setenv("SMOLORA_PROGRESS", "0")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def postgres():
    if pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs `postgresql`")
    pg = start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """The team setup: runs and registry in PostgreSQL, artifacts proxied by the server, basic auth on.

    Users live in a SQLite file under tmp; the admin gets a fresh random password and creates ``alice``.
    """
    from mlflow.server import get_app_client

    root = tmp_path_factory.mktemp("team-server")
    admin_password = secrets.token_urlsafe(18)
    ini = root / "basic_auth.ini"
    ini.write_text(textwrap.dedent(f"""\
        [mlflow]
        default_permission = READ
        database_uri = sqlite:///{root / 'basic_auth.db'}
        admin_username = admin
        admin_password = {admin_password}
        authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        # scrypt per request costs seconds on a busy CI box; cache verified credentials for a while
        auth_cache_ttl_seconds = 300
        """))
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}  # CSRF key; all servers of a team share it
    server = start_mlflow_server(postgres.create_database("mlflow"), root / "artifacts", root / "server.log",
                                 app_name="basic-auth", env=env)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
            users = {"admin": admin_password, "alice": secrets.token_urlsafe(18)}
            get_app_client("basic-auth", tracking_uri=server.url).create_user("alice", users["alice"])
        yield TeamServer(server, root / "artifacts", postgres.uri("mlflow"), users)
    finally:
        server.stop()


@dataclass
class TeamServer:
    server: MlflowServer
    artifacts: Path
    db_uri: str
    users: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def as_alice(team_server, monkeypatch):
    """Point the client at the team server with alice's credentials (the documented env variables)."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, team_server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team_server.users["alice"])
    experiment_env = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(team_server.url)
    mlflow.set_registry_uri(team_server.url)
    yield team_server
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID and keeps a module global; a later test (on another
    # store) must inherit neither. monkeypatch cannot undo a variable that was absent when it looked.
    if experiment_env is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_env
    mlflow.tracking.fluent._active_experiment_id = None
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _sql(db_uri: str, query: str) -> list[tuple]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_uri)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text(query))]
    finally:
        engine.dispose()


def _everything_logged(client: MlflowClient, run_id: str) -> str:
    """Every param, tag and text artifact of a run, as one string."""
    run = client.get_run(run_id)
    parts = [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    pending = [None]
    while pending:
        for f in client.list_artifacts(run_id, pending.pop()):
            if f.is_dir:
                pending.append(f.path)
            elif f.path.endswith((".txt", ".md", ".yaml", ".json")):
                parts.append(mlflow.artifacts.load_text(f"runs:/{run_id}/{f.path}"))
    return "\n".join(parts)


def test_anonymous_and_wrong_credentials_are_refused(team_server, monkeypatch):
    probe = f"{team_server.url}/api/2.0/mlflow/experiments/search"
    assert requests.get(probe, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(probe, params={"max_results": 1}, auth=("alice", "not-her-password"),
                        timeout=30).status_code == 401
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(team_server.url).search_experiments()
    assert requests.get(probe, params={"max_results": 1}, auth=("alice", team_server.users["alice"]),
                        timeout=30).ok


def test_a_user_creates_logs_and_reads_a_run(as_alice):
    client = MlflowClient(as_alice.url)
    experiment_id = client.create_experiment("alice-exp")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "alpha", "0.5")
    client.log_metric(run.info.run_id, "score", 0.75, step=1)
    client.log_text(run.info.run_id, "hello", "notes.txt")
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"alpha": "0.5"} and got.data.metrics == {"score": 0.75}
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes.txt") == "hello"


def test_team_server_tracks_registers_and_serves_a_model(as_alice, tmp_path):
    from smolora_mlflow import registry, workflow

    server = as_alice
    cfg = SmoloraConfig(**TINY_TRAINING, tracking_uri=server.url, experiment_name="team",
                        output_dir=str(tmp_path / "out"),
                        run_tags={"team": "nlp"})
    lora = SmoLoRA(config=cfg)
    result = lora.train()

    # The run, its params, metrics and artifacts, read back through the server.
    client = MlflowClient(server.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.user_id == "alice"
    assert run.data.params["lora_r"] == "8" and run.data.params["max_steps"] == "4"
    assert run.data.tags[C.TAG_BASE_MODEL] == "smolora:demo" and run.data.tags["team"] == "nlp"
    assert [m.step for m in client.get_metric_history(run.info.run_id, C.METRIC_LOSS)] == [1, 2, 3, 4]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "team" and experiment.artifact_location.startswith("mlflow-artifacts:")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    adapter_files = {f.path for f in client.list_artifacts(run.info.run_id, C.ARTIFACT_ADAPTER)}
    assert f"{C.ARTIFACT_ADAPTER}/adapter_model.safetensors" in adapter_files
    assert "lora_r: 8" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{C.ARTIFACT_CONFIG}")
    # The server stored what it proxied; the database is PostgreSQL.
    assert list(server.artifacts.rglob("adapter_model.safetensors"))
    assert _sql(server.db_uri, f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'") == [("FINISHED",)]
    # The credentials came from the environment and went nowhere into the run.
    logged = _everything_logged(client, run.info.run_id)
    assert "lora_r" in logged and C.TAG_BASE_MODEL in logged
    assert all(password not in logged for password in server.users.values())

    # Log the merged model into the training run, register it, promote it, load it back by alias.
    name = "team-reviews"
    info = workflow.log_trained_model(lora, registered_model_name=name, pip_requirements=PIP)
    version = str(info.registered_model_version)
    registry.transition(name, version, "Production", reason="team server test")
    assert client.get_registered_model(name).aliases == {"production": version, "v1-0-0": version}
    assert _sql(server.db_uri, f"SELECT version FROM model_versions WHERE name = '{name}'") == [(int(version),)]

    loaded = mlflow.pyfunc.load_model(f"models:/{name}@production")
    assert loaded.metadata.run_id == result.run_id
    out = loaded.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 8})
    assert list(out.columns) == ["generated_text"]
    assert out["generated_text"].tolist() == lora.batch_inference(PROMPTS, max_new_tokens=8)
    assert registry.resolve(name, "Production").version == version


def _write_routes() -> list[tuple[str, str]]:
    """(method, path) of every write route the installed MLflow server has: the routers its FastAPI app
    includes (OpenTelemetry, jobs, gateway, assistant, artifact upload, MCP servers; see
    ``mlflow/server/fastapi_app.py``), its Flask REST and ajax routes, and basic-auth's own."""
    import re

    from mlflow.server import app as flask_app
    from mlflow.server.artifact_router import artifact_router
    from mlflow.server.assistant.api import assistant_router
    from mlflow.server.auth import routes as auth_routes
    from mlflow.server.gateway_api import gateway_router
    from mlflow.server.job_api import job_api_router
    from mlflow.server.mcp_server_api import get_mcp_server_api_route_prefixes, mcp_server_router
    from mlflow.server.otel_api import otel_router

    writes = {"POST", "PUT", "PATCH", "DELETE"}
    mounted = [("", r) for router in (otel_router, job_api_router, gateway_router, assistant_router,
                                      artifact_router) for r in router.routes]
    mounted += [(prefix, r) for prefix in get_mcp_server_api_route_prefixes() for r in mcp_server_router.routes]
    found = {(m, prefix + r.path) for prefix, r in mounted for m in r.methods if m in writes}
    assert {"/v1/traces", "/gateway/openai/v1/chat/completions", "/ajax-api/3.0/jobs/"} <= {p for _, p in found}
    found |= {(m, rule.rule) for rule in flask_app.url_map.iter_rules() for m in rule.methods if m in writes}
    found |= {(m, v) for v in vars(auth_routes).values() if isinstance(v, str) and v.startswith(("/api", "/ajax"))
              for m in ("POST", "PATCH", "DELETE")}
    # Path parameters ({name}, {path:path}, <name>) get a harmless value.
    return sorted((m, re.sub(r"\{[^}]+\}|<[^>]+>", "anon", p)) for m, p in found)


def test_anonymous_writes_are_refused_on_every_route_fastapi_ones_included(team_server):
    """CVE-2026-0545 / CVE-2026-2652: before MLflow 3.10 some FastAPI routes of a basic-auth server took
    anonymous writes. Every write route of the installed server answers 401 or 403 without credentials, and
    nothing is written."""
    routes = _write_routes()
    assert len(routes) > 150
    bodies = {"/api/2.0/mlflow/experiments/create": {"name": "anonymous-exp"},
              "/api/2.0/mlflow/registered-models/create": {"name": "anonymous-model"},
              "/api/2.0/mlflow/users/create": {"username": "anonymous-user", "password": "anonymous-pass-123"}}

    def answer(route: tuple[str, str]) -> str | None:
        method, path = route
        r = requests.request(method, team_server.url + path, json=bodies.get(path, {}), timeout=60)
        return None if r.status_code in (401, 403) else f"{method} {path}: {r.status_code}"

    with ThreadPoolExecutor(max_workers=8) as pool:  # the server answers them concurrently
        allowed = [a for a in pool.map(answer, routes) if a]
    put = requests.put(f"{team_server.url}/api/2.0/mlflow-artifacts/artifacts/anon/planted.txt", data=b"x",
                       timeout=30)
    assert allowed == [] and put.status_code in (401, 403)
    assert not list(team_server.artifacts.rglob("planted.txt"))
    admin = MlflowClient(team_server.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", team_server.users["admin"])
        assert admin.get_experiment_by_name("anonymous-exp") is None
        assert not admin.search_registered_models("name = 'anonymous-model'")
        from mlflow.server import get_app_client

        with pytest.raises(MlflowException, match="anonymous-user"):
            get_app_client("basic-auth", tracking_uri=team_server.url).get_user("anonymous-user")

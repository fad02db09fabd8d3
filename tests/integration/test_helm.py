"""The Helm chart (deploy/helm/ratelimit-svc, docs/deployment.md): `helm lint`, `helm template` for
several value sets, every rendered object validated against the Kubernetes schemas
(kubernetes-validate; prometheus-operator kinds checked by hand), the settings the Deployment
passes read back by the service's own parser, and the committed plain manifests not stale.

Helm is built by `make helm` where Go is present; without it these tests skip, saying so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ratelimit_svc.settings.model import Settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import render_manifests  # noqa: E402

HELM = render_manifests.find_helm()
needs_helm = pytest.mark.skipif(
    HELM is None, reason="no helm binary: `make helm` builds it where Go is installed"
)
KUBE_VERSION = render_manifests.KUBE_VERSION
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}  # CRDs: no schema in kubernetes-validate

VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "everything-on": [
        "--set", "autoscaling.enabled=true",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.podMonitor.enabled=true",
        "--set", "redis.auth.password=s3cret",
        "--set", "service.headless=true",
        "--set", "podAnnotations.team=edge",
        "--set", "env.NEAR_LIMIT_RATIO=0.9",
        "--set", "podDisruptionBudget.minAvailable=1",
    ],
    "existing-secret-cluster": [
        "--set", "redis.auth.existingSecret=redis-credentials",
        "--set", "redis.type=cluster",
        "--set", "redis.url=redis-0:6379\\,redis-1:6379",
        "--set", "image.digest=sha256:" + "0" * 64,
    ],
    "memcache-no-metrics": [
        "--set", "backend=memcache",
        "--set", "memcache.hostPort=memcached:11211",
        "--set", "metrics.enabled=false",
        "--set", "podDisruptionBudget.enabled=false",
    ],
    "memory-one-replica": [
        "--set", "backend=memory",
        "--set", "replicaCount=1",
        "--set", "existingRulesConfigMap=my-rules",
    ],
}  # fmt: skip


def render(*args: str) -> list[dict[str, Any]]:
    assert HELM is not None
    result = render_manifests.helm_template(HELM, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {obj["kind"]: obj for obj in objects}
    assert len(kinds) == len(objects), "one object of each kind"
    return kinds


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container["env"]}


def validate_operator_kind(obj: dict[str, Any], selector: dict[str, str], ports: set[str]) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["spec"]["selector"]["matchLabels"] == selector
    key = "endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
    (endpoint,) = obj["spec"][key]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


@needs_helm
def test_helm_lint() -> None:
    assert HELM is not None
    for args in ([], VALUE_SETS["everything-on"]):
        result = subprocess.run(
            [HELM, "lint", "--strict", str(render_manifests.CHART), *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_are_valid_kubernetes(name: str) -> None:
    objects = render(*VALUE_SETS[name])
    kinds = by_kind(objects)
    deployment = kinds["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            validate_operator_kind(obj, selector, pod_ports)
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    # The Service and PDB select the Deployment's pods.
    assert kinds["Service"]["spec"]["selector"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    if "PodDisruptionBudget" in kinds:
        assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


def test_validation_rejects_a_broken_object() -> None:
    """The schema check can fail: a Deployment with a misspelt field is refused."""
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i", "prots": []}]}}},
    }  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@needs_helm
def test_deployment_runs_the_service_as_documented() -> None:
    kinds = by_kind(render(*VALUE_SETS["everything-on"]))
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(deployment)
    # The environment is one the service accepts (REDIS_AUTH comes from the Secret).
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    settings = Settings.from_env(plain)
    assert settings.backend_type == "redis"
    assert settings.stats.use_prometheus and not settings.stats.use_statsd
    assert settings.near_limit_ratio == pytest.approx(0.9)
    assert env["REDIS_AUTH"] == {"secretKeyRef": {"name": kinds["Secret"]["metadata"]["name"], "key": "redis-auth"}}
    assert "s3cret" not in yaml.safe_dump(deployment)
    # The rules: the ConfigMap is mounted at RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY,
    # watched as a directory, with the kubelet's ..data dot-directories skipped.
    config_dir = "/".join(
        (settings.runtime_root, settings.runtime_subdirectory, settings.runtime_appdirectory)
    )
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "rules"]
    assert mount["mountPath"] == config_dir and mount["readOnly"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "rules"]
    assert volume["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert not settings.runtime_watch_root and settings.runtime_ignoredotfiles
    # Rules edits hot-reload: no checksum of the ConfigMap that would restart the pods.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert not any("rules" in key or "config" in key for key in annotations)
    assert "checksum/redis-secret" in annotations
    # Probes: readiness on HTTP /healthcheck, liveness and startup on gRPC health.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthcheck", "port": "http"}
    assert ports["http"] == settings.port
    assert container["livenessProbe"]["grpc"]["port"] == settings.grpc_port == ports["grpc"]
    assert container["startupProbe"]["grpc"]["port"] == settings.grpc_port
    assert ports["metrics"] == int(settings.stats.prometheus_addr.rsplit(":", 1)[1])
    # Hardened: non-root, read-only root, no privilege escalation, no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # With an HPA the Deployment leaves the replica count to it.
    assert "replicas" not in deployment["spec"] and kinds["HorizontalPodAutoscaler"]
    assert kinds["Service"]["spec"]["clusterIP"] == "None"


@needs_helm
def test_the_rules_in_the_configmap_load() -> None:
    from ratelimit_svc.config.loader import ConfigFile, load_config

    configmap = by_kind(render())["ConfigMap"]
    files = [ConfigFile(name, text) for name, text in configmap["data"].items()]
    config = load_config(files)
    assert config.domains


@needs_helm
def test_memory_backend_refuses_several_replicas() -> None:
    assert HELM is not None
    result = render_manifests.helm_template(HELM, "--set", "backend=memory")
    assert result.returncode != 0
    assert "memory keeps counters in each pod" in result.stderr


@needs_helm
def test_plain_manifests_are_the_rendered_chart() -> None:
    assert HELM is not None
    committed = render_manifests.MANIFESTS.read_text()
    assert committed == render_manifests.render(HELM), (
        "deploy/kubernetes/ratelimit-svc.yaml is stale: run `make manifests`"
    )


def test_plain_manifests_are_valid_kubernetes() -> None:
    """Checked even without Helm: what `kubectl apply -f deploy/kubernetes/` would send."""
    checked = 0
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                checked += 1
    assert checked >= 7

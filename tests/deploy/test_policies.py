"""Policies over the rendered overlays: GPU placement, container security, probes, image tags, RBAC,
network paths, disruption budgets, and where secrets and settings come from."""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import re

import jsonschema
import pytest

from pony_common.config import Settings
from services.trainer.render import CHECKPOINT_MOUNT, render_run
from services.trainer.spec import ResourceSpec, load_spec
from tests.deploy.manifests import (
    CERT_MANAGER_CRDS,
    CLUSTER_SCOPED_KINDS,
    DEPLOY,
    GPU,
    GPU_POOLS,
    GRPC_PORTS,
    OVERLAYS,
    POOL_KEY,
    QUEUES,
    REPO,
    auth_violations,
    find,
    formula_sum_terms,
    gpu_violations,
    image_tag_violations,
    images,
    keda_schemas,
    labels_of,
    literal_occurrences,
    name,
    of_kind,
    pod_labels,
    probe_violations,
    rbac_violations,
    redis_priority_lists,
    render_dir,
    restricted_pss_violations,
    security_violations,
    strict,
    tls_violations,
    traffic_allowed,
    worker_probe_violations,
    workloads,
)

SECRET_SETTINGS = (
    "PONY_DATABASE_URL",
    "PONY_BROKER_URL",
    "PONY_RESULT_BACKEND",
    "PONY_AUTH_TOKEN",
    "PONY_AUTH_TOKENS",
    "PONY_CLIENT_TOKEN",
)


# --- GPU placement ---------------------------------------------------------------------------------


def test_prod_gpu_workloads_are_pinned_tolerate_the_taint_and_request_a_gpu(prod):
    assert gpu_violations(prod, GPU_POOLS) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda s: s.pop("tolerations"), "does not tolerate"),
        (lambda s: s.pop("affinity"), "not pinned"),
        (lambda s: s["containers"][0]["resources"]["limits"].pop(GPU), "no nvidia.com/gpu limit"),
    ],
)
def test_gpu_check_catches_a_broken_workload(prod, breakage, expected):
    broken = copy.deepcopy(prod)
    breakage(find(broken, "Deployment", "scorer")["spec"]["template"]["spec"])
    assert any(expected in v for v in gpu_violations(broken, GPU_POOLS))


def test_prod_cpu_workloads_stay_off_gpus(prod):
    for obj, spec in workloads(prod):
        if obj["metadata"]["name"] not in GPU_POOLS:
            limits = [c.get("resources", {}).get("limits", {}) for c in spec["containers"]]
            assert all(GPU not in lim for lim in limits), name(obj)


def test_dev_is_cpu_only(dev):
    for obj, spec in workloads(dev):
        for c in spec["containers"]:
            assert GPU not in (c.get("resources") or {}).get("limits", {}), name(obj)
        assert "tolerations" not in spec and "affinity" not in spec, name(obj)
    config = next(c for c in of_kind(dev, "ConfigMap") if c["metadata"]["name"].startswith("pony-config"))
    assert config["data"]["PONY_DEVICE"] == "cpu"
    assert all("cuda" not in ref for ref in images(dev))


def test_pool_label_key_is_set_in_one_place(prod):
    hits = literal_occurrences(DEPLOY, POOL_KEY)
    assert hits == {"components/gpu-pools/node-pools.yaml": 1}
    config = next(c for c in of_kind(prod, "ConfigMap") if c["metadata"]["name"].startswith("pony-config"))
    assert config["data"]["PONY_TRAINER_POOL_LABEL"] == POOL_KEY


# --- container security -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_meets_the_security_baseline(rendered, overlay):
    assert security_violations(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(rendered, overlay):
    assert restricted_pss_violations(rendered[overlay]) == []


def test_security_checks_catch_a_root_writable_container(prod):
    broken = copy.deepcopy(prod)
    spec = find(broken, "Deployment", "sampler")["spec"]["template"]["spec"]
    spec["securityContext"]["runAsNonRoot"] = False
    spec["containers"][0]["securityContext"] = {"readOnlyRootFilesystem": False}
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = security_violations(broken) + restricted_pss_violations(broken)
    for fragment in ("runAsNonRoot", "readOnlyRootFilesystem", "drop ALL", "allowPrivilegeEscalation", "hostPath"):
        assert any(fragment in v for v in found), fragment


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted(rendered, overlay):
    namespaces = of_kind(rendered[overlay], "Namespace")
    assert [n["metadata"]["name"] for n in namespaces] == ["pony"]
    assert namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [o for o in rendered[overlay] if o["kind"] not in CLUSTER_SCOPED_KINDS]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"pony"}


# --- probes, metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["prod", "prod-redis"])
def test_every_service_is_backed_by_pods_with_grpc_probes(rendered, overlay):
    objs = rendered[overlay]
    assert {s["metadata"]["name"] for s in of_kind(objs, "Service")} == {*GRPC_PORTS, "triton"}
    assert probe_violations(objs) == []


def test_probe_check_catches_a_missing_readiness_probe(prod):
    broken = copy.deepcopy(prod)
    find(broken, "Deployment", "safety")["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    assert any("Deployment/safety" in v and "readiness" in v for v in probe_violations(broken))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_is_probed_on_its_heartbeat(rendered, overlay):
    objs = rendered[overlay]
    workers = [o for o in of_kind(objs, "Deployment") if o["metadata"]["name"].startswith("worker-")]
    assert len(workers) == len(QUEUES)
    assert worker_probe_violations(objs) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda c: c.pop("readinessProbe"), "no exec readinessProbe"),
        (lambda c: c.pop("livenessProbe"), "no exec livenessProbe"),
        (lambda c: c["livenessProbe"].update({"exec": {"command": ["true"]}}), "livenessProbe runs ['true']"),
        (
            lambda c: c["env"].append({"name": "PONY_WORKER_HEARTBEAT_FILE", "value": "/var/run/heartbeat"}),
            "heartbeat /var/run/heartbeat is not on a writable emptyDir",
        ),
        (
            lambda c: c["env"].append({"name": "PONY_STATE_DIR", "value": "/app/state"}),
            "heartbeat /app/state/worker.heartbeat is not on a writable emptyDir",
        ),
    ],
)
def test_worker_probe_check_catches_a_broken_worker(prod, breakage, expected):
    broken = copy.deepcopy(prod)
    breakage(find(broken, "Deployment", "worker-generate")["spec"]["template"]["spec"]["containers"][0])
    found = worker_probe_violations(broken)
    assert [v for v in found if "Deployment/worker-generate" in v and expected in v], found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pony_pods_are_annotated_for_prometheus(rendered, overlay):
    for obj, _ in workloads(rendered[overlay]):
        if obj["metadata"]["labels"].get("app.kubernetes.io/part-of") != "pony":
            continue
        annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
        port = "8002" if obj["metadata"]["name"] == "triton" else "9090"
        assert annotations.get("prometheus.io/scrape") == "true", name(obj)
        assert annotations.get("prometheus.io/port") == port, name(obj)


# --- images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_has_a_tag_and_none_is_latest(rendered, overlay):
    found = images(rendered[overlay])
    assert image_tag_violations(found) == []
    assert any(ref.split("@")[0] in ("pony-platform/triton:0.1.0", "pony-platform/triton") for ref in found)


def test_prod_pins_every_platform_image_by_digest(prod):
    refs = [ref for ref in images(prod) if ref.startswith("pony-platform/")]  # containers and PONY_TRAINER_IMAGE
    assert {ref.split("@")[0] for ref in refs} == {"pony-platform/cpu", "pony-platform/cuda", "pony-platform/triton"}
    assert all(re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", ref) for ref in refs), refs


def test_image_check_catches_latest_and_untagged():
    found = {"redis:latest": "a", "postgres": "b", "registry:5000/x/y:1.2": "c", "r:5000/z@sha256:ab": "d"}
    # Pinned by digest (d) passes: kustomize's `digest:` drops the tag, and the digest is the stronger pin.
    assert len(image_tag_violations(found)) == 2
    assert len(image_tag_violations({"r:5000/z:latest@sha256:ab": "e"})) == 1


# --- RBAC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_rbac_is_namespaced_and_minimal(rendered, overlay):
    assert rbac_violations(rendered[overlay]) == []


def test_rbac_check_catches_extra_grants(prod):
    broken = copy.deepcopy(prod)
    role = find(broken, "Role", "trainer")
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    role["rules"].append({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]})
    role["rules"].append({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]})
    role["rules"][2]["verbs"].append("delete")
    broken.append({"kind": "ClusterRole", "metadata": {"name": "x"}, "apiVersion": "rbac.authorization.k8s.io/v1"})
    found = rbac_violations(broken)
    assert any("core/secrets" in v for v in found)
    assert any("core/configmaps" in v for v in found)
    assert any("batch/jobs verbs ['*']" in v for v in found)
    assert any("['delete']" in v for v in found)
    assert any("cluster-scoped" in v for v in found)


# --- network policies -------------------------------------------------------------------------------


def test_network_policies_deny_by_default_and_open_only_the_platform_paths(prod):
    deny = find(prod, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    lab = {w: labels_of(prod, w) for w in ("worker-caption", "sampler", "safety", "triton", "trainer", "scorer")}
    # allowed
    assert traffic_allowed(prod, lab["worker-caption"], lab["scorer"], 50052)
    assert traffic_allowed(prod, lab["worker-caption"], lab["trainer"], 50055)
    assert traffic_allowed(prod, lab["sampler"], lab["triton"], 8001)
    assert traffic_allowed(prod, lab["sampler"], lab["safety"], 50054)
    assert traffic_allowed(prod, lab["worker-caption"], None, 5432)  # external catalog DB
    assert traffic_allowed(prod, lab["worker-caption"], None, 5672)  # external broker
    assert traffic_allowed(prod, lab["scorer"], None, 443)  # blob store
    assert traffic_allowed(prod, lab["trainer"], None, 6443)  # kube API
    # denied
    assert not traffic_allowed(prod, lab["scorer"], lab["triton"], 8001)
    assert not traffic_allowed(prod, lab["worker-caption"], lab["triton"], 8001)
    assert not traffic_allowed(prod, lab["triton"], None, 443)
    assert not traffic_allowed(prod, lab["scorer"], lab["safety"], 50054)
    assert not traffic_allowed(prod, lab["worker-caption"], None, 22)
    # training Jobs (pods the trainer creates): ranks reach each other and the blob store, nothing else
    rank = {"app.kubernetes.io/component": "training-job", "app.kubernetes.io/part-of": "pony"}
    assert traffic_allowed(prod, rank, rank, 29500)
    assert traffic_allowed(prod, rank, None, 443)
    assert not traffic_allowed(prod, rank, lab["scorer"], 50052)
    assert not traffic_allowed(prod, lab["worker-caption"], rank, 29500)


def test_dev_workers_reach_the_in_cluster_infra(dev):
    worker = labels_of(dev, "worker-persist")
    for infra, port in (("postgres", 5432), ("rabbitmq", 5672), ("redis", 6379)):
        assert traffic_allowed(dev, worker, labels_of(dev, infra), port), infra
    assert not traffic_allowed(dev, labels_of(dev, "triton"), labels_of(dev, "postgres"), 5432)


# --- availability, workers, autoscaling -------------------------------------------------------------


def test_every_server_has_a_disruption_budget(prod):
    budgets = {p["metadata"]["name"]: p["spec"] for p in of_kind(prod, "PodDisruptionBudget")}
    for server in (*GRPC_PORTS, "triton"):
        assert budgets[server]["selector"]["matchLabels"] == {"app.kubernetes.io/name": server}
        assert budgets[server]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_deployment_per_queue(rendered, overlay):
    workers = {
        o["metadata"]["name"]: o
        for o in of_kind(rendered[overlay], "Deployment")
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }
    assert set(workers) == {f"worker-{q}" for q in QUEUES}
    for queue in QUEUES:
        worker = workers[f"worker-{queue}"]
        container = worker["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["worker", "--queues", "$(WORKER_QUEUE)"]
        assert worker["spec"]["template"]["metadata"]["labels"]["pony.ai/queue"] == queue
        assert worker["spec"]["selector"]["matchLabels"]["pony.ai/queue"] == queue


@pytest.mark.parametrize(("overlay", "trigger", "queue_key"), [("prod", "rabbitmq", "queueName")])
def test_keda_scales_each_worker_on_its_queue(rendered, overlay, trigger, queue_key):
    objs = rendered[overlay]
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in of_kind(objs, "ScaledObject")}
    assert set(scaled) == {f"worker-{q}" for q in QUEUES}
    auths = {a["metadata"]["name"]: a for a in of_kind(objs, "TriggerAuthentication")}
    for queue in QUEUES:
        target = find(objs, "Deployment", f"worker-{queue}")
        assert "replicas" not in target["spec"], "KEDA owns the worker replica count"
        (only,) = scaled[f"worker-{queue}"]["spec"]["triggers"]
        assert only["type"] == trigger and only["metadata"][queue_key] == queue
        auth = auths[only["authenticationRef"]["name"]]
        assert all(ref["name"].startswith("pony-") for ref in auth["spec"]["secretTargetRef"])


def test_keda_on_redis_scales_each_worker_on_every_priority_list_of_its_queue(rendered, prod):
    """kombu keeps a Redis queue as one list per priority step: one trigger per list, the composite metric their
    sum, its target per replica the RabbitMQ trigger's value."""
    objs = rendered["prod-redis"]
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in of_kind(objs, "ScaledObject")}
    on_rabbitmq = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in of_kind(prod, "ScaledObject")}
    assert set(scaled) == {f"worker-{q}" for q in QUEUES}
    auths = {a["metadata"]["name"]: a for a in of_kind(objs, "TriggerAuthentication")}
    for queue in QUEUES:
        assert "replicas" not in find(objs, "Deployment", f"worker-{queue}")["spec"], "KEDA owns the worker replicas"
        spec = scaled[f"worker-{queue}"]
        triggers = spec["triggers"]
        assert {t["type"] for t in triggers} == {"redis"}
        assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(redis_priority_lists(queue))
        modifiers = spec["advanced"]["scalingModifiers"]
        assert sorted(formula_sum_terms(modifiers["formula"])) == sorted(t["name"] for t in triggers)
        assert modifiers["metricType"] == "AverageValue"
        (rabbit,) = on_rabbitmq[f"worker-{queue}"]["triggers"]
        assert modifiers["target"] == rabbit["metadata"]["value"]
        for trigger in triggers:
            auth = auths[trigger["authenticationRef"]["name"]]
            assert [ref["name"] for ref in auth["spec"]["secretTargetRef"]] == ["pony-keda-redis"] * 2


def test_formula_check_accepts_only_a_plain_sum():
    assert formula_sum_terms("p0 + p3+p6") == ["p0", "p3", "p6"]
    for formula in ("max(p0, p3)", "p0 + p3 * 2", "p0 - p3"):
        with pytest.raises(ValueError):
            formula_sum_terms(formula)


def test_dev_runs_one_replica_of_everything_with_tiny_models(dev):
    model_pods = {"captioner", "scorer", "style-tagger", "safety", "sampler", "triton"}
    for obj, spec in workloads(dev):
        assert obj["spec"]["replicas"] == 1, name(obj)
        if obj["metadata"]["name"] in model_pods:
            init = spec["initContainers"]
            assert init[0]["args"] == ["models", "tiny", "/models"]
            if obj["metadata"]["name"] == "triton":
                assert init[1]["args"] == ["models", "triton-repo", "/triton-repo"]
            else:
                assert len(init) == 1, name(obj)
            models = next(v for v in spec["volumes"] if v["name"] == "models")
            assert models == {"name": "models", "emptyDir": {}}
    assert {"postgres", "rabbitmq", "redis"} <= {s["metadata"]["name"] for s in of_kind(dev, "Service")}


# --- secrets and settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["prod", "prod-redis"])
def test_prod_carries_no_secret_values_and_no_in_cluster_infra(rendered, overlay):
    objs = rendered[overlay]
    assert of_kind(objs, "Secret") == []
    for cm in of_kind(objs, "ConfigMap"):
        assert not set(SECRET_SETTINGS) & set(cm.get("data", {})), name(cm)
    for obj, spec in workloads(objs):
        for c in spec["containers"]:
            assert not [e for e in c.get("env", []) if e["name"] in SECRET_SETTINGS and "value" in e], name(obj)
            # No Secret through the environment (checkov CKV_K8S_35): pony-database and pony-broker are files.
            assert not [s for s in c.get("envFrom", []) if "secretRef" in s], name(obj)
            assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})], name(obj)
            if c["name"] != "tritonserver":
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/pony/secrets"]
                sources = volumes[mount["name"]]["projected"]["sources"]
                assert {src["secret"]["name"] for src in sources} == {"pony-database", "pony-broker"}, name(obj)
    assert not {"postgres", "rabbitmq", "redis"} & {o["metadata"]["name"] for o in objs}


def test_config_names_every_service_address_and_the_cluster_settings(prod):
    config = next(c for c in of_kind(prod, "ConfigMap") if c["metadata"]["name"].startswith("pony-config"))
    data = config["data"]
    for service, port in GRPC_PORTS.items():
        key = f"PONY_{service.upper().replace('-', '_')}_ADDR"
        assert data[key] == f"{service}:{port}"
    assert data["PONY_TRITON_URL"] == "triton:8001"
    assert data["PONY_METRICS_PORT"] == "9090"
    assert data["PONY_MODELS_DIR"] == "/models"
    assert data["PONY_TRAINER_IMAGE"].startswith("pony-platform/cuda@sha256:")  # pinned like the containers
    for service in ("CAPTIONER", "SCORER", "STYLE_TAGGER", "SAFETY", "SAMPLER"):
        assert f"PONY_{service}_MODEL" in data


@pytest.mark.parametrize("overlay", ["prod", "prod-redis"])
def test_tls_component_mounts_the_certificate_into_every_pony_pod(rendered, overlay):
    objs = rendered[overlay]
    config = next(c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("pony-config"))
    assert config["data"]["PONY_TLS_CERT"] == "/etc/pony/tls/tls.crt"
    assert config["data"]["PONY_TLS_KEY"] == "/etc/pony/tls/tls.key"
    for obj, spec in workloads(objs):
        if obj["metadata"]["name"] == "triton":
            continue
        volume = next(v for v in spec["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == "pony-tls"
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": "/etc/pony/tls", "readOnly": True}
    assert security_violations(objs) == []


# --- bearer tokens per role, TLS in prod ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pony_container_gets_its_tokens_from_the_auth_secret(rendered, overlay):
    assert auth_violations(rendered[overlay]) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda objs: _config(objs)["data"].update(PONY_AUTH_TOKEN=""), "PONY_AUTH_TOKEN is an empty token: no auth"),
        (lambda objs: _config(objs)["data"].update(PONY_AUTH_TOKENS="admin:x"), "PONY_AUTH_TOKENS is a token in"),
        (lambda objs: _drop_mount(objs, "scorer", "auth"), "Deployment/scorer container scorer: PONY_AUTH_TOKENS_FILE"),
        (
            lambda objs: _env(objs, "sampler", "PONY_CLIENT_TOKEN_FILE", "/etc/pony/auth/admin"),
            "Deployment/sampler container sampler: PONY_CLIENT_TOKEN_FILE=/etc/pony/auth/admin is not key worker",
        ),
        (
            lambda objs: _volume(objs, "worker-caption", "auth")["secret"].pop("items"),
            "Deployment/worker-caption: volume auth gives a worker keys ['*']",
        ),
    ],
)
def test_auth_check_catches_an_empty_token_and_a_misplaced_one(prod, breakage, expected):
    broken = copy.deepcopy(prod)
    breakage(broken)
    found = auth_violations(broken)
    assert [v for v in found if expected in v], found


def test_dev_has_one_dev_token_per_role(dev):
    (secret,) = [s for s in of_kind(dev, "Secret") if s["metadata"]["name"].startswith("pony-auth-")]
    tokens = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert set(tokens) == {"admin", "worker", "generate"}
    assert len(set(tokens.values())) == 3
    assert all(token.startswith("pony-dev-") for token in tokens.values()), tokens


@pytest.mark.parametrize("overlay", ["prod", "prod-redis"])
def test_prod_serves_tls_with_plaintext_health_ports_and_every_client_trusts_the_ca(rendered, overlay):
    objs = rendered[overlay]
    assert tls_violations(objs) == []
    for service in GRPC_PORTS:
        container = find(objs, "Deployment", service)["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "health", "containerPort": 8081} in container["ports"], service
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == 8081, (service, probe)


def test_dev_runs_without_tls(dev):
    assert "PONY_TLS_CERT" not in _config(dev)["data"]
    infra = tuple(f"Service/{n} " for n in ("postgres", "rabbitmq", "redis"))  # no gRPC there
    assert [v for v in probe_violations(dev) if not v.startswith(infra)] == []  # probes on the gRPC ports


@pytest.mark.parametrize(
    ("breakage", "check", "expected"),
    [
        (lambda objs: _config(objs)["data"].pop("PONY_TLS_CERT"), tls_violations, "PONY_TLS_CERT=None is not tls.crt"),
        (
            lambda objs: _volume(objs, "worker-score", "tls")["secret"].pop("items"),
            tls_violations,
            "Deployment/worker-score: volume tls gives a worker keys ['*']",
        ),
        (
            lambda objs: _container(objs, "safety")["readinessProbe"]["grpc"].update(port=50054),
            probe_violations,
            "Deployment/safety container safety: readinessProbe is not grpc {'port': 8081",
        ),
        (
            lambda objs: _config(objs)["data"].update(PONY_HEALTH_PORT="0"),
            probe_violations,
            "serves TLS without a plaintext PONY_HEALTH_PORT",
        ),
    ],
)
def test_tls_checks_catch_a_server_without_its_certificate_or_probe_port(prod, breakage, check, expected):
    broken = copy.deepcopy(prod)
    breakage(broken)
    found = check(broken)
    assert [v for v in found if expected in v], found


def test_cert_manager_component_issues_pony_tls_for_every_service(tmp_path):
    overlay = tmp_path / "prod-cert-manager"
    overlay.mkdir()
    rel = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/prod]\ncomponents: [{rel}/components/cert-manager]\n"
    )
    objs = render_dir(overlay)
    (certificate,) = of_kind(objs, "Certificate")
    schema = strict(keda_schemas(CERT_MANAGER_CRDS)[(certificate["apiVersion"], "Certificate")])
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(certificate)]
    assert errors == []
    assert certificate["metadata"]["namespace"] == "pony"
    assert certificate["spec"]["secretName"] == "pony-tls"  # what components/tls mounts
    assert set(GRPC_PORTS) <= set(certificate["spec"]["dnsNames"])  # clients dial <service>:<port>
    assert tls_violations(objs) == []


def _config(objs) -> dict:
    return next(c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("pony-config"))


def _container(objs, workload: str) -> dict:
    return find(objs, "Deployment", workload)["spec"]["template"]["spec"]["containers"][0]


def _volume(objs, workload: str, volume: str) -> dict:
    spec = find(objs, "Deployment", workload)["spec"]["template"]["spec"]
    return next(v for v in spec["volumes"] if v["name"] == volume)


def _drop_mount(objs, workload: str, volume: str) -> None:
    mounts = _container(objs, workload)["volumeMounts"]
    mounts[:] = [m for m in mounts if m["name"] != volume]


def _env(objs, workload: str, key: str, value: str) -> None:
    entries = _container(objs, workload).setdefault("env", [])
    entries[:] = [e for e in entries if e["name"] != key] + [{"name": key, "value": value}]


# --- the trainer's Jobs against the manifests --------------------------------------------------------


def overlay_settings(objs) -> Settings:
    """The Settings a pony container of this overlay reads (pony-config), as the trainer controller sees them."""
    config = next(c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("pony-config"))
    return Settings.from_env(config["data"])


def training_job(objs, nodes: int = 2) -> dict:
    spec = load_spec(REPO / "services" / "trainer" / "specs" / "v7-production.yaml")
    spec = spec.replace(resources=dataclasses.replace(spec.resources, nodes=nodes))
    return render_run(spec, overlay_settings(objs), "v7-run-0a1b2c3d").job


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_job_pods_meet_the_namespace_policies_and_find_their_volumes(rendered, overlay):
    objs = rendered[overlay]
    job = training_job(objs)
    assert job["metadata"]["namespace"] == "pony"
    assert security_violations([job]) == []
    assert restricted_pss_violations([job]) == []
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] in {p["metadata"]["name"] for p in of_kind(objs, "PriorityClass")}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {p["metadata"]["name"] for p in of_kind(objs, "PersistentVolumeClaim")}, claims
    # the Job's image is built by skaffold for this overlay (dev maps cuda to cpu)
    image = pod["containers"][0]["image"]
    assert image == overlay_settings(objs).trainer.image
    assert ("cuda" in image) == (overlay != "dev")


@pytest.mark.parametrize("overlay", ["prod", "prod-redis"])
def test_prod_training_jobs_are_pinned_to_the_training_pool_with_gpus(rendered, overlay):
    job = training_job(rendered[overlay])
    assert gpu_violations([job], {job["metadata"]["name"]: "training"}) == []
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PONY_DEVICE"] == "cuda"


def test_dev_training_jobs_are_not_pinned_and_run_on_cpu_with_tiny_models_and_the_blobs_volume(dev):
    job = training_job(dev, nodes=1)
    pod = job["spec"]["template"]["spec"]
    assert "affinity" not in pod and "nodeSelector" not in pod and "tolerations" not in pod
    assert all(GPU not in c["resources"]["limits"] for c in pod["containers"])
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PONY_DEVICE"] == "cpu"
    (init,) = pod["initContainers"]
    assert init["command"] == ["ponyctl", "models", "tiny", "/models"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[env["PONY_BLOB_URL"]]]["persistentVolumeClaim"]["claimName"] == "pony-blobs"


def test_training_ranks_talk_to_each_other_and_the_blob_store_only(prod):
    ranks = pod_labels(training_job(prod))
    assert traffic_allowed(prod, ranks, ranks, 29500)
    assert traffic_allowed(prod, ranks, None, 443)
    assert not traffic_allowed(prod, ranks, labels_of(prod, "scorer"), 50052)
    assert not traffic_allowed(prod, labels_of(prod, "sampler"), ranks, 29500)


# --- sampler, Triton and the model repository ---------------------------------------------------------


def mounts_of(objs, workload: str) -> dict[str, tuple[str, bool]]:
    """mountPath -> (claim name or volume kind, read-only) of a Deployment's main container."""
    spec = find(objs, "Deployment", workload)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = {}
    for m in spec["containers"][0]["volumeMounts"]:
        volume = volumes[m["name"]]
        source = volume["persistentVolumeClaim"]["claimName"] if "persistentVolumeClaim" in volume else "emptyDir"
        out[m["mountPath"]] = (source, bool(m.get("readOnly")))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_sampler_renders_the_repository_triton_serves_at_the_same_path(rendered, overlay):
    objs = rendered[overlay]
    settings = overlay_settings(objs)
    assert settings.sampler.triton_start is False
    assert settings.sampler.triton_url == "triton:8001"
    triton_svc = find(objs, "Service", "triton")
    assert {"name": "grpc", "port": 8001, "targetPort": "grpc", "appProtocol": "grpc"} in triton_svc["spec"]["ports"]
    repo = settings.sampler.triton_repo
    sampler, triton = mounts_of(objs, "sampler"), mounts_of(objs, "triton")
    claim, read_only = sampler[repo]
    assert claim != "emptyDir" and read_only is False  # the sampler writes config.pbtxt and version folders
    assert triton[repo] == (claim, True)  # version folders name their pipeline by absolute path
    pvc = find(objs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"])
    tritonserver = find(objs, "Deployment", "triton")["spec"]["template"]["spec"]
    args = tritonserver["containers"][0]["args"]
    assert f"--model-repository={repo}" in args and "--model-control-mode=explicit" in args
    # Triton loads pony_v7 at start only where its own init container renders the repository first (dev);
    # elsewhere the sampler loads it through the model-control API once it has rendered it.
    renders_first = [
        c
        for c in tritonserver.get("initContainers", [])
        if c["args"][:3] == ["models", "triton-repo", repo]
        and any(m["mountPath"] == repo and not m.get("readOnly") for m in c["volumeMounts"])
    ]
    assert ("--load-model=pony_v7" in args) == bool(renders_first)
    assert bool(renders_first) == (overlay == "dev")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_published_checkpoints_are_readable_by_the_sampler_and_triton(rendered, overlay):
    objs = rendered[overlay]
    claim = ResourceSpec().checkpoint_pvc
    assert find(objs, "PersistentVolumeClaim", claim)
    for workload in ("sampler", "triton"):
        assert mounts_of(objs, workload)[CHECKPOINT_MOUNT] == (claim, True), workload
    job = training_job(objs)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert volumes[mounts[CHECKPOINT_MOUNT]]["persistentVolumeClaim"]["claimName"] == claim


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_weights_path_is_the_same_for_the_sampler_and_triton(rendered, overlay):
    """config.pbtxt (rendered by the sampler) names <PONY_MODELS_DIR>/auraflow; Triton must see it there."""
    objs = rendered[overlay]
    models_dir = overlay_settings(objs).models_dir
    for workload in ("sampler", "triton"):
        assert models_dir in mounts_of(objs, workload), workload
    assert overlay_settings(objs).sampler.triton_repo != models_dir


def test_the_trainer_reaches_the_sampler_to_publish(prod):
    trainer, sampler = labels_of(prod, "trainer"), labels_of(prod, "sampler")
    assert traffic_allowed(prod, trainer, sampler, 50056)
    assert not traffic_allowed(prod, trainer, labels_of(prod, "triton"), 8001)
    assert not traffic_allowed(prod, labels_of(prod, "scorer"), sampler, 50056)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_app_backends_reach_the_sampler_on_grpc_and_kserve_http_and_never_triton(rendered, overlay):
    """The sampler's KServe v2 HTTP port (PONY_SAMPLER_HTTP_PORT) is a container port, a Service port, and open to
    the app namespaces exactly as the gRPC port is; Triton (whose sibling `_sync` models skip the sampler's checks)
    stays reachable from the sampler alone."""
    objs = rendered[overlay]
    http_port = overlay_settings(objs).sampler.http_port
    assert http_port == 8080
    assert {"name": "http", "containerPort": http_port} in _container(objs, "sampler")["ports"]
    service_ports = {p["port"] for p in find(objs, "Service", "sampler")["spec"]["ports"]}
    assert service_ports == {50056, http_port}
    ingress = find(objs, "NetworkPolicy", "sampler-from-apps")["spec"]["ingress"]
    apps = {"namespaceSelector": {"matchLabels": {"pony.ai/sampler-client": "true"}}}
    assert [rule["from"] for rule in ingress] == [[apps]]
    assert {p["port"] for rule in ingress for p in rule["ports"]} == service_ports
    triton = find(objs, "NetworkPolicy", "triton-from-sampler")["spec"]["ingress"]
    sampler = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sampler"}}}
    assert [rule["from"] for rule in triton] == [[sampler]]


# --- blob store -------------------------------------------------------------------------------------


def test_the_prod_blob_store_filesystem_is_in_the_requirements_and_imports(prod):
    import fsspec

    url = overlay_settings(prod).blob_url
    scheme = url.split("://", 1)[0]
    package = {"s3": "s3fs", "gs": "gcsfs"}[scheme]
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert any(line.startswith(package) for line in lines), f"{package} missing from requirements.txt"
    assert fsspec.get_filesystem_class(scheme).__module__.startswith(package)

"""Rendered Kubernetes objects of a training run: schema-valid (kubernetes-validate --strict), pinned to the
training pool, hardened, and multi-node through a headless Service plus an Indexed Job."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from pony_common.config import Settings
from services.trainer.render import RUN_LABEL, render_run
from services.trainer.spec import parse_spec

VERSIONS = ("1.30.0", "1.37.0")


def spec(nodes: int = 1, gpus: int = 8):
    return parse_spec(
        {
            "name": "v7-base",
            "manifest": "s3://pony-data/exports/v7/manifest.parquet",
            "stages": [
                {"name": "low", "resolution": 512, "steps": 20000, "batch_size": 16},
                {"name": "high", "resolution": 1024, "steps": 10000, "batch_size": 4},
            ],
            "resources": {
                "nodes": nodes,
                "gpus_per_node": gpus,
                "processes_per_node": max(gpus, 1),
                "cpu": "32",
                "memory": "480Gi",
                "shm_size": "64Gi",
            },
        }
    )


@pytest.fixture
def cluster_settings(settings: Settings) -> Settings:
    return settings.replace(trainer_namespace="pony-train", blob_url="s3://pony-blobs", models_dir="/models")


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_passes_strict_validation(cluster_settings: Settings, nodes: int, version: str) -> None:
    rendered = render_run(spec(nodes), cluster_settings, "v7-base-0a1b2c3d")
    kinds = [o["kind"] for o in rendered.objects]
    assert kinds == (
        ["PersistentVolumeClaim", "ConfigMap", "Job"]
        if nodes == 1
        else ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    )
    for obj in rendered.objects:
        assert kubernetes_validate.validate(obj, version, strict=True) == version.rsplit(".", 1)[0]


def test_strict_validation_catches_a_misspelt_field(cluster_settings: Settings) -> None:
    job = copy.deepcopy(render_run(spec(), cluster_settings, "r-1").job)
    job["spec"]["template"]["spec"]["nodeSelecter"] = {"x": "y"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.37.0", strict=True)


def test_a_single_node_run_is_one_job_pinned_to_the_training_pool(cluster_settings: Settings) -> None:
    rendered = render_run(spec(1), cluster_settings, "v7-base-0a1b2c3d")
    job = rendered.job
    assert rendered.service is None
    assert job["metadata"]["namespace"] == "pony-train"
    assert job["metadata"]["labels"][RUN_LABEL] == "v7-base-0a1b2c3d"
    assert "completionMode" not in job["spec"]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pony.ai/pool": "training"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "pony-training"
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"][:4] == ["torchrun", "--nnodes=1", "--nproc-per-node=8", "--standalone"]
    assert container["command"][-4:] == ["--spec", "/etc/pony/train/spec.yaml", "--run-id", "v7-base-0a1b2c3d"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PONY_DEVICE"] == "cuda" and env["PONY_BLOB_URL"] == "s3://pony-blobs"


def test_pods_are_hardened_with_shm_tmp_and_checkpoint_volumes(cluster_settings: Settings) -> None:
    pod = render_run(spec(2), cluster_settings, "r-2").job["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["tmp"]["emptyDir"] == {}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "pony-checkpoints"
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/checkpoints"} <= mounts


def test_a_multi_node_run_is_an_indexed_job_behind_a_headless_service(cluster_settings: Settings) -> None:
    rendered = render_run(spec(4), cluster_settings, "v7-base-0a1b2c3d")
    svc, job = rendered.service, rendered.job
    assert svc is not None
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {RUN_LABEL: "v7-base-0a1b2c3d"}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert pod["containers"][0]["command"] == [
        "torchrun",
        "--nnodes=4",
        "--nproc-per-node=8",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={job['metadata']['name']}-0.{svc['metadata']['name']}.pony-train.svc",
        "--master-port=29500",
        "-m",
        "services.trainer.train",
        "--spec",
        "/etc/pony/train/spec.yaml",
        "--run-id",
        "v7-base-0a1b2c3d",
    ]
    (index_env,) = [e for e in pod["containers"][0]["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]


def test_the_spec_travels_in_the_config_map(cluster_settings: Settings) -> None:
    rendered = render_run(spec(1), cluster_settings, "r-3")
    from services.trainer.spec import parse_spec_text

    assert parse_spec_text(rendered.config_map["data"]["spec.yaml"]) == spec(1)
    volumes = {v["name"]: v for v in rendered.job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["spec"]["configMap"]["name"] == rendered.config_map["metadata"]["name"]


@pytest.mark.parametrize("name", ["v7-production.yaml", "tiny-cpu.yaml"])
def test_the_shipped_example_specs_parse_and_render_valid_objects(cluster_settings: Settings, name: str) -> None:
    from pathlib import Path

    from services.trainer.spec import load_spec

    example = load_spec(Path(__file__).resolve().parents[2] / "services" / "trainer" / "specs" / name)
    rendered = render_run(example, cluster_settings, f"{example.name}-00000000")
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
    assert (rendered.service is not None) == (example.resources.nodes > 1)

"""Rendered Kubernetes objects of a training run: schema-valid (kubernetes-validate --strict), pinned to the
training pool (or not at all when the pool label is empty), hardened, the spec carried in the container's env,
and multi-node through a headless Service plus an Indexed Job."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from pony_common.config import Settings
from services.trainer.events import parse_event
from services.trainer.render import COMPONENT_LABEL, RUN_LABEL, SPEC_ENV, render_run
from services.trainer.spec import parse_spec
from services.trainer.training.train import read_spec
from tests.trainer.conftest import tiny_spec

VERSIONS = ("1.30.0", "1.37.0")
ROOT = Path(__file__).resolve().parents[2]


def spec(nodes: int = 1, gpus: int = 8, **overrides):
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
            **overrides,
        }
    )


def expand(value: str, defined: dict[str, str]) -> str:
    """What the kubelet does to a container env value or argument: `$$` -> `$`, `$(NAME)` -> the value of an
    earlier env var NAME (left as is when undefined)."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return defined.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def container_env(job: dict) -> dict[str, str]:
    """The trainer container's plain env values, expanded as the kubelet expands them."""
    out: dict[str, str] = {}
    for item in job["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in item:
            out[item["name"]] = expand(item["value"], out)
    return out


@pytest.fixture
def cluster_settings(settings: Settings) -> Settings:
    return settings.replace(
        trainer_namespace="pony-train",
        blob_url="s3://pony-blobs",
        models_dir="/models",
        trainer_pool_label="pony.ai/pool",
    )


@pytest.mark.parametrize("pool_label", ["pony.ai/pool", ""])
@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_passes_strict_validation(
    cluster_settings: Settings, nodes: int, version: str, pool_label: str
) -> None:
    rendered = render_run(spec(nodes), cluster_settings.replace(trainer_pool_label=pool_label), "v7-base-0a1b2c3d")
    kinds = [o["kind"] for o in rendered.objects]
    assert kinds == (["PersistentVolumeClaim", "Job"] if nodes == 1 else ["PersistentVolumeClaim", "Service", "Job"])
    for obj in rendered.objects:
        assert kubernetes_validate.validate(obj, version, strict=True) == version.rsplit(".", 1)[0]


def test_no_config_map_or_other_kind_needs_rights_beyond_jobs_services_and_pvcs(cluster_settings: Settings) -> None:
    for nodes in (1, 3):
        rendered = render_run(spec(nodes), cluster_settings, "r-0")
        assert {o["kind"] for o in rendered.objects} <= {"Job", "Service", "PersistentVolumeClaim"}
        volumes = rendered.job["spec"]["template"]["spec"]["volumes"]
        assert not [v for v in volumes if "configMap" in v or "secret" in v or "projected" in v]


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
    assert "nodeSelector" not in pod
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {"matchExpressions": [{"key": "pony.ai/pool", "operator": "In", "values": ["training"]}]}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "pony-training"
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"][:4] == ["torchrun", "--nnodes=1", "--nproc-per-node=8", "--standalone"]
    assert container["command"][-4:] == ["--spec", f"env:{SPEC_ENV}", "--run-id", "v7-base-0a1b2c3d"]
    env = container_env(job)
    assert env["PONY_DEVICE"] == "cuda" and env["PONY_BLOB_URL"] == "s3://pony-blobs"


def test_the_pool_value_comes_from_the_spec(cluster_settings: Settings) -> None:
    doc = spec(1).to_dict()
    doc["resources"]["pool"] = "training-h200"
    pod = render_run(parse_spec(doc), cluster_settings, "r-p").job["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == ["training-h200"]


def test_an_empty_pool_label_neither_pins_nor_asks_for_a_gpu(cluster_settings: Settings) -> None:
    dev = cluster_settings.replace(trainer_pool_label="")
    for nodes in (1, 2):
        job = render_run(spec(nodes, gpus=8), dev, "r-dev").job
        pod = job["spec"]["template"]["spec"]
        assert "affinity" not in pod and "nodeSelector" not in pod and "tolerations" not in pod
        (container,) = pod["containers"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container_env(job)["PONY_DEVICE"] == "cpu"


def test_pods_meet_the_restricted_standard_with_shm_tmp_checkpoint_and_model_volumes(
    cluster_settings: Settings,
) -> None:
    pod = render_run(spec(2), cluster_settings, "r-2").job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["runAsUser"] != 0
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not sc["privileged"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["tmp"]["emptyDir"] == {}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "pony-checkpoints"
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "pony-models", "readOnly": True}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/checkpoints", "/models"} <= set(mounts)
    assert mounts["/tmp"]["name"] == "tmp" and mounts["/models"]["readOnly"] is True
    assert "initContainers" not in pod


def test_pods_carry_the_label_the_training_network_policy_selects(cluster_settings: Settings) -> None:
    job = render_run(spec(2), cluster_settings, "r-2").job
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[COMPONENT_LABEL] == "training-job"
    assert labels["app.kubernetes.io/part-of"] == "pony"
    assert labels[RUN_LABEL] == "r-2"


def test_without_a_models_pvc_an_init_container_writes_the_tiny_models_and_blobs_come_from_their_pvc(
    cluster_settings: Settings,
) -> None:
    dev = cluster_settings.replace(
        trainer_pool_label="", trainer_models_pvc="", trainer_blobs_pvc="pony-blobs", blob_url="/data/blobs"
    )
    pod = render_run(spec(1, gpus=0), dev, "r-dev").job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"] == {"name": "models", "emptyDir": {}}
    assert volumes["blobs"]["persistentVolumeClaim"] == {"claimName": "pony-blobs"}
    (init,) = pod["initContainers"]
    assert init["command"] == ["ponyctl", "models", "tiny", "/models"]
    assert init["image"] == pod["containers"][0]["image"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/models", "/tmp"}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/data/blobs"] == "blobs" and mounts["/models"] == "models"
    # an object-store blob URL mounts nothing
    s3 = render_run(spec(1), dev.replace(blob_url="s3://b"), "r").job["spec"]["template"]["spec"]
    assert "blobs" not in {v["name"] for v in s3["volumes"]}


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
        "services.trainer.training.train",
        "--spec",
        "env:PONY_TRAIN_SPEC",
        "--run-id",
        "v7-base-0a1b2c3d",
    ]
    (index_env,) = [e for e in pod["containers"][0]["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]


def test_the_spec_travels_in_the_env_unchanged_by_the_kubelets_expansion(cluster_settings: Settings) -> None:
    # `$(HOME)` would be expanded by the kubelet (HOME is set before the spec) unless escaped.
    original = spec(1, manifest="s3://pony-data/$(HOME)/$$x/manifest.parquet")
    job = render_run(original, cluster_settings, "r-3").job
    env = container_env(job)
    assert read_spec(f"env:{SPEC_ENV}", env) == original
    assert read_spec(f"env:{SPEC_ENV}", env).manifest == "s3://pony-data/$(HOME)/$$x/manifest.parquet"


def test_the_jobs_own_command_trains_from_the_spec_in_its_env(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    """The trainer container's command and env, run here as the kubelet would (torchrun included)."""
    doc = tiny_spec(
        manifest,
        output=str(tmp_path / "out"),
        stages=[{"name": "low", "resolution": 32, "steps": 2, "batch_size": 1, "bucket_step": 16}],
    )
    settings = model_settings.replace(trainer_pool_label="", blob_url=model_settings.blob_url)
    job = render_run(parse_spec(doc), settings, "tiny-env").job
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = container_env(job)
    env.update({"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PONY_STATE_DIR": str(tmp_path / "state")})
    env.update({"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"})
    command = [expand(arg, env) for arg in container["command"]]
    assert command[0] == "torchrun"
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e]
    assert [e["kind"] for e in events][-1] == "done"
    assert events[-1]["output"] == str(tmp_path / "out" / "final")
    assert (tmp_path / "out" / "final" / "model_index.json").is_file()


def test_a_missing_spec_variable_exits_2_naming_the_spec(capsys) -> None:
    from services.trainer.training.train import main

    assert main(["--spec", "env:PONY_TRAIN_SPEC"], environ={"PONY_STATE_DIR": "/tmp/pony-test-unused"}) == 2
    assert "PONY_TRAIN_SPEC" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["v7-production.yaml", "tiny-cpu.yaml"])
def test_the_shipped_example_specs_parse_and_render_valid_objects(cluster_settings: Settings, name: str) -> None:
    from services.trainer.spec import load_spec

    example = load_spec(ROOT / "services" / "trainer" / "specs" / name)
    rendered = render_run(example, cluster_settings, f"{example.name}-00000000")
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
    assert (rendered.service is not None) == (example.resources.nodes > 1)

"""Every rendered object is valid: core kinds with kubernetes-validate --strict for Kubernetes 1.30 and
1.37, KEDA kinds against the KEDA CRD schemas (unknown fields rejected, as strict field validation does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import OVERLAYS, Obj, keda_schemas, name, strict

K8S_VERSIONS = ("1.30.0", "1.37.0")


def _kubernetes_validate(objs: list[Obj], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objs))
    versions = [arg for v in K8S_VERSIONS for arg in ("-k", v)]
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *versions, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _is_crd_kind(obj: Obj) -> bool:
    return obj["apiVersion"].startswith("keda.sh/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_pass_kubernetes_validate_strict(rendered, overlay, tmp_path):
    core = [o for o in rendered[overlay] if not _is_crd_kind(o)]
    assert len(core) > 30
    done = _kubernetes_validate(core, tmp_path)
    # Unknown kinds only warn ("Couldn't find schema"), so a warning fails the test as well.
    assert done.returncode == 0 and "WARN" not in done.stdout, done.stdout + done.stderr


def test_kubernetes_validate_rejects_unknown_fields(prod, tmp_path):
    deployment = next(o for o in prod if o["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    done = _kubernetes_validate([bad], tmp_path)
    assert done.returncode != 0
    assert "imagePullPolcy" in done.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects_match_the_crd_schemas(rendered, overlay):
    schemas = keda_schemas()
    keda = [o for o in rendered[overlay] if _is_crd_kind(o)]
    if overlay == "dev":
        assert keda == [], "dev has no KEDA"
        return
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    for obj in keda:
        schema = schemas[(obj["apiVersion"], obj["kind"])]
        errors = [e.message for e in jsonschema.Draft7Validator(strict(schema)).iter_errors(obj)]
        assert errors == [], f"{name(obj)}: {errors}"


def test_keda_schema_check_rejects_a_misspelt_field(prod):
    schemas = keda_schemas()
    scaled = next(o for o in prod if o["kind"] == "ScaledObject")
    bad = yaml.safe_load(yaml.safe_dump(scaled))
    bad["spec"]["maxReplicas"] = 3
    del bad["spec"]["scaleTargetRef"]
    schema = strict(schemas[(bad["apiVersion"], bad["kind"])])
    messages = " ".join(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad))
    assert "maxReplicas" in messages and "scaleTargetRef" in messages

"""skaffold.yaml: valid against the v4beta14 schema, builds the three images from deploy/docker, renders
the overlays through kustomize, deploys with kubectl, and forwards the sampler and Triton ports."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import KEDA_CRDS, REPO, SHARED_REF, SKAFFOLD_SCHEMA, find, images

IMAGES = {
    "pony-platform/cpu": "deploy/docker/cpu.Dockerfile",
    "pony-platform/cuda": "deploy/docker/cuda.Dockerfile",
    "pony-platform/triton": "deploy/docker/triton.Dockerfile",
}
THIRD_PARTY = ("postgres:", "rabbitmq:", "redis:")


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load((REPO / "skaffold.yaml").read_text())


def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SKAFFOLD_SCHEMA.read_text()))


def test_skaffold_yaml_matches_the_schema(skaffold):
    errors = [f"{list(e.path)}: {e.message}" for e in _validator().iter_errors(skaffold)]
    assert errors == []
    assert skaffold["apiVersion"] == "skaffold/v4beta14" and skaffold["kind"] == "Config"


def test_schema_check_rejects_a_misplaced_field(skaffold):
    broken = yaml.safe_load(yaml.safe_dump(skaffold))
    broken["deploy"]["kustomize"] = {"paths": ["deploy/overlays/dev"]}  # v1-era layout, gone in v4
    assert list(_validator().iter_errors(broken))


def test_builds_the_three_images_from_deploy_docker(skaffold):
    built = {a["image"]: a["docker"]["dockerfile"] for a in skaffold["build"]["artifacts"]}
    assert built == IMAGES
    for dockerfile in built.values():
        assert (REPO / dockerfile).is_file()
    dev = next(p for p in skaffold["profiles"] if p["name"] == "dev")
    assert {a["image"] for a in dev["build"]["artifacts"]} == {"pony-platform/cpu", "pony-platform/triton"}


def test_profiles_render_the_overlays_with_kustomize_and_deploy_with_kubectl(skaffold):
    assert "kubectl" in skaffold["deploy"]
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert set(profiles) == {"dev", "prod"}
    for profile, overlay in (("dev", "deploy/overlays/dev"), ("prod", "deploy/overlays/prod")):
        assert profiles[profile]["manifests"]["kustomize"]["paths"] == [overlay]
        assert (REPO / overlay / "kustomization.yaml").is_file()


def test_port_forwards_point_at_rendered_service_ports(skaffold, rendered):
    forwards = {(f["resourceName"], f["port"]) for f in skaffold["portForward"]}
    assert forwards == {("sampler", 50056), ("triton", 8000), ("triton", 8001)}
    for overlay in ("dev", "prod"):
        for forward in skaffold["portForward"]:
            assert forward["resourceType"] == "service" and forward["namespace"] == "pony"
            service = find(rendered[overlay], "Service", forward["resourceName"])
            assert forward["port"] in {p["port"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_image_is_built_by_skaffold_or_a_pinned_upstream(skaffold, rendered, overlay):
    profile = next(p for p in skaffold["profiles"] if p["name"] == overlay)
    artifacts = {a["image"] for a in profile.get("build", skaffold["build"])["artifacts"]}
    for ref, where in images(rendered[overlay]).items():
        repo = ref.split("@", 1)[0].rsplit(":", 1)[0]
        assert repo in artifacts or (overlay == "dev" and ref.startswith(THIRD_PARTY)), where
    # The trainer's Job image lives in a ConfigMap: skaffold must rewrite it like a container image.
    allowed = skaffold["resourceSelector"]["allow"]
    assert {"groupKind": "ConfigMap", "image": [".data.PONY_TRAINER_IMAGE"]} in allowed


def test_schemas_match_the_shared_reference():
    if not SHARED_REF.is_dir():
        pytest.skip(f"{SHARED_REF} is not on this machine; the vendored copies are used as they are")
    pairs = [(SKAFFOLD_SCHEMA, SHARED_REF / "skaffold-schema.json")]
    pairs += [(p, SHARED_REF / "keda" / p.name) for p in sorted(KEDA_CRDS.glob("*.yaml"))]
    assert len(pairs) == 3
    for copy, original in pairs:
        assert copy.read_bytes() == original.read_bytes(), copy.name

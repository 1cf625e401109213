"""The three Dockerfiles: pinned base images, a non-root user (uid 10001), stubs generated in the build,
and a build context limited to what they copy."""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import REPO, image_tag

DOCKERFILES = {
    "cpu": REPO / "deploy/docker/cpu.Dockerfile",
    "cuda": REPO / "deploy/docker/cuda.Dockerfile",
    "triton": REPO / "deploy/docker/triton.Dockerfile",
}


def _instructions(path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _base_images(path) -> list[str]:
    args = {}
    bases = []
    stages = set()
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if word == "FROM":
            parts = rest.split()
            ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            if ref not in stages:
                bases.append(ref)
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    return bases


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_base_images_are_pinned_by_tag(flavour):
    bases = _base_images(DOCKERFILES[flavour])
    assert bases
    for ref in bases:
        assert image_tag(ref) not in (None, "latest"), ref


def test_triton_image_is_built_on_triton_24_10():
    assert _base_images(DOCKERFILES["triton"]) == ["nvcr.io/nvidia/tritonserver:24.10-py3"]


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_runs_as_uid_10001_and_generates_the_grpc_stubs(flavour):
    steps = _instructions(DOCKERFILES[flavour])
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    assert any(word == "RUN" and "scripts/gen_protos.sh" in rest for word, rest in steps)
    assert any(word == "RUN" and "requirements.txt" in rest for word, rest in steps)


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_entry_point_is_ponyctl(flavour):
    steps = _instructions(DOCKERFILES[flavour])
    assert [rest for word, rest in steps if word == "ENTRYPOINT"] == ['["ponyctl"]']


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_build_context_lets_through_exactly_what_is_copied(flavour):
    ignore = (DOCKERFILES[flavour].parent / f"{DOCKERFILES[flavour].name}.dockerignore").read_text()
    allowed = {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    copied = set()
    for word, rest in _instructions(DOCKERFILES[flavour]):
        if word == "COPY" and "--from" not in rest:
            copied.update(src.rstrip("*") for src in rest.split()[:-1])
    assert copied <= allowed, copied - allowed
    for src in copied - {"README.md"}:
        assert (REPO / src).exists(), src


def test_cpu_triton_image_is_the_cpu_image_laid_out_like_ngc():
    # deploy/docker/triton-cpu.Dockerfile: pony-platform/triton without NGC (tritonserver from nvidia-pytriton).
    path = REPO / "deploy/docker/triton-cpu.Dockerfile"
    steps = _instructions(path)
    assert _base_images(path) == ["pony-platform/cpu:0.1.0"]
    assert [rest for word, rest in steps if word == "USER"][-1] == "10001:10001"
    run = " ".join(rest for word, rest in steps if word == "RUN")
    assert "/opt/tritonserver/backends" in run and "ldconfig" in run and "not found" in run
    assert not [rest for word, rest in steps if word == "COPY"]
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    assert [line for line in ignore if line and not line.startswith("#")] == ["*"]


def test_cpu_image_takes_its_base_and_torch_source_as_build_arguments_and_pip_secrets_as_mounts():
    steps = _instructions(DOCKERFILES["cpu"])
    args = {rest.split("=", 1)[0] for word, rest in steps if word == "ARG"}
    assert {"PYTHON_IMAGE", "TORCH_PIP_ARGS"} <= args
    pip_runs = [rest for word, rest in steps if word == "RUN" and "pip install" in rest]
    for rest in pip_runs:
        assert "--mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt" in rest
        assert "--mount=type=secret,id=pipconf,target=/etc/pip.conf" in rest
    assert not [rest for word, rest in steps if word in ("COPY", "ADD") and ("pip.conf" in rest or ".crt" in rest)]

"""docker/ checked offline (no Docker engine or cluster here): the Dockerfiles lint clean with hadolint,
compose.yaml parses as the Compose spec, both kustomize overlays build and every manifest validates
against the Kubernetes 1.31 schemas, and the images' pinned packages match pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml
from compose_spec import PyCompose
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.31.0"


@pytest.mark.parametrize("dockerfile", ["triton.Dockerfile", "gateway.Dockerfile"])
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    result = subprocess.run([BIN / "hadolint", DOCKER / dockerfile], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install fastapi\n")
    result = subprocess.run([BIN / "hadolint", bad], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the latest tag


def _compose() -> dict[str, Any]:
    return dict(PyCompose.from_yaml((DOCKER / "compose.yaml").read_text()).to_dict())


def test_compose_parses_and_publishes_only_the_gateway_and_grafana() -> None:
    services = _compose()["services"]
    assert set(services) == {"triton", "gateway", "redis", "prometheus", "grafana"}
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"gateway", "grafana"}  # Triton and Redis only on the compose network
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert services["gateway"]["environment"]["SD_GATEWAY_TRITON_URL"] == "triton:8001"
    for name, service in services.items():
        assert re.search(r":v?\d[\w.\-]*$", service["image"]), (
            f"{name}: image {service['image']} is not pinned"
        )
    # the files compose mounts exist
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                assert (DOCKER / source).exists(), source


def test_the_compose_parser_rejects_what_compose_would() -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - the binding raises its own error type
        PyCompose.from_yaml("services:\n  web:\n    image: nginx:1.27\n    restart: sometimes\n")


def _kustomize(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed on this machine")
    out = subprocess.run(
        [kubectl, "kustomize", str(DOCKER / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kustomize_builds_and_every_manifest_validates(overlay: str) -> None:
    docs = _kustomize(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error
        assert doc["metadata"]["namespace"] == "sd-triton"
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    expected = {
        "Deployment/triton", "Deployment/gateway", "Deployment/redis", "Service/triton",
        "HorizontalPodAutoscaler/gateway", "HorizontalPodAutoscaler/triton", "PodDisruptionBudget/triton",
        "NetworkPolicy/triton", "PersistentVolumeClaim/sd-triton-models",
    }  # fmt: skip
    assert expected <= set(kinds), kinds
    triton = _find(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    container = triton["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (1 if overlay == "gpu" else None)
    assert _find(docs, "Service", "triton")["spec"]["clusterIP"] == "None"  # every pod resolvable
    gateway = _find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["SD_GATEWAY_TRITON_URL"] == "dns:triton:8001"
    policy = _find(docs, "NetworkPolicy", "triton")["spec"]["ingress"]
    assert policy[0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "gateway"}


def test_a_schema_error_is_caught() -> None:
    docs = _kustomize("gpu")
    broken = _find(docs, "Deployment", "gateway")
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _pins(name: str) -> dict[str, Requirement]:
    lines = (DOCKER / name).read_text().splitlines()
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


# what each image installs: the base requirements plus these extras of pyproject.toml
IMAGE_EXTRAS = {
    "requirements-gateway.txt": ("gateway",),
    "requirements-triton.txt": ("runtime", "export", "gpu"),
}


def _project_requirements(extras: tuple[str, ...]) -> dict[str, Requirement]:
    """The base requirements and `extras`, self-references (sd-triton[runtime]) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if req.name == project["name"]:
                todo.extend(req.extras)
            else:
                lines.append(line)
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower().replace("_", "-"): r for r in reqs if r.marker is None or r.marker.evaluate()}


@pytest.mark.parametrize("image", sorted(IMAGE_EXTRAS))
def test_image_pins_match_pyproject(image: str) -> None:
    project = _project_requirements(IMAGE_EXTRAS[image])
    pins = _pins(image)
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{image}: {pin} is not pinned"
        # onnxruntime-gpu is the GPU build of pyproject's onnxruntime
        declared = project.get(name) or project.get(name.removesuffix("-gpu"))
        assert declared is not None, f"{image}: {name} is not in pyproject.toml's {IMAGE_EXTRAS[image]}"
        assert declared.specifier.contains(spec.version), f"{image}: {pin} outside pyproject's {declared}"
        assert pin.extras == declared.extras, f"{image}: {pin} extras differ from pyproject's {declared}"
    for name in project:
        assert name in pins or f"{name}-gpu" in pins, f"{image}: {name} (pyproject) is not pinned"


def test_the_gateway_image_has_no_torch() -> None:
    assert not {"torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu"} & set(
        _pins("requirements-gateway.txt")
    )


def test_the_triton_image_matches_the_tested_triton() -> None:
    """NGC 24.10 carries Triton 2.51, the server the tests run (nvidia-pytriton 0.7.0's)."""
    dockerfile = (DOCKER / "triton.Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in dockerfile
    assert str(_project_requirements(("serve",))["nvidia-pytriton"].specifier) == "==0.7.0"

"""infra/: every YAML parses, and the image, Ray version, entrypoints and work pool agree with the code."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
IMAGE_REPO = "ghcr.io/ssjdn/ssjdn-pipeline"


def _yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), REPO / "prefect.yaml"])


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _version() -> str:
    return _pyproject()["project"]["version"]


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert m, f"ARG {name} missing in infra/Dockerfile"
    return m.group(1)


def _walk(node, key: str):
    """Every value stored under `key` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    assert _docs(path), f"{path} is empty"


def test_dockerfile_matches_installed_ray_torch_and_packages():
    import ray
    import torch

    assert _dockerfile_arg("RAY_VERSION") == ray.__version__
    assert _dockerfile_arg("RAY_IMAGE").startswith("rayproject/ray:${RAY_VERSION}-py3")
    torch_spec = _dockerfile_arg("TORCH_SPEC")
    assert torch_spec == f"torch=={torch.__version__.split('+')[0]}"
    make_default = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert torch_spec == make_default  # the image and `make install` install the same torch
    text = (INFRA / "Dockerfile").read_text()
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in (p.rstrip("*") for p in packages):
        assert re.search(rf"^COPY .*\b{pkg} \./{pkg}$", text, re.M), f"infra/Dockerfile does not copy {pkg}/"
        assert (REPO / pkg / "__init__.py").is_file()


def _image_fields() -> list[tuple[str, str]]:
    out = []
    for path in [INFRA / "kuberay" / "raycluster.yaml", INFRA / "kuberay" / "rayjob.yaml"]:
        for doc in _docs(path):
            out += [(path.name, img) for img in _walk(doc, "image")]
    launcher = _docs(INFRA / "ray-cluster-launcher.yaml")[0]
    out += [
        ("ray-cluster-launcher.yaml", launcher["docker"]["image"]),
        ("ray-cluster-launcher.yaml", launcher["docker"]["head_image"]),
    ]
    return out


def test_images_and_ray_versions_agree_with_the_package():
    import ray

    images = _image_fields()
    assert images
    for where, image in images:
        assert image in (f"{IMAGE_REPO}:{_version()}", f"{IMAGE_REPO}:{_version()}-gpu"), (where, image)
    for path in (INFRA / "kuberay").glob("*.yaml"):
        versions = [v for d in _docs(path) for v in _walk(d, "rayVersion")]
        assert versions and set(versions) == {ray.__version__}, (path.name, versions)


def _gpu_groups(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [g for g in spec["workerGroupSpecs"] if g["rayStartParams"].get("num-gpus")]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_gpu_worker_group_uses_the_gpu_image(name):
    (doc,) = _docs(INFRA / "kuberay" / name)
    groups = _gpu_groups(doc)
    assert groups, "no GPU worker group"
    for g in groups:
        (container,) = g["template"]["spec"]["containers"]
        assert container["image"].endswith("-gpu")
        gpus = int(g["rayStartParams"]["num-gpus"])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus >= 1
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not head["image"].endswith("-gpu")


def test_rayjob_entrypoint_is_a_valid_pipelines_train_command():
    from pipelines.train.cli import configure
    from ssjdn.config import load_config

    (doc,) = _docs(INFRA / "kuberay" / "rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.train"]
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(argv[3:])  # exits (fails the test) on an unknown or malformed argument
    load_config(args.config)
    gpus = sum(int(g["replicas"]) * int(g["rayStartParams"]["num-gpus"]) for g in _gpu_groups(doc))
    assert args.gpu and args.workers <= gpus, f"{args.workers} GPU workers on {gpus} GPUs"
    assert args.shards.startswith("s3://") and args.storage.startswith("s3://") and args.resume == "auto"


def test_cluster_launcher_has_gpu_workers_and_token_auth():
    doc = _docs(INFRA / "ray-cluster-launcher.yaml")[0]
    gpu_types = [t for t in doc["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and doc["head_node_type"] in doc["available_node_types"]
    assert any("ray start --head" in c and "RAY_AUTH_MODE=token" in c for c in doc["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in doc["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in doc["file_mounts"]


def test_prefect_deployment_and_work_pool_agree_with_the_flow():
    import inspect

    from flows.train import train_ssjdn

    doc = _docs(REPO / "prefect.yaml")[0]
    script = (INFRA / "prefect" / "setup-work-pool.sh").read_text()
    pool = re.search(r'^POOL="\$\{SSJDN_WORK_POOL:-([a-z0-9-]+)\}"', script, re.M).group(1)
    assert {d["work_pool"]["name"] for d in doc["deployments"]} == {pool}
    (dep,) = [d for d in doc["deployments"] if d["name"] == "train-ssjdn"]
    path, func = dep["entrypoint"].split(":")
    assert (REPO / path).is_file() and func == train_ssjdn.fn.__name__
    assert train_ssjdn.name == "train-ssjdn"
    assert set(dep.get("parameters", {})) <= set(inspect.signature(train_ssjdn.fn).parameters)
    for dep in doc["deployments"]:  # every deployment names a flow that exists and only its parameters
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        unknown = set(dep.get("parameters", {})) - set(inspect.signature(flow.fn).parameters)
        assert not unknown, (dep["name"], unknown)
    (scenes,) = [d for d in doc["deployments"] if d["name"] == "reindex-scenes"]
    from flows.reindex import scene_tile_options
    from pipelines.embed.options import EmbedOptions

    assert scene_tile_options(scenes["parameters"]["tile_options"], EmbedOptions()).chip_size == 256
    assert subprocess.run(["bash", "-n", str(INFRA / "prefect" / "setup-work-pool.sh")]).returncode == 0

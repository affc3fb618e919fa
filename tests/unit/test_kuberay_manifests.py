"""cluster/ manifests against the published KubeRay CRD schemas and Ray's own `ray up` schema, and their
consistency with terraform/ outputs and conf/.

The CRDs live beside the repository (`<repo>/../shared/kuberay-crds/`, as in CI). Kubernetes rejects unknown fields
(`kubectl apply` validates strictly), so the CRD schemas are made strict the same way before validating: an object
with declared properties admits no others unless it says `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = REPO.parent / "shared" / "kuberay-crds"
PLACEHOLDER = re.compile(r"\$\{tf:([a-z0-9_]+)\}")
KIND_TO_CRD = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
               "RayService": "ray.io_rayservices.yaml"}
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"}


def _render_module():
    spec = importlib.util.spec_from_file_location("cluster_render", CLUSTER / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strict(schema):
    """A copy of an OpenAPI v3 schema in which objects with declared properties reject unknown ones."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator for the strict v1 schema of a KubeRay kind (built once: the CRDs are about 1 MB each)."""
    path = CRDS / KIND_TO_CRD[kind]
    if not path.exists():
        pytest.fail(f"KubeRay CRDs not found at {CRDS} (expected beside the repository, as in CI)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _terraform_outputs() -> set[str]:
    return set(re.findall(r'^output "([a-z0-9_]+)"', (REPO / "terraform" / "outputs.tf").read_text(), re.M))


def _fake_outputs() -> dict[str, object]:
    """A stand-in for `terraform output -json`, shaped like the real one."""
    values: dict[str, object] = {name: f"fake-{name.replace('_', '-')}" for name in _terraform_outputs()}
    values.update(region="us-east-1", bucket_name="llm-platform-123456789012-us-east-1",
                  storage_root="s3://llm-platform-123456789012-us-east-1/llm-platform",
                  ray_namespace="ray", ray_service_account="ray",
                  image_repository_url="123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-platform",
                  private_subnet_ids=["subnet-0a", "subnet-0b"], gpu_node_groups=["gpu-a10g"])
    return {k: {"value": v, "type": "string", "sensitive": False} for k, v in values.items()}


def _kuberay_files() -> list[Path]:
    files = sorted(CLUSTER.glob("ray-cluster.*.yaml")) + sorted(CLUSTER.glob("ray-job.*.yaml")) + \
        sorted(CLUSTER.glob("ray-service.*.yaml"))
    return [f for f in files if f.name != "ray-cluster.aws.yaml"]


def _rendered(path: Path) -> dict:
    render = _render_module()
    outputs = {k: v["value"] for k, v in _fake_outputs().items()}
    return yaml.safe_load(render.render(path.read_text(), outputs, "0.1.0", source=path.name))


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of every Ray pod a manifest creates."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if doc["kind"] == "RayCluster" else None)
    if cluster is None:
        return []
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


def test_expected_manifests_exist():
    names = {p.name for p in CLUSTER.glob("*.yaml")}
    for stage in ("data", "train", "tune", "eval"):
        assert f"ray-job.{stage}.yaml" in names
    assert "ray-service.serve.yaml" in names and "ray-cluster.aws.yaml" in names
    assert any(n.startswith("ray-cluster.") and n != "ray-cluster.aws.yaml" for n in names)


@pytest.mark.parametrize("path", _kuberay_files(), ids=lambda p: p.name)
def test_manifest_validates_against_kuberay_crd(path):
    for doc in (yaml.safe_load(path.read_text()), _rendered(path)):
        assert doc["apiVersion"] == "ray.io/v1", path.name
        _crd_validator(doc["kind"]).validate(doc)


def test_strict_schema_rejects_a_misspelt_field():
    doc = _rendered(CLUSTER / "ray-cluster.gpu.yaml")
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # the real field is maxReplicas
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        _crd_validator("RayCluster").validate(doc)


def test_ray_up_config_validates_against_ray_schema():
    import ray
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    path = CLUSTER / "ray-cluster.aws.yaml"
    for doc in (yaml.safe_load(path.read_text()), _rendered(path)):
        jsonschema.validate(doc, schema)
        # What `ray up` itself checks, after merging the AWS defaults.
        validate_config(fillout_defaults(copy.deepcopy(doc)))
    rendered = _rendered(path)
    for node_type in rendered["available_node_types"].values():
        config = node_type["node_config"]
        assert config["SubnetIds"] == ["subnet-0a", "subnet-0b"], "list outputs must render as YAML lists"
        assert config["MetadataOptions"]["HttpTokens"] == "required"
        assert config["IamInstanceProfile"]["Arn"].startswith("fake-ray-up-")


def test_every_referenced_terraform_output_exists():
    outputs = _terraform_outputs()
    assert {"bucket_name", "ray_irsa_role_arn", "cluster_name", "region", "kubeconfig_command"} <= outputs
    referenced: dict[str, set[str]] = {}
    sources = list(CLUSTER.rglob("*.yaml")) + list((REPO / "conf").rglob("*.yaml")) + [REPO / "docs" / "cloud.md"]
    for path in sources:
        if path.exists():
            for name in PLACEHOLDER.findall(path.read_text()):
                referenced.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert referenced, "cluster/ uses no terraform outputs"
    missing = {name: sorted(files) for name, files in referenced.items() if name not in outputs}
    assert not missing, f"references to terraform outputs that do not exist: {missing}"
    # docs/cloud.md names outputs in `terraform output <name>` commands.
    docs = REPO / "docs" / "cloud.md"
    if docs.exists():
        for name in re.findall(r"terraform(?: -chdir=\S+)? output (?:-raw |-json )?([a-z0-9_]+)", docs.read_text()):
            assert name in outputs, f"docs/cloud.md uses terraform output {name!r}, which does not exist"


def test_render_rejects_an_unknown_output():
    render = _render_module()
    with pytest.raises(ValueError, match="no_such_output"):
        render.render("x: ${tf:no_such_output}", {"region": "us-east-1"}, "1", source="t.yaml")
    assert render.render("x: ${tf:region}:${image_tag}", {"region": "eu-west-1"}, "7") == "x: eu-west-1:7"


def test_storage_config_matches_terraform_and_manifests():
    s3 = yaml.safe_load((REPO / "conf" / "storage" / "s3.yaml").read_text())
    match = re.fullmatch(r"s3://\$\{oc\.env:(\w+)\}/([\w.-]+)", s3["root"])
    assert match, f"conf/storage/s3.yaml root has an unexpected form: {s3['root']}"
    bucket_env, prefix = match.groups()
    variables = (REPO / "terraform" / "variables.tf").read_text()
    default_prefix = re.search(r'variable "storage_prefix".*?default\s*=\s*"([^"]+)"', variables, re.S).group(1)
    assert prefix == default_prefix, "conf/storage/s3.yaml and terraform's storage_prefix disagree"
    for path in _kuberay_files():
        doc = yaml.safe_load(path.read_text())
        for group, pod in _pod_specs(doc):
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get(bucket_env) == "${tf:bucket_name}", f"{path.name}/{group}: {bucket_env} not set"
                assert env.get("AWS_REGION") == "${tf:region}", f"{path.name}/{group}: AWS_REGION not set"
                assert not CREDENTIAL_ENV & set(env), f"{path.name}/{group} sets a credential"


def test_pods_use_the_irsa_service_account_and_gpu_settings():
    variables = (REPO / "terraform" / "variables.tf").read_text()
    gpu_default = re.search(r'variable "gpu_node_groups".*?default = \{(.*?)\n  \}', variables, re.S).group(1)
    gpu_groups = set(re.findall(r"^\s{4}([a-z0-9-]+) = \{", gpu_default, re.M))
    assert gpu_groups, "could not read terraform's default GPU node groups"
    for path in _kuberay_files():
        doc = yaml.safe_load(path.read_text())
        assert doc["metadata"]["namespace"] == "${tf:ray_namespace}", path.name
        for group, pod in _pod_specs(doc):
            assert pod["serviceAccountName"] == "${tf:ray_service_account}", f"{path.name}/{group}"
            for container in pod["containers"]:
                resources = container["resources"]
                assert resources.get("requests") and resources.get("limits"), f"{path.name}/{group} resources"
            gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"]]
            if any(gpus):
                selector = pod["nodeSelector"]["llm-platform/gpu-group"]
                assert selector in gpu_groups, f"{path.name}/{group}: no terraform GPU node group {selector!r}"
                tolerated = {(t["key"], t.get("effect")) for t in pod.get("tolerations", [])}
                assert ("nvidia.com/gpu", "NoSchedule") in tolerated, f"{path.name}/{group} lacks the GPU toleration"
            else:
                assert pod["nodeSelector"].get("llm-platform/node-role") == "cpu", f"{path.name}/{group}"


def test_ray_versions_agree():
    import ray

    for path in _kuberay_files():
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if doc["kind"] == "RayCluster" else None)
        if cluster is not None:
            assert cluster["rayVersion"] == ray.__version__, path.name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311", dockerfile, re.M), \
        "Dockerfile must build on the Ray image of the installed Ray version"


@pytest.mark.parametrize("stage", ["data", "train", "tune", "eval"])
def test_ray_job_entrypoints_compose(stage, monkeypatch):
    doc = yaml.safe_load((CLUSTER / f"ray-job.{stage}.yaml").read_text())
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": "llm-platform"}
    cluster_name = yaml.safe_load((CLUSTER / "ray-cluster.gpu.yaml").read_text())["metadata"]["name"]
    assert cluster_name == "llm-platform"
    program, command, *overrides = doc["spec"]["entrypoint"].split()
    assert (program, command) == ("llm-platform", stage)
    assert "storage=s3" in overrides and "cluster=remote" in overrides
    monkeypatch.setenv("LLM_PLATFORM_BUCKET", "bucket-from-terraform")
    from llm_platform.config import compose

    cfg = compose(stage, overrides)
    assert cfg.storage.root == "s3://bucket-from-terraform/llm-platform"
    assert cfg.cluster.address == "auto"


def test_ray_service_imports_the_serve_app_builder_with_known_args():
    from llm_platform.config.serve import ServeConfig

    doc = yaml.safe_load((CLUSTER / "ray-service.serve.yaml").read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "llm_platform.serve.app:build_app"
    allowed = set(ServeConfig.__dataclass_fields__) | {"storage_root", "storage", "drift_reference"}
    unknown = set(app["args"]) - allowed
    assert not unknown, f"build_app would reject args {sorted(unknown)}"
    assert app["args"]["storage_root"] == "${tf:storage_root}"
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # inside the pod; the Service stays ClusterIP
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"

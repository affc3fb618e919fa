"""cluster/ manifests against the published KubeRay CRD schemas and Ray's own `ray up` schema, their consistency
with terraform/ outputs and conf/, and the least-privilege rules every pod follows (its own service account, an API
token only where KubeRay's autoscaler needs one, a restricted securityContext, a NetworkPolicy per role, secrets
only from Kubernetes Secrets).

The CRDs are the KubeRay release recorded in `cluster/crds/README.md`, kept in the repository. Kubernetes rejects
unknown fields (`kubectl apply` validates strictly), so the CRD schemas are made strict the same way before
validating: an object with declared properties admits no others unless it says `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import posixpath
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = CLUSTER / "crds"
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


@cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator for the strict v1 schema of a KubeRay kind (built once: the CRDs are about 1 MB each)."""
    path = CRDS / KIND_TO_CRD[kind]
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
                  ray_namespace="ray",
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


def _cluster_spec(doc: dict) -> dict | None:
    """The RayCluster spec inside a RayCluster, RayJob or RayService (None for a RayJob on an existing cluster)."""
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if doc["kind"] == "RayCluster" else None)


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of every Ray pod a manifest creates."""
    cluster = _cluster_spec(doc)
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


def test_pods_use_gpu_settings_that_terraform_provides():
    variables = (REPO / "terraform" / "variables.tf").read_text()
    gpu_default = re.search(r'variable "gpu_node_groups".*?default = \{(.*?)\n  \}', variables, re.S).group(1)
    gpu_groups = set(re.findall(r"^\s{4}([a-z0-9-]+) = \{", gpu_default, re.M))
    assert gpu_groups, "could not read terraform's default GPU node groups"
    for path in _kuberay_files():
        doc = yaml.safe_load(path.read_text())
        assert doc["metadata"]["namespace"] == "${tf:ray_namespace}", path.name
        for group, pod in _pod_specs(doc):
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
        cluster = _cluster_spec(doc)
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
    from llm_platform.config.choices import WeightDtype
    from llm_platform.config.merge import merge
    from llm_platform.config.serve import ServeConfig
    from llm_platform.serve.app import EXTRA_ARGS

    doc = yaml.safe_load((CLUSTER / "ray-service.serve.yaml").read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "llm_platform.serve.app:build_app"
    # What build_app does with them: every key, nested ones included, and every value checked by the schema.
    cfg = merge(ServeConfig(), {k: v for k, v in app["args"].items() if k not in EXTRA_ARGS}, prefix="serve.")
    assert cfg.model == "registry:llm" and cfg.engine.dtype is WeightDtype.bfloat16
    assert app["args"]["storage_root"] == "${tf:storage_root}"
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # inside the pod; the Service stays ClusterIP
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"


# --- the CRDs: which KubeRay release, kept in step with the operator terraform installs ---------------------------

def test_crds_are_the_recorded_kuberay_release():
    readme = (CRDS / "README.md").read_text()
    recorded = dict(re.findall(r"^\| (ray\.io_\w+\.yaml) \| `([0-9a-f]{64})` \|$", readme, re.M))
    assert set(recorded) == set(KIND_TO_CRD.values()), "cluster/crds/README.md must list a sha256 for each CRD"
    for name, digest in recorded.items():
        actual = hashlib.sha256((CRDS / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name} changed: update the KubeRay version and hashes in cluster/crds/README.md"
    version = re.search(r"^\| KubeRay version \| v(\d+\.\d+\.\d+) \|$", readme, re.M).group(1)
    variables = (REPO / "terraform" / "variables.tf").read_text()
    chart = re.search(r'variable "kuberay_operator_chart_version".*?default\s*=\s*"([^"]+)"', variables, re.S).group(1)
    assert chart == version, f"terraform installs KubeRay {chart}, the manifests are validated against {version}"
    assert "Apache License" in (CRDS / "LICENSE").read_text()[:200], "the CRDs' Apache-2.0 license travels with them"
    project_readme = (REPO / "README.md").read_text()
    assert f"v{version}" in project_readme and "cluster/crds" in project_readme, \
        "README.md must say which KubeRay version the manifests are validated against"


# --- least privilege ---------------------------------------------------------------------------------------------

TRAINING_ROLES = {"ray-head", "ray-worker", "job-submitter"}
SERVING_ROLES = {"serve-head", "serve-worker"}
# The terraform output that names each role's service account (None: the namespace's default, with no token).
ROLE_SERVICE_ACCOUNT_OUTPUT = {"ray-head": "ray_head_service_account", "ray-worker": "ray_worker_service_account",
                               "serve-head": "serve_head_service_account",
                               "serve-worker": "serve_worker_service_account", "job-submitter": None}


def _pod_templates(doc: dict) -> list[tuple[str, str, dict]]:
    """(group, expected role, pod template) of every pod a manifest creates, the RayJob submitter included."""
    serving = doc["kind"] == "RayService"
    found = []
    cluster = _cluster_spec(doc)
    if cluster is not None:
        found.append(("head", "serve-head" if serving else "ray-head", cluster["headGroupSpec"]["template"]))
        found += [(g["groupName"], "serve-worker" if serving else "ray-worker", g["template"])
                  for g in cluster.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob":
        found.append(("submitter", "job-submitter", doc["spec"]["submitterPodTemplate"]))
    return found


def _all_manifests() -> list[tuple[Path, dict]]:
    return [(path, yaml.safe_load(path.read_text())) for path in _kuberay_files()]


def _terraform_service_accounts() -> dict[str, dict]:
    """{output name: the entry of terraform's ray_service_accounts local it names} (irsa.tf, outputs.tf)."""
    import hcl2

    def unquote(value):
        if isinstance(value, dict):
            return {k.strip('"'): unquote(v) for k, v in value.items() if not k.startswith("__")}
        return value.strip('"') if isinstance(value, str) else value

    with open(REPO / "terraform" / "irsa.tf") as f:
        local = next(b for b in hcl2.load(f)["locals"] if "ray_service_accounts" in b)["ray_service_accounts"]
    accounts = unquote(local)
    outputs = (REPO / "terraform" / "outputs.tf").read_text()
    named = re.findall(r'output "(\w+)" \{[^}]*?kubernetes_service_account_v1\.ray\["([\w-]+)"\]', outputs)
    return {output: accounts[key] for output, key in named}


def test_each_pod_role_has_its_own_service_account():
    accounts = _terraform_service_accounts()
    assert set(accounts) == {o for o in ROLE_SERVICE_ACCOUNT_OUTPUT.values() if o}, sorted(accounts)
    roles_seen = set()
    for path, doc in _all_manifests():
        heads_autoscale = bool((_cluster_spec(doc) or {}).get("enableInTreeAutoscaling"))
        for group, role, template in _pod_templates(doc):
            where = f"{path.name}/{group}"
            assert template["metadata"]["labels"].get("llm-platform/role") == role, f"{where}: role label"
            roles_seen.add(role)
            pod = template["spec"]
            output = ROLE_SERVICE_ACCOUNT_OUTPUT[role]
            if output is None:
                assert "serviceAccountName" not in pod, f"{where} needs no service account"
                assert pod.get("automountServiceAccountToken") is False, f"{where} must not mount an API token"
                continue
            assert pod["serviceAccountName"] == f"${{tf:{output}}}", f"{where} uses another role's account"
            account = accounts[output]
            # The pod mounts a Kubernetes API token exactly when its account is meant to have one (the heads,
            # for KubeRay's autoscaler sidecar), and says so explicitly rather than by default.
            assert pod.get("automountServiceAccountToken") is account["api_token"], f"{where}: token mount"
            if role.endswith("head"):
                assert account["api_token"] is heads_autoscale, f"{where}: a head without autoscaler needs no token"
            assert account["iam_role"] == ("serve" if role in SERVING_ROLES else "train"), f"{where}: IAM role"
    missing = (TRAINING_ROLES | SERVING_ROLES) - roles_seen
    assert not missing, f"no manifest has a pod of role {sorted(missing)}"


def _check_container_security(context: dict | None, pod_context: dict, where: str) -> None:
    assert context, f"{where} has no securityContext"
    assert context.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
    assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
    assert not context.get("capabilities", {}).get("add"), f"{where} adds capabilities"
    assert not context.get("privileged"), f"{where} is privileged"
    assert context.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable"
    assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, f"{where} may run as root"
    assert context.get("runAsUser", pod_context.get("runAsUser")) != 0, f"{where} runs as root"


def test_every_container_runs_restricted_with_a_writable_tmp():
    for path, doc in _all_manifests():
        cluster = _cluster_spec(doc)
        for group, _role, template in _pod_templates(doc):
            where = f"{path.name}/{group}"
            pod = template["spec"]
            pod_context = pod.get("securityContext") or {}
            assert pod_context.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
            assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
            shared = [k for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
            assert not shared, f"{where} shares the node's {shared}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert not any("hostPath" in v for v in volumes.values()), f"{where} mounts a host path"
            for container in pod["containers"] + pod.get("initContainers", []):
                cwhere = f"{where}/{container['name']}"
                _check_container_security(container.get("securityContext"), pod_context, cwhere)
                # Ray writes its session, sockets and logs under /tmp: with a read-only root it must be a volume.
                tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{cwhere}: /tmp is not a writable emptyDir"
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert (env.get("XDG_CACHE_HOME") or "").startswith("/tmp/"), \
                    f"{cwhere}: caches default to the read-only home directory"
        if cluster is not None and cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions") or {}
            head_context = cluster["headGroupSpec"]["template"]["spec"].get("securityContext") or {}
            _check_container_security(options.get("securityContext"), head_context, f"{path.name}/autoscaler")
            assert "/tmp" in {m["mountPath"] for m in options.get("volumeMounts", [])}, \
                f"{path.name}/autoscaler: /tmp is not writable"


# A strict subset of networking.k8s.io/v1 NetworkPolicy (the fields these policies may use); an unknown or
# misspelt field fails here as it would fail `kubectl apply`.
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_PEER = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "podSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR,
        "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"],
                    "properties": {"cidr": {"type": "string"},
                                   "except": {"type": "array", "items": {"type": "string"}}}},
    },
}
_PORTS = {"type": "array", "items": {
    "type": "object", "additionalProperties": False,
    "properties": {"protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]},
                   "endPort": {"type": "integer"}}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["podSelector", "policyTypes"],
            "properties": {
                "podSelector": _LABEL_SELECTOR,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                       "properties": {"from": {"type": "array", "items": _PEER},
                                                                      "ports": _PORTS}}},
                "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                      "properties": {"to": {"type": "array", "items": _PEER},
                                                                     "ports": _PORTS}}},
            },
        },
    },
}


def _network_policies() -> list[dict]:
    path = CLUSTER / "network-policies.yaml"
    assert path.exists(), "cluster/network-policies.yaml is missing"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        jsonschema.validate(doc, NETWORK_POLICY_SCHEMA)
        assert doc["metadata"]["namespace"] == "${tf:ray_namespace}", doc["metadata"]["name"]
    return docs


def _selected_roles(selector: dict) -> set[str]:
    """Roles a pod selector matches; "*" for every pod, "label:k=v" for a selector on another label."""
    roles: set[str] = set()
    labels = dict(selector.get("matchLabels") or {})
    if "llm-platform/role" in labels:
        roles.add(labels.pop("llm-platform/role"))
    roles |= {f"label:{k}={v}" for k, v in labels.items()}
    for expression in selector.get("matchExpressions") or []:
        assert expression["key"] == "llm-platform/role" and expression["operator"] == "In", expression
        roles |= set(expression["values"])
    return roles or {"*"}


def _peers(peer: dict) -> set[str]:
    if "ipBlock" in peer:
        return {f"ip:{peer['ipBlock']['cidr']}"}
    if "namespaceSelector" in peer:  # pods of other namespaces: outside the Ray namespace's roles
        return {"namespace:" + ",".join(f"{k}={v}" for k, v in
                                       sorted(peer["namespaceSelector"].get("matchLabels", {}).items()))}
    return _selected_roles(peer["podSelector"])


def test_every_pod_role_has_a_network_policy_behind_a_default_deny():
    policies = _network_policies()
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1, "one default-deny policy for the whole namespace"
    assert sorted(deny[0]["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress"), "the default deny allows nothing"
    by_role: dict[str, dict] = {}
    for policy in policies:
        if policy is deny[0]:
            continue
        (role,) = _selected_roles(policy["spec"]["podSelector"])
        assert role not in by_role, f"two policies select {role}"
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"], f"{role}: both directions"
        by_role[role] = policy
    assert set(by_role) == TRAINING_ROLES | SERVING_ROLES, sorted(by_role)
    # Every role used by a manifest has its policy (test_each_pod_role_has_its_own_service_account checks the
    # labels), and no policy is left for a role nothing uses.
    used = {role for _, doc in _all_manifests() for _, role, _ in _pod_templates(doc)}
    assert used == set(by_role)


def test_network_policies_isolate_training_from_serving_and_keep_imds_out():
    import hcl2

    with open(REPO / "terraform" / "addons.tf") as f:
        releases = [r for r in hcl2.load(f)["resource"] if '"helm_release"' in r]
    operator_ns = next(body['"kuberay_operator"']["namespace"].strip('"') for r in releases
                       for body in [r['"helm_release"']] if '"kuberay_operator"' in body)
    operator_peer = f"namespace:kubernetes.io/metadata.name={operator_ns}"
    dns_peer = "namespace:kubernetes.io/metadata.name=kube-system"
    for policy in _network_policies():
        spec = policy["spec"]
        if spec["podSelector"] == {}:
            continue
        (role,) = _selected_roles(spec["podSelector"])
        own = SERVING_ROLES if role in SERVING_ROLES else TRAINING_ROLES - {"job-submitter"}
        other = TRAINING_ROLES if role in SERVING_ROLES else SERVING_ROLES
        for rule in spec.get("ingress", []):
            peers = set().union(*(_peers(p) for p in rule.get("from", [{"podSelector": {}}])))
            assert "*" not in peers and not peers & other, f"{role} admits {sorted(peers)}"
            outside = peers - own
            # Anyone from outside the pod's own Ray cluster gets named ports only (Jobs API, Serve), never all.
            assert not outside or rule.get("ports"), f"{role}: {sorted(outside)} may reach every port"
            for peer in outside:
                # The monitoring namespace's Prometheus: its rule is checked in tests/unit/test_monitoring.py.
                assert peer in {"job-submitter", operator_peer, "label:llm-platform/serve-client=true",
                                "namespace:llm-platform/serve-ingress=true",
                                "namespace:kubernetes.io/metadata.name=monitoring"}, f"{role} admits {peer}"
        for rule in spec.get("egress", []):
            peers = set().union(*(_peers(p) for p in rule.get("to", [{"podSelector": {}}])))
            assert "*" not in peers and not peers & other, f"{role} may reach {sorted(peers)}"
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block:
                    # The node's instance role stays out of reach: pods get AWS credentials through IRSA only.
                    assert "169.254.169.254/32" in block.get("except", []), f"{role}: IMDS reachable"
                    assert {p.get("port") for p in rule.get("ports", [])} == {443}, f"{role}: {block} beyond HTTPS"
            if dns_peer in peers:
                assert {p["port"] for p in rule["ports"]} == {53}
    roles = {_selected_roles(p["spec"]["podSelector"]).pop(): p["spec"] for p in _network_policies()
             if p["spec"]["podSelector"] != {}}
    assert not roles["job-submitter"].get("ingress"), "nothing connects to a job submitter"
    assert not roles["ray-worker"].get("ingress", [{}])[0].get("ports"), "Ray workers talk on many ports"


def test_ray_service_reads_api_keys_from_a_mounted_secret():
    doc = yaml.safe_load((CLUSTER / "ray-service.serve.yaml").read_text())
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    key_file = app["args"].get("auth", {}).get("api_key_file")
    assert key_file and key_file.startswith("/"), "serve.auth.api_key_file must point at the mounted Secret"
    assert "api_keys" not in json.dumps(app["args"]).replace("api_key_file", ""), "no keys in args"
    folder, name = posixpath.split(key_file)
    secrets = set()
    for group, role, template in _pod_templates(doc):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            where = f"{group}/{container['name']}"
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
            if role == "serve-head":
                # Replicas read the keys; the head offers no CPU for a replica to land on.
                assert _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
                assert not mounts, f"{where} needs no API keys"
                continue
            assert len(mounts) == 1 and mounts[0].get("readOnly") is True, f"{where}: keys not mounted read-only"
            secret = volumes[mounts[0]["name"]].get("secret")
            assert secret, f"{where}: {folder} is not a Secret volume"
            # Not optional: a missing Secret keeps the pod from starting instead of serving without keys.
            assert secret.get("optional") is not True, f"{where}: the keys' Secret is optional"
            files = [i["path"] for i in secret.get("items", [])] or [name]
            assert name in files, f"{where}: the Secret puts no file at {key_file}"
            assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{where}: the key file is world-readable"
            secrets.add(secret["secretName"])
    assert len(secrets) == 1, secrets


# A name with a word such as KEY or TOKEN (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN; not TOKENIZERS_PARALLELISM).
_SECRET_NAME = re.compile(r"(^|_)(KEYS?|TOKENS?|PASSWORD|PASSWD|SECRETS?|CREDENTIALS?)(_|$)", re.I)


def test_secrets_reach_pods_only_from_kubernetes_secrets():
    for path, doc in _all_manifests():
        for group, role, template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                where = f"{path.name}/{group}/{container['name']}"
                for env in container.get("env", []):
                    if _SECRET_NAME.search(env["name"]):
                        assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} has a literal value"
                for source in container.get("envFrom", []):
                    assert set(source) == {"secretRef"}, f"{where}: envFrom other than a Secret"
                if role in {"ray-head", "ray-worker"}:
                    # Tracking credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN...) for the driver and the rank-0
                    # worker: from a Secret on the pods, never forwarded through a Ray runtime env.
                    refs = [s["secretRef"] for s in container.get("envFrom", [])]
                    assert any(r["name"] == "llm-platform-tracking" for r in refs), f"{where}: no tracking Secret"
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}
        leaked = [k for k in runtime_env.get("env_vars", {}) if _SECRET_NAME.search(k)]
        assert not leaked, f"{path.name}: runtime env carries {leaked} (Ray logs runtime envs in plain text)"

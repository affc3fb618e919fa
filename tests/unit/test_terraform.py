"""Static checks of terraform/: every file parses and is laid out as `terraform fmt` would lay it out, variables are
typed and validated, the least-privilege rules of the deployment hold (a read-only serving role, API tokens only where
needed, access logging, network-policy enforcement, on-demand serving nodes), secrets and state stay out of git, and
checkov finds nothing.

There is no terraform binary or cloud here, so this is as far as the module can be checked before `apply`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest
import yaml
from fixtures.fake_secrets import git_ignored

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "terraform"
CHECKOV = REPO / ".venv-checks" / "bin" / "checkov"


def _unquote(key: str) -> str:
    # python-hcl2 >= 7 keeps the quotes of block labels ('"region"').
    return key.strip('"')


def _clean(value):
    """Drop python-hcl2's bookkeeping keys (`__is_block__`, `__comments__`) and the quotes around strings."""
    if isinstance(value, dict):
        return {_unquote(k): _clean(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _load(path: Path) -> dict:
    with open(path) as f:
        return _clean(hcl2.load(f))


def _tf_files() -> list[Path]:
    return sorted(TF.rglob("*.tf"))


def _blocks(kind: str) -> dict[str, dict]:
    """All top-level blocks of one kind (variable, output, ...) across the module, by label."""
    found: dict[str, dict] = {}
    for path in _tf_files():
        for block in _load(path).get(kind, []):
            found.update(block)
    return found


def _typed(kind: str, type_name: str) -> dict[str, dict]:
    """Resources (kind="resource") or data sources (kind="data") of one type, by name."""
    found: dict[str, dict] = {}
    for path in _tf_files():
        for block in _load(path).get(kind, []):
            found.update(block.get(type_name, {}))
    return found


def _locals() -> dict:
    merged: dict = {}
    for path in _tf_files():
        for block in _load(path).get("locals", []):
            merged.update(block)
    return merged


def _statements(policy_document: dict) -> list[dict]:
    return policy_document.get("statement", [])


def test_every_terraform_file_parses():
    files = _tf_files() + sorted(TF.rglob("*.tf.example")) + sorted(TF.rglob("*.tfvars"))
    assert len(_tf_files()) >= 8, "the module lost files"
    for path in files:
        data = _load(path)
        assert data, f"{path.relative_to(REPO)} parsed to nothing"


def test_providers_and_charts_are_pinned():
    terraform_blocks = [b for p in _tf_files() for b in _load(p).get("terraform", [])]
    required = [rp for b in terraform_blocks for rp in b.get("required_providers", [])]
    assert required, "versions.tf must declare required_providers"
    for providers in required:
        for name, spec in providers.items():
            assert spec.get("version"), f"provider {name} has no version constraint"
            assert spec.get("source"), f"provider {name} has no source"
    assert any(b.get("required_version") for b in terraform_blocks), "no required_version for terraform itself"
    modules = _blocks("module")
    for name, body in modules.items():
        assert body.get("version") or "?ref=" in str(body.get("source")), f"module {name} is not pinned"
    releases = [body for p in _tf_files() for r in _load(p).get("resource", [])
                for kind, named in r.items() if kind == "helm_release" for body in named.values()]
    assert len(releases) == 4, ("expected the KubeRay operator, the NVIDIA device plugin, the cluster autoscaler and "
                                "kube-prometheus-stack (monitoring.tf)")
    for body in releases:
        assert body.get("version"), f"helm_release {body.get('name')} has no pinned chart version"


def test_variables_have_descriptions_types_and_validation():
    variables = _blocks("variable")
    assert {"region", "gpu_node_groups", "cpu_node_group", "bucket_name", "api_allowed_cidrs"} <= set(variables)
    for name, body in variables.items():
        assert body.get("description"), f"variable {name} has no description"
        assert body.get("type"), f"variable {name} has no type"
        free_form = body["type"] in ("bool", "${map(string)}", "map(string)")
        if not free_form:
            assert body.get("validation"), f"variable {name} has no validation block"


def _tfvars(name: str) -> dict:
    return _load(TF / "examples" / name)


@pytest.mark.parametrize("example", ["small.tfvars", "large.tfvars"])
def test_example_tfvars_use_declared_variables_and_valid_gpu_groups(example):
    variables = _blocks("variable")
    values = _tfvars(example)
    unknown = set(values) - set(variables)
    assert not unknown, f"{example} sets undeclared variables: {sorted(unknown)}"
    groups = values["gpu_node_groups"]
    assert groups, f"{example} defines no GPU node group"
    for group_name, g in groups.items():
        assert re.fullmatch(r"[a-z][a-z0-9-]{1,30}", group_name), f"{example}: bad group name {group_name}"
        assert 0 <= g["min_size"] <= g["desired_size"] <= g["max_size"], f"{example}: {group_name} sizes"
        assert g["min_size"] == 0, f"{example}: {group_name} should scale to zero"
        assert g["capacity_type"] in ("ON_DEMAND", "SPOT"), f"{example}: {group_name} capacity_type"
        assert g["gpus_per_node"] >= 1
    for cidr in values.get("api_allowed_cidrs", []):
        assert cidr != "0.0.0.0/0", f"{example} opens the Kubernetes API to the internet"


def test_no_static_credentials_anywhere():
    pattern = re.compile(r"\b(access_key|secret_key|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AKIA[0-9A-Z]{16})\b")
    for path in list(TF.rglob("*.tf")) + list(TF.rglob("*.tfvars")) + list(TF.rglob("*.example")):
        text = path.read_text()
        assert not pattern.search(text), f"{path.relative_to(REPO)} mentions a static credential"


def _checkov() -> str | None:
    if CHECKOV.exists():
        return str(CHECKOV)
    return shutil.which("checkov")


def test_checkov_finds_no_failed_checks():
    exe = _checkov()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("checkov is not installed: run `make setup-checks` (CI must run this check)")
        pytest.skip("checkov not installed (make setup-checks); CI runs it")
    # --skip-download: no calls to the Prisma Cloud API (offline, and nothing leaves the machine).
    proc = subprocess.run(
        [exe, "-d", str(TF), "--framework", "terraform", "--quiet", "--compact", "--skip-download",
         "--output", "json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.stdout.strip(), f"checkov printed nothing (rc={proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    summaries = [r["summary"] for r in reports]
    assert sum(s["passed"] for s in summaries) > 100, f"checkov checked too little: {summaries}"
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']})"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Every skip is inline with its reason (`#checkov:skip=ID:reason`), never a CLI-wide --skip-check.
    for r in reports:
        for c in r.get("results", {}).get("skipped_checks", []):
            assert len((c.get("check_result") or {}).get("suppress_comment", "")) > 20, f"skip without reason: {c}"


# --- `terraform fmt -check` without the terraform binary -------------------------------------------------------------
# A re-implementation of the layout rules of hclwrite's formatter (hashicorp/hcl, hclwrite/format.go), which
# `terraform fmt` applies: formatIndent (two spaces per line that opens brackets, popped by the line that closes
# them), formatCells (the `=` of consecutive single-line attributes aligned one space past the longest name; trailing
# comments of consecutive lines aligned one space past the longest code) and the parts of formatSpaces that are
# unambiguous from characters alone.

def _skip_string(line: str, i: int) -> int:
    """Index just past the quoted string starting at line[i] (a `"`); interpolations inside are skipped whole."""
    i += 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
        elif line[i] == '"':
            return i + 1
        elif line.startswith(("$${", "%%{"), i):  # escaped: literal text, not a template sequence
            i += 3
        elif line.startswith(("${", "%{"), i):
            i = _skip_template(line, i + 2)
        else:
            i += 1
    raise ValueError("a quoted string does not end on its line")


def _skip_template(line: str, i: int) -> int:
    depth = 0
    while i < len(line):
        c = line[i]
        if c == '"':
            i = _skip_string(line, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return i + 1
            depth -= 1
        i += 1
    raise ValueError("a template interpolation does not end on its line")


def _scan_hcl_line(line: str) -> dict:
    """One source line as hclwrite's formatter sees it: net bracket change, the assignment `=` (only when what follows
    it closes on the line, as in hclwrite), where a trailing comment starts, and the code with string contents
    masked out (so spacing rules never look inside strings)."""
    start = len(line) - len(line.lstrip(" "))
    masked = list(line)
    changes: list[tuple[int, int]] = []
    eq = comment = heredoc = None
    block_comment = False
    i = start
    while i < len(line):
        c = line[i]
        if c == '"':
            end = _skip_string(line, i)
            masked[i + 1:end - 1] = "x" * (end - i - 2)
            i = end
            continue
        if c == "#" or line.startswith("//", i):
            comment = i
            break
        if line.startswith("/*", i):
            close = line.find("*/", i + 2)
            if close < 0:
                comment, block_comment = i, True
                break
            masked[i:close + 2] = "x" * (close + 2 - i)
            i = close + 2
            continue
        opener = re.match(r"<<-?([A-Za-z_][\w-]*)\s*$", line[i:])
        if opener:  # hclwrite stops counting brackets at a heredoc opener; its body is left as written
            heredoc = opener.group(1)
            break
        if c in "([{":
            changes.append((i, 1))
        elif c in ")]}":
            changes.append((i, -1))
        elif (c == "=" and eq is None and i > start and line[i - 1] not in "=!<>"
              and line[i + 1:i + 2] not in ("=", ">")):
            eq = i
        i += 1
    code_end = comment if comment is not None else len(line)
    code = "".join(masked[:code_end]).rstrip()
    if eq is not None and sum(d for pos, d in changes if pos > eq) != 0:
        eq = None  # `name = {` opens a multi-line value: not an aligned attribute line
    return {"indent": start, "net": sum(d for _, d in changes), "eq": eq, "code": code,
            "comment": comment if comment is not None and code.strip() else None,
            "heredoc": heredoc, "block_comment": block_comment}


def _aligned(chain: list[tuple[int, int, int]], what: str) -> list[str]:
    """(line number, end of what comes before, column of the aligned token) in one chain -> problems."""
    want = max(before for _, before, _ in chain) + 1
    return [f"line {n}: {what} at column {col + 1}, terraform fmt puts it at column {want + 1}"
            for n, _, col in chain if col != want]


def _fmt_problems(text: str) -> list[str]:
    """What `terraform fmt` would change in `text`, for the rules checked here (see the test's docstring)."""
    problems: list[str] = []
    lines = text.split("\n")
    indents: list[int] = []  # hclwrite's indent stack: brackets opened by each still-open line
    assign_chain: list[tuple[int, int, int]] = []
    comment_chain: list[tuple[int, int, int]] = []
    heredoc = None
    in_block_comment = False
    for n, line in enumerate(lines, 1):
        if "\t" in line or "\r" in line:
            problems.append(f"line {n}: tab or carriage return")
        if line != line.rstrip():
            problems.append(f"line {n}: trailing whitespace")
        if heredoc is not None or in_block_comment:  # bodies are left alone by the formatter
            if heredoc is not None and line.strip() == heredoc:
                heredoc = None
            if in_block_comment and "*/" in line:
                in_block_comment = False
            continue
        scanned = _scan_hcl_line(line) if line.strip() else None
        # A line without an aligned attribute (or without a trailing comment) ends the chain before it.
        if scanned is None or scanned["eq"] is None:
            problems += _aligned(assign_chain, "`=`") if assign_chain else []
            assign_chain = []
        if scanned is None or scanned["comment"] is None:
            problems += _aligned(comment_chain, "trailing comment") if comment_chain else []
            comment_chain = []
        if scanned is None:
            continue
        heredoc, in_block_comment = scanned["heredoc"], scanned["block_comment"]
        net = scanned["net"]
        if net > 0:
            want = 2 * len(indents)
            indents.append(net)
        else:
            closed = -net
            while closed > 0 and indents:
                if closed >= indents[-1]:
                    closed -= indents.pop()
                else:
                    indents[-1] -= closed
                    closed = 0
            want = 2 * len(indents)
        if scanned["indent"] != want:
            problems.append(f"line {n}: indented {scanned['indent']} spaces, terraform fmt uses {want}")
        code, eq = scanned["code"], scanned["eq"]
        if eq is not None:
            assign_chain.append((n, len(line[:eq].rstrip()), eq))
            if not re.match(r"= \S", code[eq:]) and code[eq:] != "=":
                problems.append(f"line {n}: not exactly one space after `=`")
        if scanned["comment"] is not None:
            comment_chain.append((n, len(code), scanned["comment"]))
        # Spacing inside the code (strings masked): runs of spaces exist only to align `=` and comments.
        body = code[scanned["indent"]:]
        offset = scanned["indent"]
        for run in re.finditer(r"(?<=\S)  +(?=\S)", body):
            if eq is None or offset + run.end() != eq:
                problems.append(f"line {n}: {len(run.group())} spaces inside an expression")
        for pattern, rule in ((r"[(\[] +\S", "space after an opening ( or ["),
                              (r"[^\s,] +[)\]]", "space before a closing ) or ]"),
                              (r" +,", "space before a comma"),
                              (r"\{[^\s}]", "no space after {"), (r"[^\s{]\}", "no space before }")):
            if re.search(pattern, body):
                problems.append(f"line {n}: {rule}")
    problems += _aligned(assign_chain, "`=`") if assign_chain else []
    problems += _aligned(comment_chain, "trailing comment") if comment_chain else []
    return problems


def test_fmt_checker_catches_what_terraform_fmt_rewrites():
    """The checker itself, on snippets whose `terraform fmt` output is known (hclwrite's rules)."""
    formatted = (
        'resource "x" "y" {\n'
        '  name    = "a"\n'
        '  version = "1"         # pinned\n'
        '  tags    = { a = "b" } # one line\n'
        '\n'
        '  values = [yamlencode({\n'
        '    a = 1\n'
        '  })]\n'
        '  condition = alltrue([for c in var.x :\n'
        '    c != "0.0.0.0/0" && c >= 1\n'
        '  ])\n'
        '}\n'
    )
    assert _fmt_problems(formatted) == []
    broken = {
        "misaligned =": formatted.replace('  name    = "a"', '  name = "a"'),
        "over-aligned =": formatted.replace("  version =", "  version  =").replace("  name    =", "  name     =")
                                   .replace("  tags    =", "  tags     ="),
        "indent": formatted.replace('    a = 1', '      a = 1'),
        "trailing space": formatted.replace("})]\n", "})] \n"),
        "spaces in expression": formatted.replace("c >= 1", "c >=  1"),
        "space after (": formatted.replace("alltrue([for", "alltrue( [for"),
        "comment alignment": formatted.replace('"1"         # pinned', '"1" # pinned'),
        "brace spacing": formatted.replace('{ a = "b" }', '{a = "b"}'),
    }
    for name, text in broken.items():
        assert _fmt_problems(text), f"the checker missed: {name}"
    # Strings and comments are not code: their spaces and brackets are left alone.
    assert _fmt_problems('x = "a  (b] }" # comment  with [ spaces\n') == []


def test_terraform_files_are_formatted():
    """`terraform fmt -check -recursive`, as far as it can be checked without the binary.

    Checked (hclwrite's rules): two-space indentation by bracket nesting, `=` of consecutive single-line attributes
    aligned one space past the longest name, trailing comments of consecutive lines aligned, exactly one space after
    `=`, no run of spaces inside an expression, no space after `(`/`[` or before `)`/`]`/`,`, spaces inside `{ }`,
    no trailing whitespace (stricter than fmt inside comments), no tabs or CRs.
    Not checked: other spacing between tokens (`a+b`, `!x`, `- 1`), what terraform fmt rewrites beyond layout
    (interpolation-only strings such as "${var.x}", quoted legacy types), heredoc bodies and /* */ comments, and the
    final newline. CI machines with terraform should run `terraform fmt -check -recursive terraform` as well.
    """
    files = _tf_files() + sorted(TF.rglob("*.tfvars"))
    problems = [f"{path.relative_to(REPO)} {p}" for path in files for p in _fmt_problems(path.read_text())]
    assert not problems, "not formatted as terraform fmt would:\n" + "\n".join(problems)


# --- least privilege and secrets -------------------------------------------------------------------------------------

def test_api_allowed_cidrs_refuses_prefixes_shorter_than_8():
    (validation,) = _blocks("variable")["api_allowed_cidrs"]["validation"]
    condition = validation["condition"]
    # The prefix length of each entry compared with 8, not just an exception for 0.0.0.0/0.
    assert re.search(r'tonumber\(split\("/",\s*c\)\[1\]\)\s*>=\s*8\b', condition), condition
    assert "can(cidrnetmask(c))" in condition, "entries must still be valid IPv4 CIDRs"
    assert "/8" in validation["error_message"]
    for example in ("small.tfvars", "large.tfvars"):
        for cidr in _tfvars(example).get("api_allowed_cidrs", []):
            assert ipaddress.ip_network(cidr).prefixlen >= 8, f"{example}: {cidr} is too wide"


def _serving_gpu_groups() -> set[str]:
    """GPU groups that a RayService manifest schedules replicas on."""
    groups = set()
    for path in sorted((REPO / "cluster").glob("ray-service.*.yaml")):
        cluster = yaml.safe_load(path.read_text())["spec"]["rayClusterConfig"]
        for group in cluster.get("workerGroupSpecs", []):
            selector = group["template"]["spec"].get("nodeSelector", {})
            if "llm-platform/gpu-group" in selector:
                groups.add(selector["llm-platform/gpu-group"])
    return groups


def test_serving_node_groups_are_on_demand():
    variable = _blocks("variable")["gpu_node_groups"]
    assert "serving" in variable["type"], "gpu_node_groups entries need a `serving` flag"
    conditions = [v["condition"] for v in variable["validation"]]
    assert any("g.serving" in c and '"ON_DEMAND"' in c for c in conditions), \
        "terraform must refuse a serving group that is not ON_DEMAND"
    serving_groups = _serving_gpu_groups()
    assert serving_groups, "no RayService manifest selects a GPU group"
    defaults = variable["default"]
    for source, groups in [("variables.tf default", defaults)] + [(e, _tfvars(e)["gpu_node_groups"])
                                                                  for e in ("small.tfvars", "large.tfvars")]:
        assert any(g.get("serving") for g in groups.values()), f"{source}: no group is marked serving"
        for name, g in groups.items():
            if name in serving_groups:
                assert g.get("serving"), f"{source}: {name} runs the RayService but is not marked serving"
            if g.get("serving"):
                assert g["capacity_type"] == "ON_DEMAND", f"{source}: serving group {name} is {g['capacity_type']}"


def test_service_accounts_mount_an_api_token_only_for_heads():
    accounts = _locals()["ray_service_accounts"]
    assert set(accounts) == {"head", "worker", "serve-head", "serve-worker"}
    assert len({a["name"] for a in accounts.values()}) == 4, "each role needs its own service account"
    for key, account in accounts.items():
        # Heads: KubeRay binds its autoscaler Role to the head's account, and the sidecar uses the token.
        assert account["api_token"] is key.endswith("head"), f"{key}: api_token"
        assert account["iam_role"] == ("serve" if key.startswith("serve") else "train"), f"{key}: iam_role"
    (sa,) = _typed("resource", "kubernetes_service_account_v1").values()
    assert sa["for_each"] == "${local.ray_service_accounts}"
    assert sa["automount_service_account_token"] == "${each.value.api_token}"
    (metadata,) = sa["metadata"]
    role_arn = metadata["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r'\$\{each\.value\.iam_role == "serve" \? aws_iam_role\.serve\.arn : aws_iam_role\.ray\.arn\}',
                        role_arn), role_arn


def _assumed_by(document: dict) -> list[str]:
    (statement,) = _statements(document)
    return [c["values"] for c in statement["condition"] if c["variable"].endswith(":sub")]


def test_serving_role_is_separate_and_read_only():
    roles = _typed("resource", "aws_iam_role")
    assert {"ray", "serve"} <= set(roles), "separate IAM roles for training and serving"
    documents = _typed("data", "aws_iam_policy_document")
    assert roles["serve"]["assume_role_policy"] == "${data.aws_iam_policy_document.serve_assume.json}"
    assert roles["ray"]["assume_role_policy"] == "${data.aws_iam_policy_document.ray_assume.json}"
    # Each role trusts only the service accounts of its own iam_role (the subjects local filters on it).
    assert _assumed_by(documents["serve_assume"]) == ['${local.ray_service_account_subjects["serve"]}']
    assert _assumed_by(documents["ray_assume"]) == ['${local.ray_service_account_subjects["train"]}']
    subjects = _locals()["ray_service_account_subjects"]
    assert "if sa.iam_role == role" in subjects and "system:serviceaccount:" in subjects, subjects
    # What the serving role may do: list and read registry/ and dataset manifests, decrypt through S3. No writes.
    attachments = [a for a in _typed("resource", "aws_iam_role_policy_attachment").values()
                   if a["role"] == "${aws_iam_role.serve.name}"]
    assert [a["policy_arn"] for a in attachments] == ["${aws_iam_policy.serve_read.arn}"]
    inline = [p for p in _typed("resource", "aws_iam_role_policy").values() if "aws_iam_role.serve." in p["role"]]
    assert not inline, "the serving role must have no other policy"
    assert _typed("resource", "aws_iam_policy")["serve_read"]["policy"] == \
        "${data.aws_iam_policy_document.serve_read.json}"
    statements = _statements(documents["serve_read"])
    actions = {a for s in statements for a in s["actions"]}
    assert actions <= {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "kms:Decrypt"}, actions
    for s in statements:
        assert s.get("effect", "Allow") == "Allow"
        if "s3:GetObject" in s["actions"]:
            assert sorted(s["resources"]) == sorted([
                "${aws_s3_bucket.artifacts.arn}/${local.prefix}/registry/*",
                "${aws_s3_bucket.artifacts.arn}/${local.prefix}/datasets/*/manifest.json"]), s["resources"]
        if "s3:ListBucket" in s["actions"]:
            (prefix_condition,) = [c for c in s.get("condition", []) if c["variable"] == "s3:prefix"]
            assert sorted(prefix_condition["values"]) == ["${local.prefix}/datasets/*", "${local.prefix}/registry/*"]
        if "kms:Decrypt" in s["actions"]:
            assert any(c["variable"] == "kms:ViaService" for c in s["condition"])


def test_artifact_bucket_access_is_logged():
    buckets = _typed("resource", "aws_s3_bucket")
    (logging,) = _typed("resource", "aws_s3_bucket_logging").values()
    assert logging["bucket"] == "${aws_s3_bucket.artifacts.id}"
    target = re.fullmatch(r"\$\{aws_s3_bucket\.(\w+)\.id\}", logging["target_bucket"]).group(1)
    assert target in buckets and target != "artifacts", "access logs go to a separate bucket of this stack"
    ref = f"${{aws_s3_bucket.{target}.id}}"
    (block,) = [b for b in _typed("resource", "aws_s3_bucket_public_access_block").values() if b["bucket"] == ref]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                            "restrict_public_buckets"))
    (lifecycle,) = [b for b in _typed("resource", "aws_s3_bucket_lifecycle_configuration").values()
                    if b["bucket"] == ref]
    assert any(r.get("expiration") for r in lifecycle["rule"]), "access logs need a retention"
    (policy,) = [b for b in _typed("resource", "aws_s3_bucket_policy").values() if b["bucket"] == ref]
    document = _typed("data", "aws_iam_policy_document")[policy["policy"].split(".")[2]]
    assert any(s.get("effect") == "Deny" and any(c["variable"] == "aws:SecureTransport" for c in s["condition"])
               for s in _statements(document)), "the log bucket must refuse plain HTTP"
    # The claim that access logging is handled elsewhere is gone from the artifact bucket's skips.
    s3_text = (TF / "s3.tf").read_text()
    assert "checkov:skip=CKV_AWS_18" not in s3_text, "the artifact bucket now has access logs: drop the skip"


def test_network_policies_are_enforced_by_the_vpc_cni():
    addon = _typed("resource", "aws_eks_addon")["this"]
    config = addon.get("configuration_values", "")
    # EKS accepts NetworkPolicy objects without this and enforces none of them.
    assert re.search(r'each\.key == "vpc-cni" \? jsonencode\(\{\s*enableNetworkPolicy = "true"\s*\}\)', config), config


def test_gitignore_keeps_state_and_secrets_out_and_the_lock_file_in(tmp_path):
    must_ignore = ["terraform/terraform.tfstate", "terraform/terraform.tfstate.backup",
                   "terraform/.terraform.tfstate.lock.info", "terraform/my.tfvars", "terraform/prod.auto.tfvars",
                   "terraform/prod.tfvars.json", "terraform/tfplan", "terraform/plan.tfplan", ".env", ".env.local",
                   "terraform/.terraform/providers/x"]
    must_keep = ["terraform/.terraform.lock.hcl", "terraform/examples/small.tfvars",
                 "terraform/examples/large.tfvars", "terraform/my.tfvars.example", ".env.example"]
    ignored = git_ignored(REPO, tmp_path / "gitignore-check", must_ignore + must_keep)
    assert not set(must_ignore) - ignored, f"not ignored: {sorted(set(must_ignore) - ignored)}"
    assert not set(must_keep) & ignored, f"ignored but must be committable: {sorted(set(must_keep) & ignored)}"
    # The lock-file policy is written down where operators look.
    docs = (REPO / "docs" / "cloud.md").read_text()
    assert ".terraform.lock.hcl" in docs and "terraform providers lock" in docs, \
        "docs/cloud.md must state the .terraform.lock.hcl policy"

# The non-Kubernetes path: `ray up cluster/ray-cluster.aws.yaml` launches EC2 VMs into this VPC's private subnets.
# Terraform creates what Ray would otherwise create with broad defaults: a security group open only inside itself,
# a worker instance profile with bucket access only, and a head instance profile that may additionally launch and
# stop instances tagged with this Ray cluster's name and pass the worker role.

locals {
  ray_up_count = var.enable_ray_up_iam ? 1 : 0
}

resource "aws_security_group" "ray_up" {
  #checkov:skip=CKV2_AWS_5:Attached outside Terraform: ray up puts it on the VMs it launches (cluster/ray-cluster.aws.yaml, SecurityGroupIds).
  count = local.ray_up_count

  name        = "${var.name}-ray-up"
  description = "Ray nodes launched by ray up: traffic between members, SSH from inside the VPC"
  vpc_id      = aws_vpc.this.id

  ingress {
    description = "Ray traffic between cluster members (GCS, object store, workers)"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }

  ingress {
    description = "SSH from inside the VPC only, for the ray up launcher and the head"
    from_port   = 22
    to_port     = 22
    protocol    = "tcp"
    cidr_blocks = [var.vpc_cidr]
  }

  egress {
    description = "Ray traffic between cluster members"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }

  egress {
    description = "HTTPS through the NAT gateway (images, packages, AWS APIs) and to the S3 endpoint"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  egress {
    description = "HTTP for OS package mirrors"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# Workers: the bucket, nothing else.
resource "aws_iam_role" "ray_up_worker" {
  count = local.ray_up_count

  name               = "${var.name}-ray-up-worker"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
}

resource "aws_iam_role_policy_attachment" "ray_up_worker_bucket" {
  count = local.ray_up_count

  role       = aws_iam_role.ray_up_worker[0].name
  policy_arn = aws_iam_policy.bucket_access.arn
}

# Both pull the runtime image from this deployment's ECR repository.
resource "aws_iam_role_policy_attachment" "ray_up_ecr" {
  for_each = var.enable_ray_up_iam ? toset(["head", "worker"]) : toset([])

  role       = each.key == "head" ? aws_iam_role.ray_up_head[0].name : aws_iam_role.ray_up_worker[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly"
}

resource "aws_iam_instance_profile" "ray_up_worker" {
  count = local.ray_up_count

  name = "${var.name}-ray-up-worker"
  role = aws_iam_role.ray_up_worker[0].name
}

# Head: the bucket, plus the EC2 calls of Ray's autoscaler, limited to instances tagged ray-cluster-name=<name>.
resource "aws_iam_role" "ray_up_head" {
  count = local.ray_up_count

  name               = "${var.name}-ray-up-head"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
}

resource "aws_iam_role_policy_attachment" "ray_up_head_bucket" {
  count = local.ray_up_count

  role       = aws_iam_role.ray_up_head[0].name
  policy_arn = aws_iam_policy.bucket_access.arn
}

locals {
  ec2_arn = "arn:${local.partition}:ec2:${var.region}:${local.account_id}"
}

data "aws_iam_policy_document" "ray_up_head" {
  count = local.ray_up_count

  # Describe calls do not support resource-level permissions.
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
    ]
    resources = ["*"]
  }

  # Ray tags the instances it launches (TagSpecifications) with ray-cluster-name; the volumes and network
  # interfaces that RunInstances creates with them carry no tags in the request, so they get no tag condition.
  statement {
    sid       = "LaunchTaggedWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = [var.name]
    }
  }

  statement {
    sid     = "LaunchIntoThisVpc"
    actions = ["ec2:RunInstances"]
    resources = concat(
      [for s in aws_subnet.private : s.arn],
      [for g in aws_security_group.ray_up : g.arn],
      ["arn:${local.partition}:ec2:${var.region}::image/*", "${local.ec2_arn}:key-pair/*"],
      ["${local.ec2_arn}:volume/*", "${local.ec2_arn}:network-interface/*"],
    )
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*", "${local.ec2_arn}:network-interface/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOwnInstances"
    actions   = ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.name]
    }
  }

  statement {
    sid     = "PassWorkerRole"
    actions = ["iam:PassRole", "iam:GetInstanceProfile"]
    resources = concat(
      [for r in aws_iam_role.ray_up_worker : r.arn],
      [for p in aws_iam_instance_profile.ray_up_worker : p.arn],
    )
  }
}

resource "aws_iam_role_policy" "ray_up_head" {
  count = local.ray_up_count

  name   = "ray-autoscaler"
  role   = aws_iam_role.ray_up_head[0].id
  policy = data.aws_iam_policy_document.ray_up_head[0].json
}

resource "aws_iam_instance_profile" "ray_up_head" {
  count = local.ray_up_count

  name = "${var.name}-ray-up-head"
  role = aws_iam_role.ray_up_head[0].name
}

# IAM roles for service accounts (IRSA): pods get short-lived credentials for one role through a projected token.
# There are no static keys anywhere. Two roles for the Ray pods, each trusted by its own service accounts only:
#   training (`ray`): the RayCluster and its jobs (<prefix>-head, <prefix>-worker) read and write the artifacts;
#   serving (`serve`): the RayService (<prefix>-serve-head, <prefix>-serve-worker) reads registry/ and dataset
#     manifests and writes nothing, so a compromised replica cannot overwrite datasets, runs or registry/*/LATEST.
# The cluster autoscaler has its own role.

data "tls_certificate" "oidc" {
  url = aws_eks_cluster.this.identity[0].oidc[0].issuer
}

resource "aws_iam_openid_connect_provider" "eks" {
  url             = aws_eks_cluster.this.identity[0].oidc[0].issuer
  client_id_list  = ["sts.amazonaws.com"]
  thumbprint_list = [data.tls_certificate.oidc.certificates[0].sha1_fingerprint]
}

locals {
  oidc_issuer_host = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")

  # One service account per Ray role. Heads keep a Kubernetes API token: KubeRay binds its autoscaler Role (patch
  # pods and the RayCluster) to the head's account, and the autoscaler sidecar in the head pod uses it. Workers
  # never call the API, so their accounts mount no token (IRSA's own token is projected by EKS regardless).
  ray_service_accounts = {
    head         = { name = "${var.ray_service_account_prefix}-head", iam_role = "train", api_token = true }
    worker       = { name = "${var.ray_service_account_prefix}-worker", iam_role = "train", api_token = false }
    serve-head   = { name = "${var.ray_service_account_prefix}-serve-head", iam_role = "serve", api_token = true }
    serve-worker = { name = "${var.ray_service_account_prefix}-serve-worker", iam_role = "serve", api_token = false }
  }
  ray_service_account_subjects = {
    for role in ["train", "serve"] : role => [
      for sa in values(local.ray_service_accounts) : "system:serviceaccount:${var.ray_namespace}:${sa.name}"
      if sa.iam_role == role
    ]
  }
}

# --- training pods: read and write the artifact bucket, nothing else ----------------------------------------------

data "aws_iam_policy_document" "ray_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer_host}:sub"
      values   = local.ray_service_account_subjects["train"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray" {
  name                 = "${var.name}-ray"
  assume_role_policy   = data.aws_iam_policy_document.ray_assume.json
  max_session_duration = 43200 # 12 h: long training jobs refresh tokens anyway; this bounds a leaked session.
}

# Shared by the IRSA role and the `ray up` instance profiles: list and read/write objects under the storage
# prefix of this one bucket, and use the bucket's KMS key only through S3.
data "aws_iam_policy_document" "bucket_access" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "ReadWriteArtifacts"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.artifacts.arn}/${local.prefix}/*"]
  }

  statement {
    sid       = "UseBucketKeyThroughS3"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.this.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "bucket_access" {
  name        = "${var.name}-bucket-access"
  description = "Read and write llm-platform artifacts in s3://${local.bucket_name}/${local.prefix}/"
  policy      = data.aws_iam_policy_document.bucket_access.json
}

resource "aws_iam_role_policy_attachment" "ray_bucket" {
  role       = aws_iam_role.ray.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

# --- serving pods: read the registry and dataset manifests, write nothing -----------------------------------------

data "aws_iam_policy_document" "serve_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer_host}:sub"
      values   = local.ray_service_account_subjects["serve"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "serve" {
  name               = "${var.name}-serve"
  assume_role_policy = data.aws_iam_policy_document.serve_assume.json
}

# What a replica reads (llm_platform/serve): registry/<model>/LATEST and the version's files, and the manifest of
# the dataset its lineage names (the drift reference). Listing is limited to those two prefixes.
data "aws_iam_policy_document" "serve_read" {
  statement {
    sid       = "ListRegistryAndDatasets"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.artifacts.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.prefix}/registry/*", "${local.prefix}/datasets/*"]
    }
  }

  statement {
    sid       = "LocateBucket"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid     = "ReadRegistryAndDatasetManifests"
    actions = ["s3:GetObject"]
    resources = [
      "${aws_s3_bucket.artifacts.arn}/${local.prefix}/registry/*",
      "${aws_s3_bucket.artifacts.arn}/${local.prefix}/datasets/*/manifest.json",
    ]
  }

  statement {
    sid       = "DecryptThroughS3"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.this.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "serve_read" {
  name        = "${var.name}-serve-read"
  description = "Read llm-platform registry/ and dataset manifests in s3://${local.bucket_name}/${local.prefix}/; no writes"
  policy      = data.aws_iam_policy_document.serve_read.json
}

resource "aws_iam_role_policy_attachment" "serve_read" {
  role       = aws_iam_role.serve.name
  policy_arn = aws_iam_policy.serve_read.arn
}

# --- cluster autoscaler: resize this cluster's node groups only ---------------------------------------------------

data "aws_iam_policy_document" "autoscaler_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer_host}:sub"
      values   = ["system:serviceaccount:kube-system:cluster-autoscaler"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "cluster_autoscaler" {
  name               = "${var.name}-cluster-autoscaler"
  assume_role_policy = data.aws_iam_policy_document.autoscaler_assume.json
}

data "aws_iam_policy_document" "cluster_autoscaler" {
  # Describe calls cannot be scoped to resources (AWS does not support resource-level permissions for them).
  statement {
    sid = "Discover"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "ReadNodeGroups"
    actions   = ["eks:DescribeNodegroup"]
    resources = ["arn:${local.partition}:eks:${var.region}:${local.account_id}:nodegroup/${var.name}/*/*"]
  }

  # Only Auto Scaling groups that EKS tagged as owned by this cluster.
  statement {
    sid = "ResizeOwnGroups"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    resources = ["arn:${local.partition}:autoscaling:${var.region}:${local.account_id}:autoScalingGroup:*:autoScalingGroupName/eks-*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.name}"
      values   = ["owned"]
    }
  }
}

resource "aws_iam_role_policy" "cluster_autoscaler" {
  name   = "resize-node-groups"
  role   = aws_iam_role.cluster_autoscaler.id
  policy = data.aws_iam_policy_document.cluster_autoscaler.json
}

# --- the Ray namespace and service accounts that cluster/*.yaml use -----------------------------------------------

resource "kubernetes_namespace_v1" "ray" {
  metadata {
    name = var.ray_namespace
  }

  depends_on = [aws_eks_node_group.cpu]
}

resource "kubernetes_service_account_v1" "ray" {
  for_each = local.ray_service_accounts

  metadata {
    name      = each.value.name
    namespace = kubernetes_namespace_v1.ray.metadata[0].name
    annotations = {
      "eks.amazonaws.com/role-arn" = each.value.iam_role == "serve" ? aws_iam_role.serve.arn : aws_iam_role.ray.arn
    }
  }

  automount_service_account_token = each.value.api_token
}

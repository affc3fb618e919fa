provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, {
      "project"    = "llm-platform"
      "managed-by" = "terraform"
    })
  }
}

# Kubernetes and Helm talk to the cluster created here. Tokens come from `aws eks get-token` at plan/apply time,
# so no long-lived credential is written to the state or to disk.
locals {
  kube_exec = {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", aws_eks_cluster.this.name, "--region", var.region]
  }
}

provider "kubernetes" {
  host                   = aws_eks_cluster.this.endpoint
  cluster_ca_certificate = base64decode(aws_eks_cluster.this.certificate_authority[0].data)

  exec {
    api_version = local.kube_exec.api_version
    command     = local.kube_exec.command
    args        = local.kube_exec.args
  }
}

provider "helm" {
  kubernetes = {
    host                   = aws_eks_cluster.this.endpoint
    cluster_ca_certificate = base64decode(aws_eks_cluster.this.certificate_authority[0].data)
    exec                   = local.kube_exec
  }
}

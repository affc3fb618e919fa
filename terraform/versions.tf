# Provider and Terraform versions are pinned here and nowhere else. The AWS range admits both the 5.x and the 6.x
# line: every argument used in this module exists with the same meaning in both.
terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.95.0, < 7.0.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.36"
    }
    tls = {
      source  = "hashicorp/tls"
      version = "~> 4.0"
    }
  }

  # State stays local unless a backend is configured: copy examples/backend.tf.example to backend.tf (S3 with
  # native lock files) and run `terraform init -migrate-state`.
}

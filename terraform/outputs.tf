# Names here are used verbatim by cluster/ (as ${tf:<output>} placeholders filled by cluster/render.py), by
# docs/cloud.md, and checked by tests/unit/test_kuberay_manifests.py.

output "region" {
  description = "AWS region of the deployment (AWS_REGION for the Ray pods)."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name (also the Ray cluster name of the ray up path)."
  value       = aws_eks_cluster.this.name
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${aws_eks_cluster.this.name}"
}

output "bucket_name" {
  description = "Artifact bucket (LLM_PLATFORM_BUCKET for conf/storage/s3.yaml)."
  value       = aws_s3_bucket.artifacts.bucket
}

output "storage_root" {
  description = "storage.root of the deployment: s3://<bucket>/<storage_prefix>."
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/${local.prefix}"
}

output "ray_irsa_role_arn" {
  description = "Training IAM role (read/write the artifacts) that the RayCluster's head and worker service accounts assume through IRSA."
  value       = aws_iam_role.ray.arn
}

output "serve_irsa_role_arn" {
  description = "Serving IAM role (read registry/ and dataset manifests only) that the RayService's service accounts assume through IRSA."
  value       = aws_iam_role.serve.arn
}

output "ray_namespace" {
  description = "Kubernetes namespace for RayCluster, RayJob and RayService objects."
  value       = kubernetes_namespace_v1.ray.metadata[0].name
}

output "ray_head_service_account" {
  description = "Service account of the RayCluster head (training role; keeps an API token for KubeRay's autoscaler)."
  value       = kubernetes_service_account_v1.ray["head"].metadata[0].name
}

output "ray_worker_service_account" {
  description = "Service account of the RayCluster workers (training role; no API token)."
  value       = kubernetes_service_account_v1.ray["worker"].metadata[0].name
}

output "serve_head_service_account" {
  description = "Service account of the RayService head (serving role; keeps an API token for KubeRay's autoscaler)."
  value       = kubernetes_service_account_v1.ray["serve-head"].metadata[0].name
}

output "serve_worker_service_account" {
  description = "Service account of the RayService workers (serving role; no API token)."
  value       = kubernetes_service_account_v1.ray["serve-worker"].metadata[0].name
}

output "access_log_bucket_name" {
  description = "Bucket that receives the S3 server access logs of the artifact bucket (under artifacts/)."
  value       = aws_s3_bucket.access_logs.bucket
}

output "gpu_node_groups" {
  description = "GPU node group names; each is the value of the llm-platform/gpu-group node label."
  value       = keys(aws_eks_node_group.gpu)
}

output "vpc_id" {
  description = "VPC of the deployment."
  value       = aws_vpc.this.id
}

output "private_subnet_ids" {
  description = "Private subnets (EKS nodes and ray up VMs)."
  value       = aws_subnet.private[*].id
}

output "ray_up_security_group_id" {
  description = "Security group of the ray up VMs (null when enable_ray_up_iam is false)."
  value       = one(aws_security_group.ray_up[*].id)
}

output "ray_up_head_instance_profile_arn" {
  description = "Instance profile of the ray up head node (null when enable_ray_up_iam is false)."
  value       = one(aws_iam_instance_profile.ray_up_head[*].arn)
}

output "ray_up_worker_instance_profile_arn" {
  description = "Instance profile of the ray up worker nodes (null when enable_ray_up_iam is false)."
  value       = one(aws_iam_instance_profile.ray_up_worker[*].arn)
}

output "image_repository_url" {
  description = "ECR repository of the runtime image (docker push <url>:<tag>; cluster/*.yaml run <url>:<tag>)."
  value       = aws_ecr_repository.runtime.repository_url
}

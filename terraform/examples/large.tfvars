# A large set-up: 8 x A100 (40 GB) nodes for pre-training and full fine-tuning, plus L4 nodes for serving and eval.
# Both groups scale to zero. Check your account's GPU quotas (Running On-Demand P / G instances) first.
# Usage: terraform apply -var-file=examples/large.tfvars
region = "us-west-2"
name   = "llm-platform"

api_allowed_cidrs  = ["203.0.113.0/28"]
az_count           = 3
single_nat_gateway = false

cpu_node_group = {
  instance_types = ["m6i.4xlarge"]
  min_size       = 2
  max_size       = 4
  desired_size   = 2
  disk_size_gb   = 200
}

gpu_node_groups = {
  gpu-a100 = {
    instance_types = ["p4d.24xlarge"]
    gpus_per_node  = 8
    min_size       = 0
    max_size       = 4
    desired_size   = 0
    capacity_type  = "ON_DEMAND"
    disk_size_gb   = 1000
  }
  # Serving (point the RayService's worker group at gpu-l4) and eval: on demand, a Spot reclaim drops live requests.
  gpu-l4 = {
    instance_types = ["g6.12xlarge"]
    gpus_per_node  = 4
    min_size       = 0
    max_size       = 4
    desired_size   = 0
    capacity_type  = "ON_DEMAND"
    disk_size_gb   = 500
    serving        = true
  }
}

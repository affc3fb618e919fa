# A small set-up: one A10G (24 GB) node group that scales to zero, for fine-tuning and serving models up to ~7B
# with LoRA. Usage: terraform apply -var-file=examples/small.tfvars
region = "us-east-1"
name   = "llm-platform"

# Your workstation's public address (documentation range shown). Leave empty to keep the API endpoint private.
api_allowed_cidrs = ["203.0.113.10/32"]

cpu_node_group = {
  instance_types = ["m6i.xlarge"]
  min_size       = 1
  max_size       = 2
  desired_size   = 1
  disk_size_gb   = 100
}

# The one GPU group also runs the RayService (cluster/ray-service.serve.yaml selects gpu-a10g), so it is on demand:
# a Spot reclaim would drop the requests in flight. For a training-only set-up, SPOT with serving = false is about
# 60-70 % cheaper and training resumes from its last checkpoint.
gpu_node_groups = {
  gpu-a10g = {
    instance_types = ["g5.xlarge", "g5.2xlarge"]
    gpus_per_node  = 1
    min_size       = 0
    max_size       = 2
    desired_size   = 0
    capacity_type  = "ON_DEMAND"
    disk_size_gb   = 200
    serving        = true
  }
}

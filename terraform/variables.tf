variable "region" {
  description = "AWS region for every resource (the bucket, the VPC and the EKS cluster)."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like an AWS region name, e.g. us-east-1."
  }
}

variable "name" {
  description = "Name prefix of every resource; also the EKS cluster name."
  type        = string
  default     = "llm-platform"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.name))
    error_message = "name must be 3-31 characters: lower-case letters, digits and '-', starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC; split into one public and one private subnet per availability zone."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid IPv4 CIDR of /20 or larger (pods take VPC addresses with the VPC CNI)."
  }
}

variable "az_count" {
  description = "Number of availability zones to spread subnets (and nodes) over."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be between 2 and 4 (EKS needs subnets in at least two zones)."
  }
}

variable "availability_zones" {
  description = "Availability zones to use, by name (e.g. [\"us-east-1a\", \"us-east-1b\"]); empty takes the first az_count zones of the region."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || length(var.availability_zones) >= 2
    error_message = "availability_zones must be empty or name at least two zones (EKS needs two)."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper) instead of one per zone (survives a zone outage)."
  type        = bool
  default     = true
}

variable "flow_log_retention_days" {
  description = "Retention of VPC flow logs and EKS control-plane logs in CloudWatch, in days."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be one of the values CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, ..., 365, ...)."
  }
}

variable "bucket_name" {
  description = "Name of the S3 bucket for datasets, checkpoints and the model registry; null derives one from name, account and region."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 characters: lower-case letters, digits, '.', '-')."
  }
}

variable "storage_prefix" {
  description = "Key prefix of all artifacts in the bucket; conf/storage/s3.yaml uses s3://<bucket>/llm-platform."
  type        = string
  default     = "llm-platform"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]*$", var.storage_prefix))
    error_message = "storage_prefix must be a single path segment without slashes."
  }
}

variable "checkpoint_ia_transition_days" {
  description = "Days after which checkpoints and sweeps (runs/, sweeps/) move to S3 Standard-IA."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_ia_transition_days >= 30
    error_message = "checkpoint_ia_transition_days must be at least 30 (S3's minimum for Standard-IA)."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days a deleted or overwritten object (e.g. a checkpoint pruned by Ray Train) is kept as a noncurrent version."
  type        = number
  default     = 14

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "access_log_retention_days" {
  description = "Days the S3 server access logs of the artifact bucket are kept in the access-log bucket."
  type        = number
  default     = 365

  validation {
    condition     = var.access_log_retention_days >= 90
    error_message = "access_log_retention_days must be at least 90 (an audit trail shorter than a quarter rarely answers the question asked of it)."
  }
}

variable "force_destroy_bucket" {
  description = "Let `terraform destroy` delete the bucket with its contents (all datasets, checkpoints and models)."
  type        = bool
  default     = false
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.33"

  validation {
    condition     = can(regex("^1\\.(3[0-9])$", var.kubernetes_version))
    error_message = "kubernetes_version must be a supported EKS minor version such as 1.33."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint; empty keeps the endpoint private (VPC only)."
  type        = list(string)
  default     = []

  # A prefix shorter than /8 (0.0.0.0/0 among them) is a good part of the internet, not an allowlist.
  validation {
    condition     = alltrue([for c in var.api_allowed_cidrs : can(cidrnetmask(c)) && tonumber(split("/", c)[1]) >= 8])
    error_message = "api_allowed_cidrs must be valid IPv4 CIDRs with a prefix of /8 or longer (0.0.0.0/0 and other huge ranges are refused)."
  }
}

variable "cpu_node_group" {
  description = "The CPU node group for Ray head pods, the KubeRay operator and system pods."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gb   = number
  })
  default = {
    instance_types = ["m6i.2xlarge"]
    min_size       = 1
    max_size       = 3
    desired_size   = 1
    disk_size_gb   = 100
  }

  validation {
    condition = (
      var.cpu_node_group.min_size >= 1 &&
      var.cpu_node_group.min_size <= var.cpu_node_group.desired_size &&
      var.cpu_node_group.desired_size <= var.cpu_node_group.max_size
    )
    error_message = "cpu_node_group needs 1 <= min_size <= desired_size <= max_size (the Ray head and system pods live here)."
  }

  validation {
    condition     = length(var.cpu_node_group.instance_types) > 0 && var.cpu_node_group.disk_size_gb >= 50
    error_message = "cpu_node_group needs at least one instance type and disk_size_gb >= 50 (the Ray image is large)."
  }
}

variable "gpu_node_groups" {
  description = "GPU node groups by name (the name becomes the Ray worker group's node selector). min_size = 0 scales the group to zero when idle; serving = true marks a group that runs RayService replicas, which must be ON_DEMAND."
  type = map(object({
    instance_types = list(string)
    gpus_per_node  = number
    min_size       = number
    max_size       = number
    desired_size   = number
    capacity_type  = string
    disk_size_gb   = number
    serving        = optional(bool, false)
  }))
  default = {
    gpu-a10g = {
      instance_types = ["g5.xlarge"]
      gpus_per_node  = 1
      min_size       = 0
      max_size       = 2
      desired_size   = 0
      capacity_type  = "ON_DEMAND"
      disk_size_gb   = 200
      serving        = true
    }
  }

  validation {
    condition     = length(var.gpu_node_groups) >= 1
    error_message = "gpu_node_groups must define at least one group."
  }

  validation {
    condition = alltrue([for k, g in var.gpu_node_groups :
      can(regex("^[a-z][a-z0-9-]{1,30}$", k)) &&
      g.min_size >= 0 && g.min_size <= g.desired_size && g.desired_size <= g.max_size && g.max_size >= 1
    ])
    error_message = "each gpu_node_groups entry needs a lower-case name and 0 <= min_size <= desired_size <= max_size, max_size >= 1."
  }

  validation {
    condition = alltrue([for g in values(var.gpu_node_groups) :
      contains(["ON_DEMAND", "SPOT"], g.capacity_type) && g.gpus_per_node >= 1 && length(g.instance_types) > 0 && g.disk_size_gb >= 100
    ])
    error_message = "each gpu_node_groups entry needs capacity_type ON_DEMAND or SPOT, gpus_per_node >= 1, an instance type and disk_size_gb >= 100."
  }

  # A Spot reclaim takes a serving node with two minutes' notice and drops the requests in flight on it; training
  # resumes from its last checkpoint, an endpoint's callers do not.
  validation {
    condition     = alltrue([for g in values(var.gpu_node_groups) : !g.serving || g.capacity_type == "ON_DEMAND"])
    error_message = "a gpu_node_groups entry with serving = true must have capacity_type = \"ON_DEMAND\"."
  }
}

variable "ray_namespace" {
  description = "Kubernetes namespace of the Ray clusters, jobs and services (cluster/*.yaml use it)."
  type        = string
  default     = "ray"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.ray_namespace))
    error_message = "ray_namespace must be a valid Kubernetes namespace name."
  }
}

variable "ray_service_account_prefix" {
  description = "Prefix of the four Kubernetes service accounts of the Ray pods: <prefix>-head and <prefix>-worker (training cluster, training role), <prefix>-serve-head and <prefix>-serve-worker (RayService, read-only serving role)."
  type        = string
  default     = "ray"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$", var.ray_service_account_prefix))
    error_message = "ray_service_account_prefix must be a valid Kubernetes name of at most 42 characters (the suffixes add up to 13)."
  }
}

variable "kuberay_operator_chart_version" {
  description = "Version of the kuberay-operator Helm chart; the same KubeRay version as the CRDs in cluster/crds/ that the manifests are checked against (cluster/crds/README.md)."
  type        = string
  default     = "1.7.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.kuberay_operator_chart_version))
    error_message = "kuberay_operator_chart_version must be an exact chart version (x.y.z): charts are pinned, never floating."
  }
}

variable "nvidia_device_plugin_chart_version" {
  description = "Version of NVIDIA's nvidia-device-plugin Helm chart."
  type        = string
  default     = "0.17.1"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.nvidia_device_plugin_chart_version))
    error_message = "nvidia_device_plugin_chart_version must be an exact chart version (x.y.z): charts are pinned, never floating."
  }
}

variable "cluster_autoscaler_chart_version" {
  description = "Version of the Kubernetes cluster-autoscaler Helm chart (scales the node groups, GPU groups from zero)."
  type        = string
  default     = "9.46.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.cluster_autoscaler_chart_version))
    error_message = "cluster_autoscaler_chart_version must be an exact chart version (x.y.z): charts are pinned, never floating."
  }
}

variable "enable_ray_up_iam" {
  description = "Create the IAM instance profiles used by cluster/ray-cluster.aws.yaml (the `ray up` path without Kubernetes)."
  type        = bool
  default     = true
}

variable "monitoring_enabled" {
  description = "Install kube-prometheus-stack (Prometheus, Alertmanager, Grafana) with llm-platform's alert rules and dashboards from cluster/monitoring/ (terraform/monitoring.tf)."
  type        = bool
  default     = false
}

variable "kube_prometheus_stack_chart_version" {
  description = "Version of the prometheus-community kube-prometheus-stack Helm chart (used when monitoring_enabled)."
  type        = string
  default     = "88.3.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.kube_prometheus_stack_chart_version))
    error_message = "kube_prometheus_stack_chart_version must be an exact chart version (x.y.z): charts are pinned, never floating."
  }
}

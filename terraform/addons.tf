# In-cluster software from pinned Helm charts: the KubeRay operator (RayCluster/RayJob/RayService), NVIDIA's device
# plugin (advertises nvidia.com/gpu), and the cluster autoscaler (adds nodes for pending Ray pods, GPU groups from
# zero, and removes idle ones).

locals {
  on_cpu_nodes = { "llm-platform/node-role" = "cpu" }
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_operator_chart_version
  namespace        = "kuberay-system"
  create_namespace = true

  values = [yamlencode({
    nodeSelector = local.on_cpu_nodes
  })]

  depends_on = [aws_eks_node_group.cpu, aws_eks_addon.this]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_chart_version
  namespace  = "kube-system"

  values = [yamlencode({
    # Run on the tainted GPU nodes only (selected by the chart's default affinity on nvidia.com/gpu.present).
    tolerations = [
      { key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" },
      { key = "CriticalAddonsOnly", operator = "Exists" },
    ]
    priorityClassName = "system-node-critical"
  })]

  depends_on = [aws_eks_node_group.cpu, aws_eks_addon.this]
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version
  namespace  = "kube-system"

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = aws_eks_cluster.this.name }
    rbac = {
      serviceAccount = {
        create      = true
        name        = "cluster-autoscaler"
        annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.cluster_autoscaler.arn }
      }
    }
    nodeSelector = local.on_cpu_nodes
    extraArgs = {
      # Prefer the cheapest fitting group; remove a node after 10 idle minutes (GPU groups return to zero).
      expander                      = "least-waste"
      "balance-similar-node-groups" = true
      "skip-nodes-with-system-pods" = false
      "scale-down-unneeded-time"    = "10m"
      "scale-down-delay-after-add"  = "5m"
    }
  })]

  depends_on = [aws_eks_node_group.cpu, aws_eks_addon.this, aws_iam_role_policy.cluster_autoscaler]
}

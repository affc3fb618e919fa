# Optional monitoring stack (var.monitoring_enabled): kube-prometheus-stack (Prometheus, its operator, Alertmanager
# and Grafana) from its pinned Helm chart in the `monitoring` namespace, loaded with llm-platform's alert rules and
# dashboards from cluster/monitoring/ (tests/unit/test_monitoring.py checks those files). The PodMonitors in
# cluster/monitoring/podmonitor.yaml select this release's Prometheus by its name (`release` label), and
# cluster/network-policies.yaml admits its Prometheus pods to the Ray pods' metrics port by the namespace name.

locals {
  monitoring_files = "${path.module}/../cluster/monitoring"
  # Grafana provisions these from files: the dashboards' `datasource` variable picks the stack's Prometheus.
  monitoring_dashboards = {
    for name in ["llm-platform-serve", "llm-platform-train", "llm-platform-data"] :
    name => { json = file("${local.monitoring_files}/dashboards/${name}.json") }
  }
}

resource "helm_release" "kube_prometheus_stack" {
  count = var.monitoring_enabled ? 1 : 0

  name             = "kube-prometheus-stack"
  repository       = "https://prometheus-community.github.io/helm-charts"
  chart            = "kube-prometheus-stack"
  version          = var.kube_prometheus_stack_chart_version
  namespace        = "monitoring"
  create_namespace = true

  values = [yamlencode({
    # Becomes a PrometheusRule of the release, which its Prometheus loads.
    additionalPrometheusRulesMap = {
      "llm-platform" = yamldecode(file("${local.monitoring_files}/alerts.yaml"))
    }
    prometheus = {
      prometheusSpec = { nodeSelector = local.on_cpu_nodes }
    }
    alertmanager = {
      alertmanagerSpec = { nodeSelector = local.on_cpu_nodes }
    }
    prometheusOperator = { nodeSelector = local.on_cpu_nodes }
    grafana = {
      nodeSelector = local.on_cpu_nodes
      # No chart default password: null lets the Grafana chart generate one into its Secret.
      adminPassword = null
      dashboardProviders = {
        "dashboardproviders.yaml" = {
          apiVersion = 1
          providers = [{
            name            = "llm-platform"
            orgId           = 1
            folder          = "llm-platform"
            type            = "file"
            disableDeletion = true
            editable        = false
            options         = { path = "/var/lib/grafana/dashboards/llm-platform" }
          }]
        }
      }
      dashboards = { "llm-platform" = local.monitoring_dashboards }
    }
  })]

  depends_on = [aws_eks_node_group.cpu, aws_eks_addon.this]
}

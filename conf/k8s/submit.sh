#!/usr/bin/env bash
# Submit one party of conf/k8s's job to its Kubernetes cluster, in cluster deploy mode:
#   K8S_API=https://<api-server> conf/k8s/submit.sh guest      # the bank
#   K8S_API=https://<api-server> conf/k8s/submit.sh host       # the telco, in its own cluster
# Before: the image (Dockerfile) in your registry, rbac.yaml and the party's RayCluster
# (raycluster.yaml) applied, the party's TOML in ConfigMap fedps-<party>-job, its identity key in
# Secret fedps-<party>-identity, its Kafka user's Secret and the cluster CA copied into `fedps`.
set -euo pipefail
role="${1:?usage: submit.sh guest|host}"
case "$role" in
  guest) party=bank ;;
  host) party=telco ;;
  *) echo "submit.sh: role must be guest or host, not $role" >&2; exit 2 ;;
esac
here="$(cd "$(dirname "$0")" && pwd)"
image="${IMAGE:-registry.example/fedps:0.1.0}"
driver_template="$here/spark-driver-template.yaml"
executor_template="$here/spark-executor-template.yaml"
if [ "$party" != bank ]; then   # the templates name the bank's volumes and Secrets
  sed "s/bank/$party/g" "$driver_template" > "/tmp/fedps-$party-driver.yaml"
  sed "s/bank/$party/g" "$executor_template" > "/tmp/fedps-$party-executor.yaml"
  driver_template="/tmp/fedps-$party-driver.yaml"
  executor_template="/tmp/fedps-$party-executor.yaml"
fi
exec spark-submit \
  --master "k8s://${K8S_API:?set K8S_API to the API server URL}" \
  --deploy-mode cluster \
  --name "fedps-$party-credit-2026-11" \
  --conf spark.kubernetes.namespace=fedps \
  --conf "spark.kubernetes.container.image=$image" \
  --conf spark.kubernetes.authenticate.driver.serviceAccountName=fedps-spark \
  --conf "spark.kubernetes.driver.podTemplateFile=$driver_template" \
  --conf "spark.kubernetes.executor.podTemplateFile=$executor_template" \
  --conf spark.pyspark.python=/usr/local/bin/python \
  local:///opt/fedps/jobs/hetero_lr.py --conf "/etc/fedps/job/$role.toml"

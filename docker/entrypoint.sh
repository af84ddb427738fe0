#!/usr/bin/env bash
# Entry point of the fedps image (Dockerfile). Spark on Kubernetes runs a driver pod
# with `driver <spark-submit arguments>` and executor pods with `executor` plus the
# SPARK_* environment its scheduler sets (the arguments are the ones
# KubernetesExecutorBackend of Spark 4 parses); every other command runs as given.
set -euo pipefail

: "${JAVA_HOME:=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")}"
export JAVA_HOME

case "${1:-}" in
  driver)
    shift
    # The driver pod is already the cluster-mode driver: it submits itself in client mode.
    exec "$SPARK_HOME/bin/spark-submit" \
      --deploy-mode client \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:-0.0.0.0}" \
      "$@"
    ;;
  executor)
    shift
    java_opts=()
    # Spark passes the executor's JVM options as SPARK_JAVA_OPT_0, _1, ... in order.
    while IFS= read -r name; do
      java_opts+=("${!name}")
    done < <(compgen -e | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n)
    exec java "${java_opts[@]}" \
      -Xms"${SPARK_EXECUTOR_MEMORY:?}" -Xmx"${SPARK_EXECUTOR_MEMORY:?}" \
      -cp "${SPARK_CLASSPATH:-}:$SPARK_HOME/jars/*" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL:?}" \
      --executor-id "${SPARK_EXECUTOR_ID:?}" \
      --cores "${SPARK_EXECUTOR_CORES:?}" \
      --app-id "${SPARK_APPLICATION_ID:?}" \
      --hostname "${SPARK_EXECUTOR_POD_IP:?}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}"
    ;;
  "")
    exec fedps --help
    ;;
  *)
    exec "$@"
    ;;
esac

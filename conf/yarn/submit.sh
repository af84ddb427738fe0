#!/usr/bin/env bash
# Submit one party to YARN with what `make dist` built:
#   conf/yarn/submit.sh client conf/yarn/guest.toml            # driver on this host
#   conf/yarn/submit.sh cluster conf/yarn/guest-cluster.toml   # driver in the application master
# Executors (and the driver in cluster mode) run Python from the packed environment,
# unpacked by YARN as ./env in each container.
set -euo pipefail
mode="${1:?usage: submit.sh client|cluster <party.toml>}"
conf="${2:?usage: submit.sh client|cluster <party.toml>}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")"
env_archive="$root/dist/fedps-env-$version.tar.gz"
[ -f "$env_archive" ] || { echo "submit.sh: $env_archive is missing; run make dist" >&2; exit 2; }
common=(--master yarn --deploy-mode "$mode"
        --archives "$env_archive#env"
        --conf spark.pyspark.python=./env/bin/python
        --conf spark.executorEnv.RAY_USAGE_STATS_ENABLED=0)
case "$mode" in
  client)
    # The driver uses this host's fedps (pip install dist/fedps-$version-*.whl).
    exec spark-submit "${common[@]}" --conf "spark.pyspark.driver.python=$(command -v python3)" \
      "$root/jobs/hetero_lr.py" --conf "$conf" ;;
  cluster)
    dir="$(dirname "$conf")"
    exec spark-submit "${common[@]}" \
      --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON=./env/bin/python \
      --conf spark.yarn.appMasterEnv.RAY_USAGE_STATS_ENABLED=0 \
      --files "$conf,$dir/bank.key,$dir/kafka-ca.pem" \
      "$root/jobs/hetero_lr.py" --conf "$(basename "$conf")" ;;
  *) echo "submit.sh: mode must be client or cluster, not $mode" >&2; exit 2 ;;
esac

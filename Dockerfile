# One image for a party on Kubernetes: the Spark driver, the Spark executors and the
# Ray cluster of the parameter server (KubeRay runs `ray start` in it).
#
#   make dist DIST_ARGS=--no-env          # dist/fedps-<version>-py3-none-any.whl
#   docker build -t registry.example/fedps:0.1.0 .
#
# Spark on Kubernetes starts the same image with `driver ...` or `executor`
# (docker/entrypoint.sh); anything else runs as a command (`fedps keygen ...`).
FROM python:3.11-slim-bookworm

ARG FEDPS_VERSION=0.1.0
# the Ray of the image; conf/k8s/raycluster.yaml's rayVersion must be the same
ARG RAY_VERSION=2.60.0
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini procps \
 && rm -rf /var/lib/apt/lists/*

COPY dist/fedps-${FEDPS_VERSION}-py3-none-any.whl /tmp/
# ray[default]: the dashboard and agent a KubeRay head expects; pyspark comes with fedps and
# brings Spark's jars (spark-kubernetes included) and bin/spark-submit.
RUN pip install --no-cache-dir "/tmp/fedps-${FEDPS_VERSION}-py3-none-any.whl" "ray[default]==${RAY_VERSION}" \
 && rm /tmp/*.whl

ENV SPARK_HOME=/usr/local/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=/usr/local/bin/python \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1

COPY jobs/ /opt/fedps/jobs/
COPY docker/entrypoint.sh /opt/fedps/entrypoint.sh
# uid 185 as in Spark's own images, so pod templates and volume permissions carry over
RUN useradd --uid 185 --gid 0 --create-home --home-dir /home/fedps fedps \
 && mkdir -p /opt/fedps/work && chown 185:0 /opt/fedps/work
USER 185
WORKDIR /opt/fedps/work
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/fedps/entrypoint.sh"]

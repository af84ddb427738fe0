#!/bin/sh
# Regenerate fedps/serving/fedps_serving_v1_pb2.py from proto/fedps_serving_v1.proto.
#
# The generated module is checked in, so installing fedps needs no protoc. It is
# generated with grpcio-tools 1.62.3 (protoc 25.1) on purpose: that code runs on
# every protobuf runtime fedps allows (4.25 to 6.x), while newer protoc output
# refuses runtimes older than itself. Only messages are generated; the services
# are wired by hand in fedps/serving (no *_pb2_grpc.py, whose version check
# would pin grpcio too).
#   pip install --target /tmp/grpc-tools --no-deps grpcio-tools==1.62.3
#   PYTHONPATH=/tmp/grpc-tools sh proto/generate.sh
set -eu
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto --python_out=fedps/serving proto/fedps_serving_v1.proto

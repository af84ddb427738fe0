"""The cluster examples in conf/yarn and conf/k8s parse, validate and agree with each other.

No cluster runs here, so these tests check what an operator would otherwise find out
at deploy time: topic and ACL lists that differ from what fedps uses, a Ray address
that names no RayCluster, an image or version that differs between files, a path in a
party's TOML that no volume provides, or a job file that is not in the image.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from fedps.algorithms.hetero_lr.params import LRParams
from fedps.engine import config as fedps_config
from fedps.engine import deploy
from fedps.engine.runner import resolve_algorithm

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "conf" / "k8s"
YARN = ROOT / "conf" / "yarn"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WEEK_MS = 7 * 24 * 3600 * 1000


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def k8s_parties() -> dict[str, fedps_config.FedpsConfig]:
    return {role: fedps_config.load(K8S / f"{role}.toml") for role in ("guest", "host")}


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile has no ARG {name}"
    return match.group(1)


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("[!l]*/*.toml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cluster_toml_loads_and_its_params_validate(path):
    config = fedps_config.load(path)
    resolve_algorithm(config.job.algorithm)
    if config.job.algorithm == "hetero_lr":
        LRParams.from_mapping(dict(config.job.params))
    assert config.party.name not in config.peers


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses_into_named_kubernetes_objects(path):
    for doc in docs(path.name):
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {doc.get('kind')}"
        if doc["kind"] == "Pod":
            continue   # a pod template: Spark names the pods
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"].get("name", "")), doc["metadata"]


@pytest.mark.parametrize("path", sorted([*ROOT.glob("conf/*/*.sh"), ROOT / "docker" / "entrypoint.sh"]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_script_parses(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_kafka_topics_are_exactly_the_jobs_topics():
    topics = {d["spec"]["topicName"]: d for d in docs("kafka-topics.yaml")}
    for config in k8s_parties().values():
        for need in deploy.job_topics(config):
            assert need.name in topics, f"kafka-topics.yaml lacks {need.name}"
            spec = topics[need.name]["spec"]
            assert spec["partitions"] == need.partitions, need.name
            assert spec["replicas"] >= config.kafka.replication_factor
            assert int(spec["config"]["retention.ms"]) >= WEEK_MS, "retention shorter than a resumable outage"
            assert int(spec["config"]["max.message.bytes"]) > config.channel.chunk_bytes + 4096
    wanted = {t.name for c in k8s_parties().values() for t in deploy.job_topics(c)}
    assert set(topics) == wanted, "kafka-topics.yaml has topics no party uses"


def test_kafka_users_may_write_only_outgoing_and_read_only_incoming_topics():
    users = {d["metadata"]["name"]: d["spec"] for d in docs("kafka-users.yaml")}
    clusters = {d["metadata"]["labels"]["strimzi.io/cluster"]
                for d in docs("kafka-users.yaml") + docs("kafka-topics.yaml")}
    assert len(clusters) == 1, f"users and topics belong to different Kafka clusters: {clusters}"
    for config in k8s_parties().values():
        spec = users[config.party.name]
        assert spec["authentication"]["type"] == "tls" and config.kafka.ssl_certfile
        acls = spec["authorization"]["acls"]
        assert acls == deploy.strimzi_acls(config)
        operations = {op for acl in acls for op in acl["operations"]}
        assert not operations & {"Create", "Delete", "Alter", "All", "AlterConfigs"}
        written = {a["resource"]["name"] for a in acls if "Write" in a["operations"]}
        # <prefix>.<job>.<sender>.<receiver>[.<label>]: a party writes only as the sender
        assert written and all(name.split(".")[2] == config.party.name for name in written)


def test_each_partys_ray_address_names_its_raycluster_on_the_images_ray():
    clusters = {(d["metadata"]["name"], d["metadata"]["namespace"]): d for d in docs("raycluster.yaml")}
    for config in k8s_parties().values():
        match = re.fullmatch(r"ray://([a-z0-9-]+)-head-svc\.([a-z0-9-]+)\.svc:(\d+)", config.ray.address)
        assert match, config.ray.address
        name, namespace, port = match.groups()
        cluster = clusters[(name, namespace)]["spec"]
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert int(port) in {p["containerPort"] for p in head["ports"]}
        assert cluster["rayVersion"] == dockerfile_arg("RAY_VERSION")


def test_one_image_and_one_version_everywhere():
    assert dockerfile_arg("FEDPS_VERSION") == VERSION
    images = {c["image"] for d in docs("raycluster.yaml")
              for group in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    submitted = re.search(r'image="\$\{IMAGE:-([^}]+)\}"', (K8S / "submit.sh").read_text()).group(1)
    assert images == {submitted}
    assert submitted.endswith(f":{VERSION}")


def mounts(template: dict) -> list[str]:
    return [m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]


def under(path: str, folders: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(folder) for folder in folders)


def test_the_driver_pod_provides_every_path_of_the_partys_toml():
    driver = docs("spark-driver-template.yaml")[0]
    executor = docs("spark-executor-template.yaml")[0]
    submit = (K8S / "submit.sh").read_text()
    guest = k8s_parties()["guest"]
    folders = mounts(driver)
    for path in (guest.party.identity_key, guest.party.output_dir, guest.party.state_dir,
                 guest.kafka.ssl_cafile, guest.kafka.ssl_certfile, guest.kafka.ssl_keyfile):
        assert under(str(path), folders), f"no volume of the driver holds {path}"
    # the submitted configuration is where the job ConfigMap is mounted
    assert under("/etc/fedps/job/guest.toml", folders) and "/etc/fedps/job/$role.toml" in submit
    # executors write the layout under output_dir and use the Kafka links; the key stays on the driver
    assert under(guest.party.output_dir, mounts(executor)) and under(guest.kafka.ssl_keyfile, mounts(executor))
    assert not under(guest.party.identity_key, mounts(executor))
    # an fsGroup would make the identity Secret group-readable, which fedps refuses
    assert "fsGroup" not in driver["spec"].get("securityContext", {})
    accounts = {d["metadata"]["name"] for d in docs("rbac.yaml") if d["kind"] == "ServiceAccount"}
    assert driver["spec"]["serviceAccountName"] in accounts
    assert f"serviceAccountName={driver['spec']['serviceAccountName']}" in submit


def test_the_submitted_job_file_is_in_the_image():
    submit = (K8S / "submit.sh").read_text()
    job = re.search(r"local://(/opt/fedps/jobs/\S+\.py)", submit).group(1)
    copy = re.search(r"^COPY jobs/ (\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert PurePosixPath(job).is_relative_to(copy)
    assert (ROOT / "jobs" / PurePosixPath(job).relative_to(copy)).is_file()


def test_yarn_cluster_mode_ships_every_relative_file_of_its_toml():
    raw = tomllib.loads((YARN / "guest-cluster.toml").read_text())
    relative = [p for p in (raw["party"]["identity_key"], raw["kafka"]["ssl_cafile"]) if not p.startswith("/")]
    files = re.search(r'--files "([^"]+)"', (YARN / "submit.sh").read_text()).group(1)
    shipped = {PurePosixPath(shlex.split(f)[0]).name for f in files.split(",")}
    assert relative and set(relative) <= shipped


def ray_token_secrets(containers: list[dict]) -> set[str]:
    """The Secrets the containers take RAY_AUTH_TOKEN from; only when they also turn token auth on."""
    found = set()
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", container["name"]
        found.add(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    return found


def test_every_process_that_joins_a_partys_ray_has_that_partys_token():
    for cluster in docs("raycluster.yaml"):
        spec = cluster["spec"]
        containers = [c for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                      for c in group["template"]["spec"]["containers"]]
        party = cluster["metadata"]["name"].removeprefix("fedps-").removesuffix("-ps")
        assert ray_token_secrets(containers) == {f"fedps-{party}-ray-token"}
    spark = [c for name in ("spark-driver-template.yaml", "spark-executor-template.yaml")
             for c in docs(name)[0]["spec"]["containers"]]
    assert ray_token_secrets(spark) == {"fedps-bank-ray-token"}   # the bank's templates


def test_fedps_topics_prints_the_resources_of_the_example(capsys):
    from fedps.engine.cli import main

    assert main(["topics", "--conf", str(K8S / "guest.toml"), "--strimzi", "--kafka-cluster", "fedps-kafka"]) == 0
    printed = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    example = {d["spec"]["topicName"]: d["spec"] for d in docs("kafka-topics.yaml")}
    topics = [d for d in printed if d["kind"] == "KafkaTopic"]
    assert topics and all(example[t["spec"]["topicName"]]["partitions"] == t["spec"]["partitions"] for t in topics)
    assert {t["spec"]["topicName"].split(".")[2] for t in topics} == {"bank"}   # what the bank sends on
    (user,) = [d for d in printed if d["kind"] == "KafkaUser"]
    assert user["spec"] == next(d["spec"] for d in docs("kafka-users.yaml") if d["metadata"]["name"] == "bank")


def test_a_role_that_contradicts_the_file_is_refused_before_anything_starts(capsys):
    from fedps.engine.cli import main

    assert main(["run", "--conf", str(K8S / "guest.toml"), "--role", "host"]) == 2
    assert "--role host contradicts party.role = 'guest'" in capsys.readouterr().err

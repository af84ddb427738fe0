"""What a party's job needs from a Kafka cluster run by an operator: topics and permissions.

On a cluster where clients may not create topics (Strimzi with ``KafkaTopic`` resources,
or any locked-down Kafka), the operator creates a job's topics in advance and gives each
party's user exactly these permissions (``conf/k8s/kafka-topics.yaml`` and
``kafka-users.yaml`` are worked examples, checked against this module by the tests):

- WRITE and DESCRIBE on the topics it sends on, ``<prefix>.<job>.<me>.<peer>`` and the
  per-partition links beside them (``….rows``: one partition per data partition);
- READ and DESCRIBE on the topics it receives on, ``<prefix>.<job>.<peer>.<me>[.…]``;
- READ on the consumer group ``<prefix>.<job>.<peer>.<me>.reader``, where the driver
  channel commits what it has read (the per-partition links commit nothing: their
  positions are in the job's checkpoints).

The rules are literal, one per topic (``strimzi_acls``): the topic names contain the job
id, so an operator grants them per job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedps.messaging.channel import topic_name

# Links beside the driver channel, by algorithm: label -> how its partition count is found.
# The vertical skeleton's training rows use `job.params.partitions` (default 4).
VERTICAL_ALGORITHMS = ("hetero_lr", "secureboost")
DEFAULT_PARTITIONS = 4


@dataclass(frozen=True)
class TopicNeed:
    """One topic of a job as one party sees it."""

    name: str
    partitions: int
    direction: str      # "out" (this party writes) or "in" (this party reads)
    peer: str


def job_topics(config: Any) -> list[TopicNeed]:
    """Every topic ``config``'s party writes or reads in its job, with partition counts."""
    prefix, job, me = config.kafka.topic_prefix, config.job.id, config.party.name
    partitions = int(dict(config.job.params).get("partitions", DEFAULT_PARTITIONS))
    needs = []
    for peer in sorted(config.peers):
        for direction, sender, receiver in (("out", me, peer), ("in", peer, me)):
            base = topic_name(prefix, job, sender, receiver)
            needs.append(TopicNeed(base, 1, direction, peer))
            if config.job.algorithm in VERTICAL_ALGORITHMS:
                needs.append(TopicNeed(base + ".rows", partitions, direction, peer))
    return needs


def consumer_groups(config: Any) -> list[str]:
    """The consumer groups the party's driver channels commit to (one per peer)."""
    prefix, job, me = config.kafka.topic_prefix, config.job.id, config.party.name
    return [topic_name(prefix, job, peer, me) + ".reader" for peer in sorted(config.peers)]


def strimzi_acls(config: Any) -> list[dict[str, Any]]:
    """The ``KafkaUser`` ``spec.authorization.acls`` that let the party do its job and no more.

    One literal rule per topic: a prefix rule on ``<prefix>.<job>.<me>.<peer>`` would be
    shorter but would also let the party write to a peer named ``<peer>x``.
    """
    acls = []
    for need in job_topics(config):
        operations = ["Write", "Describe"] if need.direction == "out" else ["Read", "Describe"]
        acls.append({"resource": {"type": "topic", "name": need.name, "patternType": "literal"},
                     "operations": operations})
    for group in consumer_groups(config):
        acls.append({"resource": {"type": "group", "name": group, "patternType": "literal"},
                     "operations": ["Read"]})
    return acls


def strimzi_yaml(config: Any, kafka_cluster: str, retention_ms: int = 7 * 24 * 3600 * 1000) -> str:
    """Strimzi ``KafkaTopic``s for the topics this party sends on and its ``KafkaUser``.

    Each party prints its own: together they make every topic of the job once. Retention
    must outlast the longest outage a job should survive (a resumed party re-reads its
    topics from its checkpoint's positions).
    """
    import yaml

    labels = {"strimzi.io/cluster": kafka_cluster}
    max_bytes = max(1_048_588, config.channel.chunk_bytes + 65_536)
    documents = [
        {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaTopic",
         "metadata": {"name": need.name, "labels": labels},
         "spec": {"topicName": need.name, "partitions": need.partitions,
                  "replicas": config.kafka.replication_factor,
                  "config": {"retention.ms": retention_ms, "max.message.bytes": max_bytes}}}
        for need in job_topics(config) if need.direction == "out"]
    documents.append(
        {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaUser",
         "metadata": {"name": config.party.name, "labels": labels},
         "spec": {"authentication": {"type": "tls"},
                  "authorization": {"type": "simple", "acls": strimzi_acls(config)}}})
    return yaml.safe_dump_all(documents, sort_keys=False)

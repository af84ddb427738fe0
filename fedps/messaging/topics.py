"""Create a job's topics where the client may, and accept them where an operator made them.

On a locked-down cluster the topics are made in advance (Strimzi ``KafkaTopic``s, see
``conf/k8s/kafka-topics.yaml``) and a party's user has no CREATE permission. Kafka
answers a CreateTopics request without that permission with an authorisation error
even for a topic that exists, so existing topics are looked up first (DESCRIBE, which a
party needs anyway) and only missing ones are created.
"""

from __future__ import annotations

from collections.abc import Mapping

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError


def existing_partitions(admin: KafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partition counts of those of ``topics`` that exist (and this user may describe)."""
    present = set(admin.list_topics()) & set(topics)
    if not present:
        return {}
    counts = {}
    for described in admin.describe_topics(sorted(present)):
        name = described.get("topic", described.get("name"))
        if name in present and not described.get("error_code"):
            counts[name] = len(described.get("partitions") or [])
    return counts


def ensure(admin: KafkaAdminClient, wanted: Mapping[str, int], replication_factor: int) -> dict[str, int]:
    """Create the topics of ``wanted`` (name -> partitions) that are missing; returns every count.

    A topic that already exists keeps its partition count (the caller decides whether it
    suffices); a topic created concurrently by the peer counts as existing.
    """
    counts = existing_partitions(admin, list(wanted))
    for topic, partitions in wanted.items():
        if topic in counts:
            continue
        try:
            admin.create_topics([NewTopic(topic, partitions, replication_factor)])
            counts[topic] = partitions
        except TopicAlreadyExistsError:
            counts[topic] = existing_partitions(admin, [topic]).get(topic, 0)
    return counts

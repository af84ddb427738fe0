"""Topics made in advance by an operator are used as they are; missing ones are created."""

from kafka.admin import KafkaAdminClient, NewTopic

from fedps.messaging import topics


def test_existing_topics_are_kept_and_missing_ones_created(broker, job_id):
    admin = KafkaAdminClient(bootstrap_servers=[broker.bootstrap_servers])
    try:
        made = f"fedps.{job_id}.a.b.rows"
        missing = f"fedps.{job_id}.b.a.rows"
        admin.create_topics([NewTopic(made, 3, 1)])           # the operator's KafkaTopic
        counts = topics.ensure(admin, {made: 2, missing: 2}, 1)
        assert counts == {made: 3, missing: 2}                 # the operator's count is not touched
        assert topics.existing_partitions(admin, [made, missing, "fedps.nothing"]) == {made: 3, missing: 2}
        assert topics.ensure(admin, {missing: 2}, 1) == {missing: 2}   # a second call creates nothing
    finally:
        admin.close()

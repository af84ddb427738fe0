"""The executor runtime shared by every vertical algorithm.

``layout`` (in :mod:`fedps.engine.layout`) puts the aligned rows in N
partitions, the same ids in the same order on every party; :mod:`.plan` cuts
batches from them; :mod:`.stage` runs the per-row work as barrier stages of
Spark tasks that talk to their peer tasks through per-partition Kafka links;
:mod:`.accumulator` adds the tasks' partial results under encryption inside
the party; :mod:`.job` is the skeleton (setup, checkpoints, resume) an
algorithm builds on; :mod:`.scores` turns validation scores into metrics
without collecting them.
"""

"""Online joint inference: ``fedps serve`` (docs/operations.md, "Online serving").

One serving process per party answers over gRPC (``proto/fedps_serving_v1.proto``):

- the **guest** serves the public ``Guest.Score``: ids (or row keys) and the
  guest's own features in, joint scores out. It hashes each id into its row
  key, asks every host in parallel for its part of the model on those rows
  (one round trip per batch), and adds the parts to its own;
- each **host** serves ``Host.Part`` to the guest alone, over mutual TLS whose
  certificates are signed by the parties' pinned Ed25519 identities
  (:mod:`fedps.serving.tls`), reading its features from an online store keyed
  by row key (:mod:`fedps.serving.store`).

Models are the parties' ``model.json`` files of a trained ``hetero_lr`` job
(:mod:`fedps.serving.model`) or ``secureboost`` job (:mod:`fedps.serving.trees`:
each host answers, in one call per batch, the direction every split of its
table sends each row, ``TreePart``; the guest walks the trees).
Operations (deadlines, fallbacks, health, metrics, reload,
graceful shutdown) are in :mod:`fedps.serving.server`.
"""

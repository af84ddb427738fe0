"""Two parties' job descriptors agree exactly when their shared settings do; differences are named."""

from __future__ import annotations

from fedps.engine import agreement, config


def party(name: str, role: str, peer: str, algorithm: str = "channel_demo", **params) -> config.FedpsConfig:
    return config.from_mapping({
        "job": {"id": "j1", "algorithm": algorithm, "params": params},
        "party": {"name": name, "role": role, "identity_key": "k"},
        "peers": {peer: "ed25519:AAAA"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
    })


def test_the_same_job_seen_from_both_sides_agrees():
    guest = agreement.descriptor(party("bank", "guest", "telco", "hetero_lr", train="a.csv", epochs=3))
    host = agreement.descriptor(party("telco", "host", "bank", "hetero_lr", train="b.csv", epochs=3))
    assert guest["digest"] == host["digest"]         # each side's own data path is not shared
    assert agreement.differences(guest, host, "telco") == []


def test_every_differing_setting_is_named_with_both_values():
    guest = agreement.descriptor(party("bank", "guest", "telco", "hetero_lr", train="a.csv", epochs=3,
                                       batch_size=64))
    host = agreement.descriptor(party("telco", "host", "bank", "hetero_lr", train="b.csv", epochs=5))
    found = agreement.differences(guest, host, "telco")
    assert "job.params.epochs: bank has 3, telco has 5" in found
    assert any(line.startswith("job.params.batch_size: bank has 64, telco has") for line in found)
    assert agreement.differences(host, guest, "bank") == found   # the same sentences on both sides


def test_another_algorithm_job_or_party_set_is_named():
    guest = agreement.descriptor(party("bank", "guest", "telco", "hetero_lr", train="a.csv"))
    other = agreement.descriptor(party("telco", "host", "bank", "psi"))
    assert "algorithm: bank has 'hetero_lr', telco has 'psi'" in agreement.differences(guest, other, "telco")
    stranger = agreement.descriptor(party("telco", "host", "shop", "hetero_lr", train="b.csv"))
    assert any(line.startswith("the parties ([peers]): bank has ['bank', 'telco'], telco has ['shop', 'telco']")
               for line in agreement.differences(guest, stranger, "telco"))


def test_two_guests_are_refused_even_when_everything_else_agrees():
    one = agreement.descriptor(party("bank", "guest", "telco"))
    two = agreement.descriptor(party("telco", "guest", "bank"))
    assert agreement.differences(one, two, "telco") == ["role: bank and telco both say they are the guest"]


def test_the_schema_hash_depends_on_the_declared_columns_only():
    a = agreement.descriptor(party("bank", "guest", "telco"), columns=["x1", "x2"])
    b = agreement.descriptor(party("bank", "guest", "telco"), columns=["x2", "x1"])
    assert a["schema"] != b["schema"] and a["digest"] == b["digest"]
    assert agreement.descriptor(party("bank", "guest", "telco"))["schema"] is None

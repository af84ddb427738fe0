"""Configuration errors name the key and the file; overrides and paths behave."""

from __future__ import annotations

import os

import pytest

from fedps.engine import config
from fedps.errors import ConfigError
from fedps.messaging.identity import generate_identity, load_identity

BASE = """
[job]
id = "j1"
[party]
name = "guest"
identity_key = "keys/guest.key"
[peers]
host = "ed25519:AAAA"
[kafka]
bootstrap_servers = "kafka1:9092,kafka2:9092"
"""


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "guest.toml"
    path.write_text(BASE)
    return path


def test_loads_resolves_paths_and_applies_overrides(conf, tmp_path):
    loaded = config.load(conf, ["ray.object_store_mb=512", "kafka.security_protocol=SASL_SSL",
                                "kafka.sasl_mechanism=SCRAM-SHA-512", "spark.master=yarn"])
    assert loaded.party.identity_key == str(tmp_path / "keys" / "guest.key")
    assert loaded.ray.object_store_mb == 512
    assert loaded.spark.master == "yarn"
    options = loaded.kafka.client_options()
    assert options["bootstrap_servers"] == ["kafka1:9092", "kafka2:9092"]
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"


def test_a_serving_section_is_left_to_fedps_serve_and_other_unknown_sections_are_refused(conf):
    conf.write_text(BASE + '[serving]\nlisten = "127.0.0.1:7000"\n')
    assert config.load(conf).job.id == "j1"   # `fedps run` and `fedps serve` read one party file
    conf.write_text(BASE + '[servng]\nlisten = "127.0.0.1:7000"\n')
    with pytest.raises(ConfigError, match="unknown key servng"):
        config.load(conf)


@pytest.mark.parametrize(
    "override, words",
    [
        ("kafka.bogus=1", ["kafka.bogus", "unknown key"]),
        ("channel.chunk_bytes='big'", ["channel.chunk_bytes", "must be int"]),
        ("channel.chunk_bytes=10", ["channel.chunk_bytes", "between"]),
        ("kafka.security_protocol='SASL_SSL'", ["kafka.sasl_mechanism"]),
        ("party.name='no spaces allowed'", ["party name"]),
        ("spark=3", ["spark", "must be a table"]),
    ],
)
def test_bad_key_is_named_with_its_file(conf, override, words):
    with pytest.raises(ConfigError) as error:
        config.load(conf, [override])
    for word in words + [str(conf)]:
        assert word in str(error.value)


def test_missing_file_and_missing_key_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    path = tmp_path / "c.toml"
    path.write_text("[job]\nid = 'x'\n")
    with pytest.raises(ConfigError, match=rf"missing key party in {path}"):
        config.load(path)
    path.write_text("[job\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_identity_key_readable_by_others_is_refused(tmp_path):
    key = tmp_path / "id.key"
    public = generate_identity(key)
    assert public.startswith("ed25519:") and (key.stat().st_mode & 0o777) == 0o600
    load_identity(key)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_identity(key)


def test_every_example_configuration_loads():
    from pathlib import Path

    examples = sorted(Path(__file__).parents[1].joinpath("conf").rglob("*.toml"))
    assert examples
    for path in examples:
        loaded = config.load(path)
        assert loaded.party.name and loaded.peers, path

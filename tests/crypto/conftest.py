"""Shared fixtures for the crypto tests: one small key pair per session (keygen is slow)."""

from __future__ import annotations

import os
import sys

import pytest

from fedps.engine.crypto import Decryptor, Encryptor, generate_keypair

KEY_BITS = 512


@pytest.fixture(scope="session")
def keypair():
    return generate_keypair(KEY_BITS)


@pytest.fixture(scope="session")
def other_keypair():
    return generate_keypair(KEY_BITS)


@pytest.fixture(scope="session")
def owner_enc(keypair):
    """The key owner's encryptor (CRT tables)."""
    pub, priv = keypair
    return Encryptor(pub, private_key=priv)


@pytest.fixture(scope="session")
def peer_enc(keypair):
    """A peer's encryptor under the same public key (no private key, no CRT)."""
    return Encryptor(keypair[0])


@pytest.fixture(scope="session")
def dec(keypair):
    return Decryptor(keypair[1])


@pytest.fixture(scope="session")
def crypto_spark(request):
    """The shared ``spark`` fixture when tests/conftest.py provides one, else a local[2] session."""
    try:
        return request.getfixturevalue("spark")
    except pytest.FixtureLookupError:
        pass
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("fedps-crypto-tests")
               .config("spark.ui.enabled", "false").getOrCreate())
    request.addfinalizer(session.stop)
    return session

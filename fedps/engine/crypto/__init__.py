"""Fast Paillier for fedps: phe-compatible keys, DJN fixed-base encryption with
CRT, batch CRT decryption, fixed-point encoding, packing and compression,
masking, ``X^T [[d]]``, a wire-format ciphertext vector, and Spark helpers.

Typical use (the key owner encrypts with CRT; the peer computes and sends back)::

    pub, priv = generate_keypair()
    enc, dec = Encryptor(pub, private_key=priv), Decryptor(priv)
    d = enc.encrypt(residuals)                      # owner -> peer: d.to_bytes()
    g = xt_d(X, CipherVector.from_bytes(blob, pub)) # peer
    sealed, mask = seal_for_owner(g, Encryptor(pub)) # compress, mask, re-randomise
    masked = dec.decrypt_exact(sealed)              # owner -> peer
    gradient = mask.remove(masked)                  # peer
"""

from fedps.engine.crypto.cipher import Decryptor, Encryptor
from fedps.engine.crypto.compress import Mask, add_mask, compress, seal_for_owner
from fedps.engine.crypto.encoding import FixedPoint, PackingLayout, capacity
from fedps.engine.crypto.interop import from_phe, to_phe
from fedps.engine.crypto.keys import PrivateKey, PublicKey, fingerprint, generate_keypair
from fedps.engine.crypto.matrix import xt_d
from fedps.engine.crypto.vector import CipherVector

__all__ = [
    "CipherVector", "Decryptor", "Encryptor", "FixedPoint", "Mask", "PackingLayout", "PrivateKey",
    "PublicKey", "add_mask", "capacity", "compress", "fingerprint", "from_phe", "generate_keypair",
    "seal_for_owner", "to_phe", "xt_d",
]

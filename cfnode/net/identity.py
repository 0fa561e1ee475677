"""A node's libp2p identity and the signing key of its DHT records (protocol version 2, docs/protocol.md).

One RSA key does both jobs: p2pd derives the node's peer id from it (`--identity-path`, or a temporary file
made here), and hivemind's `RSASignatureValidator` signs the node's records with it. The subkey of every record
a node writes is its *owner marker* `[owner:<ssh-rsa public key>]`; `peer_id_of_marker` derives the base58 peer
id from that public key exactly as libp2p (and `PeerID.from_identity`) does, so a reader knows which peer a
signed record belongs to without trusting anything the writer says.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from cfnode.errors import ConfigError

_MARKER_RE = re.compile(
    re.escape(RSASignatureValidator.PUBLIC_KEY_FORMAT).replace(b"_key_", rb"(ssh-rsa [A-Za-z0-9+/=]+)") + rb"\Z")
_SHA2_256_MULTIHASH = b"\x12\x20"  # multihash code 0x12 (sha2-256), digest length 32: libp2p ids of RSA keys


def load_private_key(path: str) -> RSAPrivateKey:
    """The RSA private key of a libp2p identity file (a `crypto_pb2.PrivateKey` holding PKCS#1 DER), as
    hivemind's RSAPrivateKey. A key of another type (Ed25519, ...) cannot sign hivemind records: ConfigError."""
    try:
        with open(path, "rb") as f:
            proto = crypto_pb2.PrivateKey.FromString(f.read())
    except OSError as e:
        raise ConfigError(f"cannot read the identity file {path}: {e}") from e
    except Exception as e:  # protobuf's DecodeError derives from Exception only
        raise ConfigError(f"{path} is not a libp2p identity file: {e}") from e
    if proto.key_type != crypto_pb2.KeyType.RSA:
        raise ConfigError(f"identity {path} holds a {crypto_pb2.KeyType.Name(proto.key_type)} key; cfnode signs its "
                          "DHT records with the identity key and needs an RSA one (cfnode and hivemind create RSA "
                          "identities: delete the file or pass another --identity-path)")
    try:
        der = serialization.load_der_private_key(proto.data, password=None)
    except ValueError as e:
        raise ConfigError(f"identity {path}: unreadable RSA key: {e}") from e
    if not isinstance(der, rsa.RSAPrivateKey):
        raise ConfigError(f"identity {path}: expected an RSA key, got {type(der).__name__}")
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind has no loader: restore it the way it unpickles
    key.__setstate__({"_private_key": proto.data})
    return key


def owner_marker(private_key: RSAPrivateKey) -> bytes:
    """The subkey of every record this key signs: `[owner:ssh-rsa ...]` (RSASignatureValidator.local_public_key)."""
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", private_key.get_public_key().to_bytes())


def marker_public_key(subkey: object) -> bytes | None:
    """The `ssh-rsa ...` public key of a subkey that is exactly one owner marker, else None."""
    match = _MARKER_RE.match(subkey) if isinstance(subkey, bytes) else None
    return None if match is None else match.group(1)


def is_owner_marker(subkey: object) -> bool:
    return marker_public_key(subkey) is not None


@functools.lru_cache(maxsize=4096)
def peer_id_of_marker(marker: bytes) -> str | None:
    """The base58 libp2p peer id of the RSA key in an owner marker; None if `marker` is not exactly one marker
    with a readable RSA key. Same derivation as `PeerID.from_identity`: sha2-256 multihash of the protobuf
    `PublicKey{RSA, DER SubjectPublicKeyInfo}`."""
    ssh_key = marker_public_key(marker)
    if ssh_key is None:
        return None
    try:
        public_key = serialization.load_ssh_public_key(ssh_key)
    except (ValueError, TypeError):
        return None
    if not isinstance(public_key, rsa.RSAPublicKey):
        return None
    der = public_key.public_bytes(encoding=serialization.Encoding.DER,
                                  format=serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return base58.b58encode(_SHA2_256_MULTIHASH + hashlib.sha256(encoded).digest()).decode()


@dataclass
class NodeIdentity:
    """The identity file p2pd runs with and the key that signs this node's records. `temporary`: made by
    `open_identity` for a node without --identity-path; `discard()` deletes it (p2pd reads it only at start)."""

    path: str
    private_key: RSAPrivateKey
    temporary: bool = False
    _tmpdir: str | None = field(default=None, repr=False)

    @property
    def marker(self) -> bytes:
        return owner_marker(self.private_key)

    @property
    def peer_id(self) -> str:
        peer_id = peer_id_of_marker(self.marker)
        assert peer_id is not None
        return peer_id

    def signature_validator(self) -> RSASignatureValidator:
        return RSASignatureValidator(self.private_key)

    def discard(self) -> None:
        """Delete a temporary identity (idempotent; a persistent one is never touched)."""
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def open_identity(identity_path: str | None) -> NodeIdentity:
    """The node's identity: the given file (created, RSA, mode 0400, if missing), or a fresh one in a private
    temporary directory (mode 0700) that the caller discards once the DHT is up (and at exit at the latest)."""
    if identity_path:
        if not os.path.exists(identity_path):
            os.makedirs(os.path.dirname(os.path.abspath(identity_path)), exist_ok=True)
            P2P.generate_identity(identity_path)
        return NodeIdentity(path=identity_path, private_key=load_private_key(identity_path))
    tmpdir = tempfile.mkdtemp(prefix="cfnode-identity-")  # mkdtemp: mode 0700, owned by us
    path = os.path.join(tmpdir, "identity.key")
    try:
        P2P.generate_identity(path)
        identity = NodeIdentity(path=path, private_key=load_private_key(path), temporary=True, _tmpdir=tmpdir)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    import atexit

    atexit.register(identity.discard)
    return identity


@contextlib.contextmanager
def temporary_identity() -> Iterator[NodeIdentity]:
    """`open_identity(None)` as a context manager (tests)."""
    identity = open_identity(None)
    try:
        yield identity
    finally:
        identity.discard()


__all__ = ["NodeIdentity", "is_owner_marker", "load_private_key", "marker_public_key", "open_identity", "owner_marker",
           "peer_id_of_marker", "temporary_identity"]

"""`--peers` values: repeated, comma or space separated multiaddrs that must end in `/p2p/<peer id>` after an
address (what hivemind's initial_peers need). A bad value is one line naming `--peers` and the value."""

from __future__ import annotations

from cfnode.errors import ConfigError


def split_peers(peers: tuple[str, ...]) -> tuple[str, ...]:
    """Accept repeated --peers, and also comma/space separated values (env vars, pasted hivemind lists)."""
    out: list[str] = []
    for item in peers:
        out.extend(p for p in item.replace(",", " ").split() if p)
    return tuple(out)


PEERS_SHAPE = "/ip4/HOST/tcp/PORT/p2p/PEER_ID"


def parse_peers(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """--peers values (repeated, comma or space separated) as multiaddrs that end in `/p2p/<peer id>` after an
    address, which hivemind's initial_peers need; ConfigError (one line naming --peers and the value) for the
    first that is not."""
    from hivemind.utils.multiaddr import Multiaddr  # hivemind 1.1.12 vendors py-multiaddr here

    peers = split_peers(tuple(values))
    if not peers:
        raise _bad_peer(" ".join(values), "no address given")
    for value in peers:
        try:
            protocols = [p.name for p in Multiaddr(value).protocols()]
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's value, never a traceback
            raise _bad_peer(value, _parse_reason(e)) from None
        if "p2p" not in protocols:
            raise _bad_peer(value, "no /p2p/PEER_ID part (the peer id that `cfnode bootstrap` prints)")
        if protocols[-1] != "p2p":
            raise _bad_peer(value, "/p2p/PEER_ID must come last")
        if len(protocols) < 2:
            raise _bad_peer(value, "no address before /p2p/PEER_ID")
    return peers


def _parse_reason(e: Exception) -> str:
    """py-multiaddr's StringParseError without the value it repeats ('protocol ip4: <message>')."""
    message = getattr(e, "message", None)
    if not isinstance(message, str):
        return str(e) or type(e).__name__
    protocol = getattr(e, "protocol", None)
    return f"protocol {protocol}: {message}" if protocol else message


def _bad_peer(value: str, reason: str) -> ConfigError:
    reason = " ".join(str(reason).split())  # one line, whatever the parser said
    return ConfigError(f"--peers {value!r} is not a valid multiaddr (expected {PEERS_SHAPE}): {reason}")

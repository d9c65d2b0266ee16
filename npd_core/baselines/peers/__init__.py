"""External peers: other projects' trainers run on our world, for ``npd bench --peers``.

Each peer lives in its own module that imports its library at the top; this package imports
none of them, so the base install never needs a peer. ``require`` checks the extra is there and
names the install command when it is not.
"""

from __future__ import annotations

import importlib.util

from npd_core.errors import ConfigError

PEERS = {"trl": "trl"}  # peer name → the module it needs
INSTALL = "pip install -e '.[peers]'"


def require(peer: str) -> None:
    """Raise a one-line ``ConfigError`` naming the fix when ``peer`` is unknown or not installed."""
    if peer not in PEERS:
        raise ConfigError(f"--peers: unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    if importlib.util.find_spec(PEERS[peer]) is None:
        raise ConfigError(
            f"--peers {peer} needs the optional extra 'peers' ({PEERS[peer]} is not installed); "
            f"install it with `{INSTALL}`"
        )

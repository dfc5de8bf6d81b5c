"""Whether the Hugging Face hub can be asked for data from here: decided once per process, in about a second.

`datasets.load_dataset` retries an unreachable hub five times with back-off (about 25 s, a warning per try) before
it fails. A machine without network would pay that on every run for a source it cannot get, so the data sources
ask here first and fall back (a local copy) or skip at once. An offline mode the user set (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) is honoured without touching the network.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.request
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 1.5  # a reachable hub answers a TCP connect in well under this, from anywhere
_TRUE = ("1", "on", "yes", "true")


def offline_mode_requested() -> bool:
    """The user asked for offline mode (the variables huggingface_hub and datasets read)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_address() -> tuple[str, int]:
    """(host, port) a hub request connects to first: the HTTPS proxy when one is set, else the hub endpoint."""
    url = urllib.request.getproxies().get("https") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    parsed = urlparse(url if "//" in url else f"//{url}")
    return parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)


@functools.cache
def _connects(host: str, port: int) -> bool:
    """A TCP connection to host:port opens within CONNECT_TIMEOUT_S, name lookup included (getaddrinfo takes no
    timeout, so the attempt runs in a thread that is abandoned when it is late). Asked once per process."""
    opened = threading.Event()

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            opened.set()
        except OSError:
            pass

    threading.Thread(target=attempt, daemon=True).start()
    return opened.wait(CONNECT_TIMEOUT_S)


def hub_reachable() -> bool:
    """False when offline mode is requested or the hub (or the proxy to it) does not accept a connection within
    CONNECT_TIMEOUT_S."""
    if offline_mode_requested():
        return False
    host, port = hub_address()
    return bool(host) and _connects(host, port)

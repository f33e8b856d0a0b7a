"""Whether the Hugging Face Hub can be asked for a model, decided in a few seconds.

Without a network, transformers and huggingface_hub retry every request with backoff:
a mistyped model name took 50 s and 22 lines of retry messages before failing. nnexp
asks once, quickly, whether the hub (or the proxy in front of it) accepts a connection,
and a model that is not in the local hub cache is then refused at once.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request

CHECK_S = 3.0  # the longest the check takes, name resolution included


def offline_by_choice() -> bool:
    """HF_HUB_OFFLINE is set: transformers reads only the local cache (and fails fast)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _address() -> tuple[str, int, str]:
    """(host, port, what) the hub is reached through: a configured proxy, else the endpoint."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    bypass = urllib.request.proxy_bypass(endpoint.hostname or "") if proxies else True
    proxy = None if bypass else proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy:
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return parts.hostname or "", parts.port or 80, f"the proxy {parts.hostname}"
    default = 443 if endpoint.scheme == "https" else 80
    return endpoint.hostname or "", endpoint.port or default, endpoint.hostname or constants.ENDPOINT


def unreachable() -> str | None:
    """Why the hub cannot be reached from here (None when it accepts a connection).
    Decided within CHECK_S seconds: the attempt runs in a thread, since name
    resolution has no timeout of its own."""
    host, port, what = _address()
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=CHECK_S).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error.strerror or str(error) or type(error).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name="nnexp-hub-check")
    thread.start()
    thread.join(CHECK_S)
    if not outcome:
        return f"no answer from {what} within {CHECK_S:.0f} s"
    return None if outcome[0] is None else f"cannot connect to {what}: {outcome[0]}"


def is_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds the model's config (it was downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id or cache is simply not cached
        return False

"""Whether the Hugging Face Hub can be reached, asked once in a few seconds, and a way to read its cache only.

Offline (a cluster's compute nodes often are), ``huggingface_hub`` retries each download five times before it gives
up: about 20 s where names do not resolve, minutes where connections time out. The transformer recipes
(:mod:`~lightning_adalabel.examples.recipes.huggingface`) and timm's pretrained weights
(:func:`~lightning_adalabel.examples.recipes.vision.build_timm_model`) ask here first and, if the Hub cannot be
reached, read the local cache only, as ``HF_HUB_OFFLINE=1`` does. ``huggingface_hub`` is imported only when asked
(it comes with ``transformers`` and with ``timm``).
"""

import contextlib
import functools
import socket
import urllib.parse
import urllib.request
from typing import Iterator, Optional

# Seconds to wait for a TCP connection to the Hub (or to the proxy the environment names) before reading the cache only.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_unreachable_reason() -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached (``"huggingface.co:443: Connection refused"``), or None when it
    can, or when ``HF_HUB_OFFLINE`` is set (then nothing tries the network). Asked once per process."""
    from huggingface_hub import constants

    return None if constants.HF_HUB_OFFLINE else _probe_connection(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _probe_connection(url: str) -> Optional[str]:
    """A TCP connection to ``url``'s host, or to the proxy that the environment sets for it, within
    ``HUB_PROBE_TIMEOUT_S`` seconds: None if it opens, else the reason."""
    target = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:  # refused, unresolvable name, no route, timed out
        return f"{address[0]}:{address[1]}: {error.strerror or error}"
    return None


@contextlib.contextmanager
def cache_only(enabled: bool = True) -> Iterator[None]:
    """Inside, ``huggingface_hub`` downloads nothing and reads its local cache, as under ``HF_HUB_OFFLINE=1``.

    For loaders that take no ``local_files_only`` (``timm.create_model``): ``huggingface_hub`` reads this setting at
    each download, while the environment variable is read once, when it is imported.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline

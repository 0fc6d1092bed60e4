"""huggingface_hub's and the HTTP stacks' errors mapped onto edgepack's error tree (build side).

Every message names the repo, revision and endpoint, and the hint says what to do; the order
of the checks matters (see :func:`_fetch_error`). Works with huggingface_hub 0.36 (requests)
and 1.x/2.x (httpx).
"""

from __future__ import annotations

import os
from typing import Any

from edgepack.errors import BuildError, FetchError


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of whichever HTTP stack huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        found.append(requests.RequestException)
    except ImportError:
        pass
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
            found.append(module.TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


# Errors of a response body that stopped early, by class name across HTTP stacks: requests'
# ChunkedEncodingError, urllib3's ProtocolError/IncompleteRead, httpx's RemoteProtocolError and
# ReadError. They differ from a refused connection: the hub was reached, the link died.
_BROKE_OFF = frozenset({"ChunkedEncodingError", "IncompleteRead", "ProtocolError",
                        "RemoteProtocolError", "ReadError"})


def _broke_off(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return False
        if type(seen).__name__ in _BROKE_OFF:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _fetch_error(e: BaseException, repo_id: str, revision: str, endpoint: str,
                 filename: str | None = None) -> FetchError | BuildError:
    """Translate a huggingface_hub or transport error into edgepack's tree, naming the value.

    Order matters: GatedRepoError subclasses RepositoryNotFoundError, and LocalEntryNotFoundError
    subclasses EntryNotFoundError (0.36 and 2.x alike).
    """
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}"
    if isinstance(e, hf.GatedRepoError):
        return FetchError(
            f"model {repo_id} is gated and this request has no access to it",
            hint=f"accept the licence on {endpoint}/{repo_id}, then set HF_TOKEN to a token "
                 "of the account that accepted it")
    if isinstance(e, hf.RepositoryNotFoundError):
        return FetchError(
            f"model repo {repo_id!r} was not found on {endpoint}",
            hint="check the id (org/name); for a private repo set HF_TOKEN to a token with "
                 "read access; HF_ENDPOINT selects the hub")
    if isinstance(e, hf.RevisionNotFoundError):
        return FetchError(
            f"revision {revision!r} was not found in {repo_id}",
            hint=f"use a branch, tag or full commit sha; list them with "
                 f"huggingface_hub.HfApi().list_repo_refs({repo_id!r}), "
                 f"or open {endpoint}/{repo_id}/tree/main")
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return FetchError(
            f"{where} is not in the local cache and the hub cannot be used "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}, "
            f"HF_ENDPOINT={endpoint})",
            hint="pull it once while online (unset HF_HUB_OFFLINE), or check that HF_ENDPOINT "
                 "is reachable; HF_HUB_CACHE/HF_HOME choose the cache")
    if isinstance(e, hf.EntryNotFoundError):
        return FetchError(
            f"file {filename or '?'} does not exist in {where}",
            hint="the repo does not hold the file edgepack needs; check the model id and revision")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return FetchError(f"the hub at {endpoint} answered HTTP {status} for {where}: "
                          f"{str(e).splitlines()[0]}",
                          hint="retry later; check HF_ENDPOINT and HF_TOKEN")
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:  # ENOSPC
        return BuildError(f"the disk filled up while downloading {where}: {e}",
                          hint="free some space or point HF_HUB_CACHE at a larger disk")
    if _broke_off(e):
        return FetchError(
            f"the connection to the hub at {endpoint} dropped while downloading "
            f"{filename + ' of ' if filename else ''}{where} ({type(e).__name__}: {e})",
            hint="retry the command; huggingface_hub resumes the partial file from the cache")
    if isinstance(e, transport_errors()):
        return FetchError(
            f"could not reach the hub at {endpoint} for {where} ({type(e).__name__}: {e})",
            hint="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache")
    return FetchError(f"download of {where} from {endpoint} failed: {e}",
                      hint="retry the command; a partial download resumes from the cache")


def hub_call(fn: Any, *args: Any, _ctx: tuple[str, str, str, str | None], **kwargs: Any) -> Any:
    """Run a huggingface_hub call, mapping its errors (edgepack errors pass through)."""
    from huggingface_hub import errors as hf

    mapped: tuple[type[BaseException], ...] = (
        hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled,
        hf.EntryNotFoundError, OSError, *transport_errors(),
    )
    try:
        return fn(*args, **kwargs)
    except mapped as e:
        raise _fetch_error(e, *_ctx) from e

"""The update repository as python-tuf's ngclient verifies it: refresh, look up and fetch
signed targets, with ngclient's errors mapped onto edgepack's error tree.

The security decisions are python-tuf's (signatures, thresholds, expiry, rollback and freeze
attacks); this module only wires ngclient to the agent's HTTP client and state directory.

Device side: tuf, urllib3 (through the fetcher), standard library and edgepack's device
modules only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tuf.api import exceptions as tuf_exc

from edgepack.errors import EdgepackError, FetchError, IntegrityError
from edgepack.ota.agent.fetcher import HttpFetcher, TufFetcher
from edgepack.ota.agent.state import StateDir
from edgepack.ota.release import stored_target_path

T = TypeVar("T")


def tuf_call(fn: Callable[..., T], *args: Any) -> T:
    """Run an ngclient call, mapping its errors onto edgepack's tree."""
    try:
        return fn(*args)
    except EdgepackError:
        raise
    except tuf_exc.DownloadLengthMismatchError as e:
        raise IntegrityError(f"repository metadata larger than allowed: {e}") from e
    except tuf_exc.DownloadError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, EdgepackError):
            raise cause from e
        raise FetchError(f"cannot fetch update metadata: {e or type(e).__name__}",
                         hint="check --repo-url and the network; the agent retries later") from e
    except tuf_exc.RepositoryError as e:
        raise IntegrityError(
            f"update metadata rejected: {type(e).__name__}: {e}",
            hint="the repository is stale, tampered with or signed by unknown keys; "
            "nothing was installed",
        ) from e


class SignedRepo:
    """One refresh's view of the repository at ``repo_url``, trusted from the state
    directory's root metadata and fetched through ``http``."""

    def __init__(self, state: StateDir, repo_url: str, http: HttpFetcher) -> None:
        from tuf.ngclient import Updater

        self.state = state
        self.base = repo_url.rstrip("/")
        self.http = http
        self.updater = tuf_call(lambda: Updater(
            str(state.metadata), f"{self.base}/metadata/", None, f"{self.base}/targets/",
            fetcher=TufFetcher(http), bootstrap=state.trust.read_bytes()))

    def refresh(self) -> None:
        """Fetch and verify the top-level metadata (raises IntegrityError / FetchError)."""
        tuf_call(self.updater.refresh)

    def target_info(self, path: str) -> Any:
        """The signed TargetFile for ``path``, or None when the repository does not sign it."""
        return tuf_call(self.updater.get_targetinfo, path)

    def fetch(self, path: str) -> bytes:
        """The bytes of the signed target ``path``, checked against its signed length and
        sha256 (IntegrityError when it is not signed or does not match)."""
        info = self.target_info(path)
        if info is None:
            raise IntegrityError(f"{path} is not in the repository's signed targets")
        url = f"{self.base}/targets/{stored_target_path(path, info.hashes['sha256'])}"
        data = self.http.download_bytes(url, info.length)
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as e:
            raise IntegrityError(
                f"{url} does not match its signed length/sha256: {e}",
                hint="the repository or a proxy serves a tampered file; it was rejected",
            ) from e
        return data

    def channels(self) -> list[str]:
        """The channels of the repository, from the targets metadata ngclient verified and
        stored during this refresh."""
        from tuf.api.metadata import Metadata, Targets

        try:
            md = Metadata[Targets].from_file(str(self.state.metadata / "targets.json"))
        except Exception:  # noqa: BLE001 - only used to word an error message
            return []
        return sorted(p[len("channels/"):-len(".json")] for p in md.signed.targets
                      if p.startswith("channels/") and p.endswith(".json"))

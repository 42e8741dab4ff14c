"""One error hierarchy; every message says what went wrong, where, and what to do next."""

from __future__ import annotations


class FlwrHpcError(Exception):
    """Base class of every error flwr-hpc raises on purpose."""


class ConfigError(FlwrHpcError):
    """A configuration file or override is malformed.

    The message names the file and the dotted key, e.g.
    ``conf/federation/local.yaml: sites.alpha.clients: expected a positive integer, got 'two'``.
    """

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class InvalidObjectIdError(FlwrHpcError):
    """An object id is not a lowercase hex sha256 (refused before touching any path)."""

    def __init__(self, object_id: object) -> None:
        self.object_id = object_id
        shown = repr(object_id)[:80]
        super().__init__(
            f"invalid object id {shown}: expected 64 lowercase hex characters (sha256)")


class PayloadIntegrityError(FlwrHpcError):
    """The bytes of an object do not match its sha256 id; they were not used."""

    def __init__(self, object_id: str, actual: str, where: str) -> None:
        self.object_id = object_id
        self.actual = actual
        self.where = where
        super().__init__(
            f"payload object {object_id[:16]}… in {where} failed its sha256 check "
            f"(content hashes to {actual[:16]}…); the object was rejected and quarantined"
        )


class PayloadMissingError(FlwrHpcError):
    """An object a task needs is not in the store it was staged to."""

    def __init__(self, object_id: str, where: str) -> None:
        self.object_id = object_id
        self.where = where
        super().__init__(f"payload object {object_id[:16]}… is missing from {where}")


class RemoteTaskError(FlwrHpcError):
    """The site-worker function raised at the site; ``remote_traceback`` holds its text."""

    def __init__(self, site: str, remote_traceback: str) -> None:
        self.site = site
        self.remote_traceback = remote_traceback
        last = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else ""
        super().__init__(f"task failed at site '{site}': {last}")


class WorkerLostError(FlwrHpcError):
    """The process running a task died (killed, out of memory, node failure)."""

    def __init__(self, site: str, detail: str) -> None:
        self.site = site
        super().__init__(f"worker process at site '{site}' was lost: {detail}")


class ServiceError(FlwrHpcError):
    """The HPC SuperLink service could not be started, reached or stopped."""


class GlobusServiceError(FlwrHpcError):
    """A Globus service (Compute, Transfer, Auth) refused or failed a request for a site."""

    def __init__(self, site: str | None, problem: str) -> None:
        super().__init__(f"site '{site}': {problem}" if site else f"Globus: {problem}")
        self.site = site
        self.problem = problem

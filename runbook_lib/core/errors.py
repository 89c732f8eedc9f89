"""The runbook's exceptions: one clear message each, with secrets masked before anyone sees them.

Every error a notebook cell can end with derives from `RunbookError`, so a cell fails with one
readable line (what failed, and what to do) instead of a library traceback.
"""

from __future__ import annotations


class RunbookError(Exception):
    """Base of the runbook's errors; the message is redacted when the error is created."""

    def __init__(self, message: str):
        from runbook_lib.core.secrets import redact

        super().__init__(redact(message))

    @property
    def message(self) -> str:
        return str(self)


class SettingsError(RunbookError):
    """A setting is missing or malformed; the message names it and where to set it."""


class ParameterError(RunbookError):
    """A notebook parameter has a value of the wrong kind; nothing was changed."""


class ChecksFailed(RunbookError):
    """A step ended with failing checks; `failed` holds their ids."""

    def __init__(self, step: str, failed: list[tuple[str, str]]):
        self.step = step
        self.failed = [check_id for check_id, _ in failed]
        listing = "; ".join(f"{cid} ({title})" for cid, title in failed)
        super().__init__(f"step {step!r}: {len(failed)} check(s) failed: {listing}")


class NotConfirmed(RunbookError):
    """A change was about to be applied without an approval; nothing was applied."""


class ServiceError(RunbookError):
    """A call to an external service failed; `service` names it, `status` is the HTTP status if any."""

    def __init__(self, service: str, message: str, status: int | None = None):
        self.service = service
        self.status = status
        super().__init__(f"{service}: {message}")


class PrefectApiError(ServiceError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__("Prefect API", message, status)


class SupabaseApiError(ServiceError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__("Supabase Management API", message, status)


class DatabaseError(ServiceError):
    def __init__(self, message: str):
        super().__init__("database", message)


class GitError(ServiceError):
    def __init__(self, message: str):
        super().__init__("git", message)


class FlowSourceError(RunbookError):
    """The flow's source cannot be analysed (syntax error, entrypoint not found...)."""


class RequirementError(RunbookError):
    """A pip requirement string is not valid."""


class ResultsError(RunbookError):
    """Step results are missing or unreadable."""

"""Why an operation failed at a site, as a kind the coordinator acts on; the text is for people.

Before this, the coordinator matched words of messages written in other layers ("no training session" from the
site worker, "node unavailable" from the Flower caller). Now each layer that detects a failure gives it a kind, and
the kind crosses the network beside the message.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """What went wrong with one site's answer to one operation."""

    #: the site has no state for this operation (its worker restarted, or the op came out of order): e.g. a training
    #: round without a training session; the coordinator may rebuild it (``train_init`` with ``continue_training``)
    SESSION_LOST = "session_lost"
    #: Flower says the site's node went away (it may come back: treated like a lost session)
    NODE_UNAVAILABLE = "node_unavailable"
    #: the site refuses the job: another task, configuration or fold than it was started for, or a name that is
    #: not the one its key is registered under
    REFUSED = "refused"
    #: the site refused to install or run the server's app (not the app it has installed)
    REFUSED_APP = "refused_app"
    #: the request does not have the operation's shape (a fault of the sender, or an unknown operation)
    BAD_REQUEST = "bad_request"
    #: the site's data or the job's options are unusable (a ValueError at the site: names the case and the problem)
    BAD_INPUT = "bad_input"
    #: anything else that failed while the site did the work (details in the site's log)
    FAILED = "failed"
    #: the reply could not be decoded, or does not have the operation's shape
    MALFORMED_REPLY = "malformed_reply"
    #: the coordinator checked the reply and refused it (an update out of bounds, a count that changed, ...)
    REJECTED = "rejected"
    #: no reply within the operation's time limit
    TIMEOUT = "timeout"
    #: another error of the transport (a Flower error code other than the ones above)
    TRANSPORT = "transport"

    @property
    def trainer_lost(self) -> bool:
        """The site has (probably) lost its trainer and can be asked to rebuild it from its own checkpoint."""
        return self in (ErrorKind.SESSION_LOST, ErrorKind.NODE_UNAVAILABLE)


class OpError(RuntimeError):
    """Raised by a site's operation to fail it with a kind; the message is what the coordinator shows."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SiteError(str):
    """One site's failure of one operation, as the coordinator holds it: the message (a ``str``, so it is shown,
    logged and written to JSON as before) with its :attr:`kind`."""

    kind: ErrorKind

    def __new__(cls, message: str, kind: ErrorKind) -> "SiteError":
        self = super().__new__(cls, message)
        self.kind = kind
        return self

    def __reduce__(self) -> tuple:  # copy/pickle keep the kind
        return (SiteError, (str(self), self.kind))

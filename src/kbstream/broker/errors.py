"""Exceptions of the broker layer (:mod:`kbstream.broker`).

Each class subclasses :class:`kbstream.errors.KbStreamError` and the builtin that callers
would naturally catch (``ConnectionError``, ``TimeoutError``, ``ValueError``,
``RuntimeError``)::

    BrokerError
    +-- BrokerConfigError (ValueError)      bad KARABO_BROKER / topic / instance settings
    +-- BrokerConnectionError (ConnectionError)   no broker reachable
    +-- InvalidInstanceId (ValueError)      an id Karabo does not allow
    +-- InvalidSlotName (ValueError)        an empty slot name or one with a space
    +-- InvalidOutputId (ValueError)        not "<instanceId>:<channel>"
    +-- InstanceIdInUse                     the slotPing self-check got an answer
    +-- RequestTimeout (TimeoutError)       no reply in time
    +-- RemoteError                         the remote slot answered with an error
    +-- MessageError (ValueError)           a malformed broker message
    +-- ReconfigureError (ValueError)       slotReconfigure of a property that may not change
    +-- NotStartedError (StateError)        wrong life-cycle state (not started, closed, ...)
"""

from ..errors import KbStreamError, StateError

__all__ = [
    "BrokerError",
    "BrokerConfigError",
    "BrokerConnectionError",
    "InvalidInstanceId",
    "InvalidSlotName",
    "InvalidOutputId",
    "InstanceIdInUse",
    "RequestTimeout",
    "RemoteError",
    "MessageError",
    "ReconfigureError",
    "NotStartedError",
]


class BrokerError(KbStreamError):
    """Base class of every error of the broker layer."""


class BrokerConfigError(BrokerError, ValueError):
    """``KARABO_BROKER`` / ``KARABO_BROKER_TOPIC`` (or the explicit arguments) are invalid,
    or an instance is set up wrongly (a heartbeat interval that is not a positive number,
    an output channel whose connection details are not a Hash)."""


class BrokerConnectionError(BrokerError, ConnectionError):
    """No broker of the configured list could be reached.

    Attributes
    ----------
    urls : list of str
        The broker URLs tried, without passwords.
    """

    def __init__(self, message, urls=()):
        super().__init__(message)
        self.urls = list(urls)


class InvalidInstanceId(BrokerError, ValueError):
    """An instance id with characters other than ``A-Z a-z 0-9 _ / -``."""


class InvalidSlotName(BrokerError, ValueError):
    """A slot name that is not a string, is empty or contains a space."""


class InvalidOutputId(BrokerError, ValueError):
    """An output channel id that is not ``"<instanceId>:<channel>"`` (or ``@``)."""


class InstanceIdInUse(BrokerError):
    """Another instance with the same id answered the start-up ``slotPing`` self-check.

    Attributes
    ----------
    instance_id : str
    host : str or None
        The ``host`` of the other instance's instanceInfo, when it sent one.
    """

    def __init__(self, message, instance_id, host=None):
        super().__init__(message)
        self.instance_id = instance_id
        self.host = host


class RequestTimeout(BrokerError, TimeoutError):
    """No reply within the timeout (the target may simply be offline: the broker drops
    messages nobody is bound for).

    Attributes
    ----------
    instance_id, slot : str
    timeout : float
    """

    def __init__(self, message, instance_id, slot, timeout):
        super().__init__(message)
        self.instance_id = instance_id
        self.slot = slot
        self.timeout = timeout


class RemoteError(BrokerError):
    """The remote slot answered with an error reply (header ``error = true``).

    Attributes
    ----------
    instance_id, slot : str
    remote_message, details : str
        ``a1`` and ``a2`` of the error reply.
    """

    def __init__(self, message, instance_id, slot, remote_message="", details=""):
        super().__init__(message)
        self.instance_id = instance_id
        self.slot = slot
        self.remote_message = remote_message
        self.details = details


class MessageError(BrokerError, ValueError):
    """A broker message that is not header archive + body archive, or lacks header keys."""


class ReconfigureError(BrokerError, ValueError):
    """``slotReconfigure`` asked for a change kbstream refuses (a property that is not
    reconfigurable, an unknown one, or a bad value): the caller gets an error reply."""


class NotStartedError(BrokerError, StateError):
    """A broker instance or transport used in the wrong life-cycle state: not started
    (or already closed), or ``start()`` twice (a :class:`kbstream.StateError`, hence a
    ``RuntimeError``)."""

"""Output-channel resolution over the broker, for kbstream input channels.

An input configured with ``connectedOutputChannels=["<instanceId>:<channel>", ...]`` asks
each output's instance with ``slotGetOutputChannelInformation`` (docs/wire/karabo-broker-amqp.md, section 11):
request ``a1 = {channelId, processId INT32, hostname}``, 3 s timeout; reply
``a1 = {success BOOL, info {connectionType, hostname, port UINT32, memoryLocation}}``.

:class:`OutputResolver` is the callable an input channel takes as ``resolver``: it returns
the connection info (``outputChannelString`` added, host name resolved) or None while the
output is not available; the input retries on its timer and
:meth:`BrokerInstance.add_input_channel` triggers an immediate retry when the output's
instance announces itself.

Threads: a resolver is called from the input channels' threads (it blocks there for at
most its timeout); :meth:`OutputResolver.renew` runs in the instance's worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading

from kbhash import Hash, HashType

from .errors import BrokerError, InvalidOutputId, MessageError, RemoteError, RequestTimeout
from .protocol import split_output_id

__all__ = ["OutputResolver", "resolve_host", "split_output_id"]

log = logging.getLogger("kbstream.broker.resolver")


def resolve_host(hostname: str, *, own_hostname: str | None = None) -> str | None:
    """The address to connect to for an output's ``hostname``, or None if unresolvable.

    IP addresses are returned as they are. Names are looked up (IPv4 preferred, as the C++
    output listens on IPv4); the own machine's name falls back to ``127.0.0.1`` when the
    name service does not know it (common in containers). A C++ output announces its
    machine's host name by default, so the name must resolve on the input's side.
    """
    if not hostname:
        return None
    try:
        ipaddress.ip_address(hostname)
        return hostname
    except ValueError:
        pass
    own = own_hostname or socket.gethostname()
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        infos = []
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    if v4:
        return v4[0]
    if v6:
        return v6[0]
    if hostname in (own, own.split(".")[0], "localhost"):
        return "127.0.0.1"
    return None


class _Renewed(Exception):
    """Internal: a pending request is re-sent because its target announced itself."""


SLOT = "slotGetOutputChannelInformation"


def info_request(channel, pid, hostname) -> Hash:
    """The argument of ``slotGetOutputChannelInformation`` for output ``channel``, asked by
    process ``pid`` on ``hostname`` (Karabo's field names and types)."""
    arg = Hash()
    arg.set("channelId", channel, type=HashType.STRING)
    arg.set("processId", pid & 0x7FFFFFFF, type=HashType.INT32)
    arg.set("hostname", hostname, type=HashType.STRING)
    return arg


def connection_details(a1, output_id, own_hostname) -> Hash:
    """The connection info an input needs, from the reply ``a1`` (``{success, info}``) of
    ``slotGetOutputChannelInformation`` for ``output_id``: ``connectionType`` tcp,
    ``hostname`` (resolved to an address), ``port`` (UINT32), ``memoryLocation`` remote,
    ``outputChannelString``.

    Raises
    ------
    RemoteError
        The instance has no such output channel (``success`` False).
    MessageError
        Anything else that is not a usable answer: not a Hash, ``success`` not a BOOL,
        no ``info`` Hash, a connection type other than tcp, a bad port, a host that does
        not resolve.
    """
    iid, channel = split_output_id(output_id)
    where = f"{iid}.{SLOT}"
    if not isinstance(a1, Hash):
        raise MessageError(f"{where} answered {type(a1).__name__}, not a Hash")
    success = a1.get("success")
    if success is False:
        raise RemoteError(f"{iid} has no output channel {channel!r}", iid, SLOT,
                          "no such output channel")
    if success is not True:
        raise MessageError(f"{where} answered success={success!r}, not a BOOL")
    info = a1.get("info")
    if not isinstance(info, Hash):
        raise MessageError(f"{where} answered info={info!r}, not a Hash")
    kind = info.get("connectionType", "tcp")
    if kind != "tcp":
        raise MessageError(f"{where}: connectionType {kind!r} is not supported (only tcp)")
    port = info.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise MessageError(f"{where}: bad port {port!r}")
    host = info.get("hostname")
    address = resolve_host(host, own_hostname=own_hostname) if isinstance(host, str) else None
    if address is None:
        raise MessageError(f"{where}: cannot resolve the output's host {host!r}")
    out = Hash()
    out.set("connectionType", "tcp", type=HashType.STRING)
    out.set("hostname", address, type=HashType.STRING)
    out.set("port", int(port), type=HashType.UINT32)
    out.set("memoryLocation", "remote", type=HashType.STRING)
    out.set("outputChannelString", output_id, type=HashType.STRING)
    return out


class OutputResolver:
    """``resolver(output_id) -> Hash | None`` on a :class:`BrokerInstance`.

    Parameters
    ----------
    instance : BrokerInstance
    timeout : float
        Request timeout (Karabo: 3 s).
    """

    def __init__(self, instance, timeout=3.0):
        self.instance = instance
        self.timeout = timeout
        self._lock = threading.Lock()
        self._inflight = {}  # instance id -> set of futures

    def renew(self, instance_id):
        """``instance_id`` just announced itself: re-send the requests still waiting for it.

        A request sent while the instance was offline was dropped by the broker and would
        only time out after 3 s; asking again at once makes the connection follow the
        announcement within milliseconds (as C++ inputs do).
        """
        with self._lock:
            futures = list(self._inflight.get(instance_id, ()))
        for fut in futures:
            if not fut.done():
                # forgets the pending request too, so renewals leave nothing behind
                fut.abandon(_Renewed())

    def request_info(self, output_id: str) -> Hash:
        """The raw reply ``a1`` (``{success, info}``) for ``output_id``.

        Raises
        ------
        RequestTimeout, RemoteError, InvalidOutputId, NotStartedError
        """
        iid, channel = split_output_id(output_id)
        arg = info_request(channel, self.instance.pid, self.instance.hostname)
        for _ in range(4):  # at most a few renewals: announcements do not come in storms
            fut = self.instance.request_async(iid, "slotGetOutputChannelInformation", arg,
                                              timeout=self.timeout)
            with self._lock:
                self._inflight.setdefault(iid, set()).add(fut)
            try:
                reply = fut.wait(self.timeout + 1.0)
                break
            except _Renewed:
                continue
            finally:
                with self._lock:
                    pending = self._inflight.get(iid)
                    if pending is not None:
                        pending.discard(fut)
                        if not pending:
                            del self._inflight[iid]
        else:
            raise RequestTimeout(f"{iid} kept announcing itself without answering",
                                 iid, "slotGetOutputChannelInformation", self.timeout)
        if not reply or not isinstance(reply[0], Hash):
            raise RemoteError(f"{iid}.slotGetOutputChannelInformation gave no Hash",
                              iid, "slotGetOutputChannelInformation")
        return reply[0]

    def __call__(self, output_id: str):
        """Connection info for ``output_id`` or None (offline, no such channel, bad reply).

        The returned Hash has ``connectionType``, ``hostname`` (resolved to an address),
        ``port`` (UINT32), ``memoryLocation`` ``"remote"`` and ``outputChannelString``.
        """
        try:
            a1 = self.request_info(output_id)
        except InvalidOutputId as e:
            log.error("%s", e)
            return None
        except RequestTimeout:
            log.info("%s: no answer yet from the instance of output %s (offline?)",
                     self.instance.instance_id, output_id)
            return None
        except RemoteError as e:
            log.warning("%s: asking for output %s failed: %s", self.instance.instance_id,
                        output_id, e.remote_message or e)
            return None
        except BrokerError as e:
            log.warning("%s: cannot ask for output %s: %s", self.instance.instance_id,
                        output_id, e)
            return None
        try:
            return connection_details(a1, output_id, self.instance.hostname)
        except (RemoteError, MessageError) as e:
            log.warning("%s: %s", self.instance.instance_id, e)
            return None

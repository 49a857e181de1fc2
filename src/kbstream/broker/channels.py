"""The pipeline channels an instance speaks for on the broker.

One job: keep the output channels whose connection details the instance serves
(``slotGetOutputChannelInformation``, ``slotGetOutputChannelNames``; docs/wire/karabo-broker-amqp.md, section
11) and the input channels it reconnects when the instance of one of their outputs
announces itself; and make the :class:`~kbstream.broker.resolver.OutputResolver` the
inputs use.

Threads: the slots and :meth:`Channels.instance_announced` run in the instance's worker
thread; channels are added from any thread (before ``start()``, so that the first requests
after the announcement find them); the resolver is called from the input channels'
threads.
"""

from __future__ import annotations

import logging
import threading

from kbhash import Hash, HashType, Schema

from . import codec
from .errors import BrokerConfigError, ReconfigureError
from .karabo_channels import output_parameters
from .protocol import instance_of_output
from .resolver import OutputResolver

__all__ = ["Channels", "connection_details"]

log = logging.getLogger("kbstream.broker")


def connection_details(source) -> Hash:
    """``{connectionType, hostname, port UINT32, ...}`` of an output channel.

    ``source`` is an object with an ``info`` attribute, a callable returning the Hash, or
    the Hash itself.

    Raises
    ------
    BrokerConfigError
        ``source`` gives something other than a Hash.
    KeyError
        The Hash has no ``port`` (the output is not bound yet).
    """
    info = source.info if hasattr(source, "info") else (source() if callable(source) else source)
    if not isinstance(info, Hash):
        raise BrokerConfigError(
            f"output channel info must be a Hash, not {type(info).__name__}")
    out = Hash()
    out.set("connectionType", info.get("connectionType", "tcp"), type=HashType.STRING)
    out.set("hostname", info.get("hostname", ""), type=HashType.STRING)
    out.set("port", int(info["port"]), type=HashType.UINT32)
    for key in info:
        if key not in out:
            out.set(key, info[key])
    return out


class Channels:
    """Output and input channels of one instance.

    Parameters
    ----------
    owner : BrokerInstance
        Gives ``instance_id`` and ``hostname``, and makes the resolver's requests.
    """

    def __init__(self, owner):
        self._owner = owner
        self._outputs = {}
        self._schemas = {}  # output name -> DataSchema / Hash / None
        self._inputs = []  # [name, channel, [output ids]]
        self._inputs_lock = threading.Lock()
        self._resolver = None

    # ---- outputs --------------------------------------------------------------------

    def add_output(self, name, channel, schema=None):
        """Serve ``channel`` as output ``name``; ``schema`` (a DataSchema or a Hash in
        Karabo's layout) is its published data schema, by default the channel's own
        ``schema``."""
        if schema is None:
            schema = getattr(channel, "schema", None)
        self._outputs[name] = channel
        self._schemas[name] = schema

    def remove_output(self, name):
        self._outputs.pop(name, None)
        self._schemas.pop(name, None)

    def output_entry(self, name):
        """``(channel, data schema or None)`` of output ``name``."""
        return self._outputs[name], self._schemas.get(name)

    def output_names(self) -> list:
        return sorted(self._outputs)

    def output_details(self, name) -> Hash:
        """:func:`connection_details` of output ``name`` as the channel gives them
        (``hostname`` may still be a bind address such as ``0.0.0.0``)."""
        return connection_details(self._outputs[name])

    def slots(self) -> dict:
        return {"slotGetOutputChannelInformation": self.slot_output_information,
                "slotGetOutputChannelNames": self._slot_output_names}

    def _slot_output_names(self, *_):
        return codec.Typed(sorted(self._outputs), HashType.VECTOR_STRING)

    def slot_output_information(self, arg=None, *_):
        """The reply ``{success BOOL, info}`` to ``slotGetOutputChannelInformation(arg)``."""
        own_id = self._owner.instance_id
        channel_id = arg.get("channelId") if isinstance(arg, Hash) else None
        reply = Hash()
        source = self._outputs.get(channel_id) if isinstance(channel_id, str) else None
        info = None
        if source is not None:
            try:
                info = connection_details(source)
            except Exception:
                log.exception("%s: output channel %r has no connection info", own_id, channel_id)
        if info is None:
            reply.set("success", False, type=HashType.BOOL)
            reply.set("info", Hash())
            return reply
        if info.get("hostname") in (None, "", "0.0.0.0", "default", "*"):
            info.set("hostname", self._owner.hostname, type=HashType.STRING)
        # a peer in another process is always "remote" (docs/wire/karabo-broker-amqp.md, section 11.2)
        info.set("memoryLocation", "remote", type=HashType.STRING)
        schema = self._schemas.get(channel_id)
        if schema is not None:
            # the data schema, so that a middle-layer input need not ask slotGetSchema
            # (docs/wire/karabo-broker-amqp.md, "What kbstream publishes")
            try:
                info.set("schema", self._channel_schema(channel_id, schema),
                         type=HashType.SCHEMA)
            except Exception:
                log.exception("%s: data schema of %r not publishable", own_id, channel_id)
        reply.set("success", True, type=HashType.BOOL)
        reply.set("info", info)
        return reply

    def _channel_schema(self, name, schema) -> Schema:
        """The output's part of the device schema, laid out as ``slotGetSchema`` answers
        it (``<name>`` node, data description under ``<name>.schema``): what a middle-layer
        input reads from ``info["schema"]`` (``schema.hash[name]["schema"]``)."""
        attrs, params = output_parameters(schema)
        h = Hash()
        h.set(name, params)
        for k, v, t in attrs:
            h.set_attribute(name, k, v, type=t)
        class_id = self._owner.instance_info.get("classId") or "KbStreamInstance"
        return Schema(class_id, h)

    # ---- inputs ---------------------------------------------------------------------

    def add_input(self, channel, outputs=None, name=None):
        """Reconnect ``channel`` on announcements of its outputs' instances and publish it
        as input ``name`` (default: the part of its ``channel_id`` after ``:``)."""
        if outputs is None:
            outputs = (getattr(channel, "connectedOutputChannels", None)
                       or getattr(channel, "connected_output_channels", None) or [])
        if name is None:
            cid = str(getattr(channel, "channel_id", "") or "")
            name = cid.rpartition(":")[2] or f"input{len(self._inputs)}"
        with self._inputs_lock:
            self._inputs.append([name, channel, list(outputs)])

    def input_names(self) -> set:
        with self._inputs_lock:
            return {name for name, _, _ in self._inputs}

    def inputs(self) -> list:
        """``[(name, channel, [output ids])]`` (a snapshot)."""
        with self._inputs_lock:
            return [(n, c, list(o)) for n, c, o in self._inputs]

    def set_input_outputs(self, name, outputs):
        """Make input ``name`` read from ``outputs``: disconnect from the outputs no longer
        listed, connect to the new ones; connections kept stay untouched.

        Raises
        ------
        ReconfigureError
            No such input, or a malformed output id.
        """
        from .protocol import split_output_id as _check

        for out in outputs:
            try:
                _check(out)
            except Exception as e:
                raise ReconfigureError(f"{out!r} is not '<instanceId>:<channel>': {e}") from None
        with self._inputs_lock:
            entry = next((e for e in self._inputs if e[0] == name), None)
            if entry is None:
                raise ReconfigureError(f"no input channel {name!r}")
            old = list(entry[2])
            entry[2] = list(dict.fromkeys(outputs))
        channel = entry[1]
        new = entry[2]
        for out in old:
            if out not in new:
                channel.remove_output(out)
        for out in new:
            if out not in old:
                channel.add_output(out)

    @property
    def resolver(self) -> OutputResolver:
        r = self._resolver
        if r is None:
            r = self._resolver = OutputResolver(self._owner)
        return r

    def instance_announced(self, instance_id):
        """``instance_id`` sent ``slotInstanceNew``: re-ask at once for its outputs that a
        resolution waits for, and tell the inputs reading from it to reconnect now."""
        if self._resolver is not None:
            self._resolver.renew(instance_id)
        for _, channel, outputs in self.inputs():
            for out in outputs:
                if instance_of_output(out) == instance_id:
                    try:
                        channel.reconnect_now(out)
                    except Exception:
                        log.exception("%s: reconnect_now(%r) failed", self._owner.instance_id,
                                      out)

"""Pipeline channels described in Karabo's device-schema layout.

One job: turn a kbstream output or input channel into the two pieces a Karabo device
publishes for it (docs/wire/karabo-broker-amqp.md, "What kbstream publishes"):

* its part of the device schema (``slotGetSchema``): the ``<ch>`` node with ``classId`` and
  ``displayType`` ``OutputChannel`` / ``InputChannel`` and ``accessMode`` 4, one leaf per
  option with Karabo's types, defaults and attributes, and for outputs the
  ``<ch>.schema`` node (``displayType`` ``OutputSchema``) with the data description;
* its part of the configuration (``slotGetConfiguration``): the options' current values.

Names, types, defaults, options and access modes are Karabo's (compared against karabind's
``OUTPUT_CHANNEL`` / ``INPUT_CHANNEL`` in tests/broker/test_device_schema.py); the
descriptions are kbstream's own words. Deliberate difference: an input's
``connectedOutputChannels`` is reconfigurable (``accessMode`` 4), so that an operator can
rewire it through ``slotReconfigure``.
"""

from __future__ import annotations

import logging

import numpy as np

from kbhash import Hash, HashType, Schema

from ..pipeline.schema import DataSchema

log = logging.getLogger("kbstream.broker.karabo_channels")

__all__ = ["output_parameters", "output_configuration", "input_parameters",
           "input_configuration", "data_parameters", "INIT", "READ", "RECONFIGURABLE"]

#: Karabo's access modes.
INIT, READ, RECONFIGURABLE = 1, 2, 4

_S, _I32, _U32 = HashType.STRING, HashType.INT32, HashType.UINT32

#: Karabo's overwrite-restriction flags of a read-only table (28 flags; set: the ones a
#: read-only table may not overwrite, as karabind 3.1.2 writes them).
_TABLE_RESTRICTIONS = np.array([i in (11, 12, 13, 14, 19, 20) for i in range(28)], bool)


def _leaf(h, key, vtype, default, shown, desc, access, level, *, options=None,
          display=None, extra=()):
    h.set(key, Hash())
    a = h.attrs(key)
    a.set("displayedName", shown, _S)
    a.set("description", desc, _S)
    if options is not None:
        a.set("options", list(options), HashType.VECTOR_STRING)
    a.set("assignment", 0, _I32)
    a.set("defaultValue", default, vtype)
    for name, value, t in extra:
        a.set(name, value, t)
    a.set("accessMode", access, _I32)
    a.set("nodeType", 0, _I32)
    if display is not None:
        a.set("displayType", display, _S)
    a.set("valueType", vtype.name, _S)
    a.set("requiredAccessLevel", level, _I32)


def _channel_node_attrs(class_id):
    return (("classId", class_id, _S), ("displayType", class_id, _S),
            ("accessMode", RECONFIGURABLE, _I32), ("nodeType", 1, _I32))


def _row_schema() -> Schema:
    rows = Hash()
    for key, shown, vtype, desc in (
            ("remoteId", "Remote ID", _S, "id of the connected input channel"),
            ("dataDistribution", "Distribution", _S, "copy or shared"),
            ("onSlowness", "On slowness", _S, "the input's policy when it is slow"),
            ("memoryLocation", "MemoryLocation", _S, "remote or local"),
            ("remoteAddress", "Remote IP", _S, "address of the input's end"),
            ("remotePort", "Remote port", HashType.UINT16, "port of the input's end"),
            ("localAddress", "Local IP", _S, "address of this end"),
            ("localPort", "Local port", HashType.UINT16, "port of this end")):
        rows.set(key, Hash())
        a = rows.attrs(key)
        a.set("displayedName", shown, _S)
        a.set("description", desc, _S)
        a.set("accessMode", READ, _I32)
        a.set("assignment", 0, _I32)
        a.set("defaultValue", 0 if vtype != _S else "", vtype)
        a.set("nodeType", 0, _I32)
        a.set("valueType", vtype.name, _S)
        a.set("requiredAccessLevel", 0, _I32)
    return Schema("", rows)


def data_parameters(schema) -> Hash:
    """The content of ``<ch>.schema``: from a :class:`DataSchema`, a Hash already in
    Karabo's layout (used as is), or None (an empty node)."""
    if schema is None:
        return Hash()
    if isinstance(schema, DataSchema):
        return schema.to_parameters()
    if isinstance(schema, Schema):
        return Hash(schema.parameters)
    if isinstance(schema, Hash):
        return Hash(schema)
    from .errors import BrokerConfigError

    raise BrokerConfigError(f"an output's data schema must be a DataSchema or a Hash, "
                            f"not {type(schema).__name__}")


def output_parameters(schema=None):
    """``(node attributes, children)`` of an output channel in the device schema."""
    h = Hash()
    lvl_user, lvl_expert = 1, 2
    _leaf(h, "noInputShared", _S, "drop", "No Input (Shared)",
          "what happens to data for the shared inputs when none of them is ready",
          INIT, lvl_user, options=("drop", "queueDrop", "wait"))
    _leaf(h, "hostname", _S, "default", "Hostname",
          "the host name or address inputs are told to connect to ('default': this "
          "machine's name)", INIT, lvl_user)
    _leaf(h, "address", _S, "", "Address", "the address inputs connect to", READ, 0)
    _leaf(h, "port", _U32, 0, "Port", "listening TCP port (0: any free one)", INIT,
          lvl_expert, extra=(("maxInc", 65535, _U32),))
    _leaf(h, "connections", HashType.VECTOR_HASH, [], "Connections",
          "the inputs connected now", READ, lvl_expert, display="Table",
          extra=(("rowSchema", _row_schema(), HashType.SCHEMA),
                 ("overwriteRestrictions", _TABLE_RESTRICTIONS, HashType.VECTOR_BOOL)))
    _leaf(h, "updatePeriod", _I32, 10, "Update period",
          "seconds between updates of the connection statistics", INIT, lvl_expert,
          extra=(("unitEnum", 4, _I32), ("unitName", "second", _S), ("unitSymbol", "s", _S)))
    _leaf(h, "validateSchema", _S, "always", "Validate schema",
          "check every write against the data schema, or the first one of a stream",
          INIT, lvl_user, options=("once", "always"))
    for key, shown in (("bytesRead", "Read bytes"), ("bytesWritten", "Written bytes")):
        _leaf(h, key, HashType.VECTOR_UINT64, np.zeros(0, np.uint64), shown,
              f"{shown.lower()} per connection", READ, lvl_expert, display="Curve",
              extra=(("archivePolicy", 1, _I32),))
    h.set("schema", data_parameters(schema))
    a = h.attrs("schema")
    a.set("displayType", "OutputSchema", _S)
    a.set("accessMode", RECONFIGURABLE, _I32)
    a.set("nodeType", 1, _I32)
    return _channel_node_attrs("OutputChannel"), h


def _details(source):
    info = getattr(source, "info", source)
    if callable(info) and not isinstance(info, Hash):
        info = info()
    return info if isinstance(info, Hash) else Hash()


def _connection_rows(source, local_host, local_port):
    """The ``connections`` table and the ``bytesRead`` / ``bytesWritten`` vectors (one
    entry per row, in its order), from one ``stats()`` snapshot of a kbstream output
    (counters it keeps anyway), else from ``input_ids()`` alone."""
    rows, read, written = [], [], []
    try:
        stats = source.stats() if callable(getattr(source, "stats", None)) else None
        if stats is None:
            ids = getattr(source, "input_ids", None)
            if not callable(ids):
                return rows, read, written
            shared = set(ids(True))
            stats = {rid: {"shared": rid in shared} for rid in ids()}
        for rid, st in stats.items():
            if not isinstance(st, dict) or "shared" not in st:
                continue  # the shared pool's counters
            row = Hash()
            row.set("remoteId", rid, type=_S)
            row.set("dataDistribution", "shared" if st["shared"] else "copy", type=_S)
            if "onSlowness" in st:
                row.set("onSlowness", str(st["onSlowness"]), type=_S)
            # another process, also through shared memory (docs/wire/karabo-broker-amqp.md)
            row.set("memoryLocation", "remote", type=_S)
            addr = st.get("address")
            if isinstance(addr, tuple) and len(addr) >= 2:
                row.set("remoteAddress", str(addr[0]), type=_S)
                row.set("remotePort", int(addr[1]) & 0xFFFF, type=HashType.UINT16)
            row.set("localAddress", local_host, type=_S)
            row.set("localPort", local_port & 0xFFFF, type=HashType.UINT16)
            rows.append(row)
            read.append(int(st.get("bytes_read", 0)))
            written.append(int(st.get("bytes_written", 0)))
    except Exception:  # the channel is closing: an empty table, and a line for debugging
        log.debug("connections table of an output not available", exc_info=True)
        return [], [], []
    return rows, read, written


def output_configuration(source, host=None) -> Hash:
    """Current values of an output channel's options (``source`` as
    :meth:`~kbstream.broker.instance.BrokerInstance.add_output_channel` takes it)."""
    try:
        info = _details(source)
    except Exception:  # an output without connection details yet
        info = Hash()
    advertised = str(info.get("hostname") or "")
    if advertised in ("", "0.0.0.0", "default", "*"):
        advertised = host or advertised
    c = Hash()
    c.set("noInputShared", str(getattr(source, "no_input_shared", "drop")), type=_S)
    c.set("hostname", advertised, type=_S)
    c.set("address", advertised, type=_S)
    c.set("port", int(info.get("port") or 0), type=_U32)
    rows, read, written = _connection_rows(source, advertised, int(info.get("port") or 0))
    c.set("connections", rows, type=HashType.VECTOR_HASH)
    c.set("updatePeriod", 10, type=_I32)
    c.set("validateSchema", str(getattr(source, "validate_schema", "always")), type=_S)
    c.set("bytesRead", np.array(read, np.uint64), type=HashType.VECTOR_UINT64)
    c.set("bytesWritten", np.array(written, np.uint64), type=HashType.VECTOR_UINT64)
    c.set("schema", Hash())
    return c


def input_parameters():
    """``(node attributes, children)`` of an input channel in the device schema."""
    h = Hash()
    vs = HashType.VECTOR_STRING
    _leaf(h, "missingConnections", vs, [], "Missing Connections",
          "configured outputs that are not connected now", READ, 0, display="Curve")
    _leaf(h, "connectedOutputChannels", vs, [], "Configured Connections",
          "the outputs to read from, as '<instanceId>:<channel>'", RECONFIGURABLE, 1,
          display="Curve")
    _leaf(h, "dataDistribution", _S, "copy", "Data Distribution",
          "copy: every item; shared: items shared with the other shared inputs", INIT, 1,
          options=("copy", "shared"))
    _leaf(h, "onSlowness", _S, "drop", "On Slowness",
          "what a copy output does while this input is busy", INIT, 1,
          options=("drop", "wait", "queueDrop"))
    _leaf(h, "maxQueueLength", _U32, 2, "Max. Queue Length Output Channels",
          "items an output queues for this input (queueDrop)", INIT, 1,
          extra=(("minInc", 1, _U32),))
    _leaf(h, "minData", _U32, 1, "Minimum number input packets",
          "items per handler call (0: all up to the end of stream)", INIT, 1)
    _leaf(h, "respondToEndOfStream", HashType.BOOL, True, "Respond to end-of-stream",
          "call the end-of-stream handler", INIT, 1)
    _leaf(h, "delayOnInput", _I32, 0, "Delay on Input channel",
          "pause before asking an output for more data", INIT, 1,
          extra=(("unitEnum", 4, _I32), ("unitName", "second", _S), ("unitSymbol", "s", _S),
                 ("metricPrefixEnum", 13, _I32), ("metricPrefixName", "milli", _S),
                 ("metricPrefixSymbol", "m", _S)))
    return _channel_node_attrs("InputChannel"), h


def input_configuration(channel, outputs) -> Hash:
    """Current values of an input channel's options; ``outputs`` its configured ones."""
    c = Hash()
    status = {}
    cs = getattr(channel, "connection_status", None)
    if callable(cs):
        try:
            status = cs()
        except Exception:
            status = {}
    missing = [o for o in outputs if getattr(status.get(o), "name", "") != "CONNECTED"]
    c.set("missingConnections", missing, type=HashType.VECTOR_STRING)
    c.set("connectedOutputChannels", list(outputs), type=HashType.VECTOR_STRING)
    c.set("dataDistribution", str(getattr(channel, "data_distribution", "copy")), type=_S)
    c.set("onSlowness", str(getattr(channel, "on_slowness", "drop")), type=_S)
    c.set("maxQueueLength", int(getattr(channel, "max_queue_length", 2)), type=_U32)
    c.set("minData", int(getattr(channel, "min_data", 1)), type=_U32)
    c.set("respondToEndOfStream", bool(getattr(channel, "respond_to_eos", True)),
          type=HashType.BOOL)
    c.set("delayOnInput", int(round(float(getattr(channel, "delay_on_input", 0.0)) * 1000)),
          type=_I32)
    return c

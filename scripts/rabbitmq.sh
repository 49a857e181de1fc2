#!/usr/bin/env bash
# Make sure RabbitMQ (Debian's rabbitmq-server) is installed for the broker interop tests,
# without leaving a system-wide broker running or enabled.
#
#   bash scripts/rabbitmq.sh
#
# The tests never use a system-wide server: tests/broker/conftest.py starts a private
# broker on 127.0.0.1 with all state in a temporary directory (docs/peers.md, section 5.2) and
# needs only the package's programs in /usr/lib/rabbitmq/bin.
#
# * Already installed: returns at once (no apt call), after making sure no service runs.
# * Missing: `apt-get update` once, then `apt-get install --no-install-recommends`, with a
#   policy-rc.d that forbids service starts during the install (Debian's standard hook;
#   an existing one is left alone), then stops/disables whatever got started anyway.
# * Not root or no apt-get: prints why and exits 0, so that the tests report the missing
#   broker themselves (they fail when CI is set, skip otherwise).
set -euo pipefail

RMQ_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server

epmd_listening() {
    (exec 3<> /dev/tcp/127.0.0.1/4369) > /dev/null 2>&1
}

no_system_broker() {
    # Stop and disable what the package may have started. `systemctl disable` also works
    # without a running systemd (it only removes the links); `--now` needs one.
    if command -v systemctl > /dev/null 2>&1; then
        now=(); [ -d /run/systemd/system ] && now=(--now)
        systemctl disable "${now[@]}" rabbitmq-server.service > /dev/null 2>&1 || true
        systemctl disable "${now[@]}" epmd.socket epmd.service > /dev/null 2>&1 || true
    fi
    # sysvinit-style machines: stop a broker started by the package (its pid file exists),
    # keep it from starting at boot. Never run `rabbitmqctl status` or the init script's
    # `status` here: Erlang would start a daemonized epmd on 0.0.0.0:4369.
    if [ ! -d /run/systemd/system ] && [ -x /etc/init.d/rabbitmq-server ]; then
        if [ -s /run/rabbitmq/pid ] || [ -s /var/run/rabbitmq/pid ]; then
            /etc/init.d/rabbitmq-server stop > /dev/null 2>&1 || true
        fi
        update-rc.d rabbitmq-server disable > /dev/null 2>&1 || true
    fi
}

epmd_before=0
epmd_listening && epmd_before=1
stop_new_epmd() {
    # The package's scripts start a daemonized epmd on 0.0.0.0:4369 even when services are
    # forbidden; stop it if it was not there before (it refuses while nodes are registered).
    if [ "$epmd_before" = 0 ] && epmd_listening; then
        epmd -kill > /dev/null 2>&1 || true
    fi
}

if [ -x "$RMQ_SERVER" ]; then
    no_system_broker
    stop_new_epmd
    echo "rabbitmq-server: installed ($RMQ_SERVER)"
    exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null 2>&1; then
    echo "rabbitmq-server: not installed and cannot install it here (needs root and apt-get);" \
         "broker interop tests will fail under CI, skip otherwise" >&2
    exit 0
fi

created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d    # "do not start services"
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

echo "rabbitmq-server: installing from the distribution's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends rabbitmq-server
no_system_broker
stop_new_epmd

if [ ! -x "$RMQ_SERVER" ]; then
    echo "rabbitmq-server: installed, but $RMQ_SERVER is missing" >&2
    exit 1
fi
echo "rabbitmq-server: installed ($(dpkg-query -W -f='${Version}' rabbitmq-server))"

#!/bin/sh
# Upgrade one real server without losing a connection: drain it on this director, wait
# until its established connections are gone, run the upgrade command, put it back.
# Run it on every director of the farm (fabric, MCollective, Ansible, ssh in a loop);
# the drain is a runtime override, so no director's lb.yaml is edited.
#
#   rolling-upgrade.sh [-c CONFIG] [-s SERVICE] [-t TIMEOUT] [-f] BACKEND COMMAND [ARG...]
#
#   -c CONFIG   the daemon's config (to find its control socket); default /etc/lb-daemon/lb.yaml
#   -s SERVICE  drain BACKEND in this service only; default: all (every service that has it)
#   -t TIMEOUT  how long to wait for its connections to end (90s, 10m); default 10m
#   -f          run COMMAND even if connections are left when TIMEOUT passes (they break
#               if COMMAND stops the server); without it the script stops there
#
# Example, from the host that drives the upgrade:
#   for rs in 10.0.2.11 10.0.2.12 10.0.2.13; do
#     ssh lb1 rolling-upgrade.sh -t 5m "$rs" ssh "$rs" 'apt-get -y upgrade nginx && systemctl restart nginx'
#   done
#
# Exit status: 0 when the backend is back (enabled); 1 when the script stopped and left it
# drained (connections left after TIMEOUT without -f, or COMMAND failed), with what to do
# next on stderr; 2 on a usage error. Health checks still apply after `enable`: a server
# the upgrade broke stays out until its check passes. LB_DAEMON names the lb-daemon binary
# (default: the one on PATH).

set -u

lb=${LB_DAEMON:-lb-daemon}
config=/etc/lb-daemon/lb.yaml
service=all
timeout=10m
force=no

usage() {
    echo "usage: $0 [-c CONFIG] [-s SERVICE] [-t TIMEOUT] [-f] BACKEND COMMAND [ARG...]" >&2
    exit 2
}

while getopts c:s:t:f opt; do
    case $opt in
        c) config=$OPTARG ;;
        s) service=$OPTARG ;;
        t) timeout=$OPTARG ;;
        f) force=yes ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || usage
backend=$1
shift

say() { echo "rolling-upgrade: $backend: $*" >&2; }

"$lb" drain -c "$config" "$service" "$backend" >/dev/null || { say "drain refused; nothing changed"; exit 1; }
say "drained in $service; waiting up to $timeout for its connections to end"

if ! "$lb" wait-drained -c "$config" --timeout "$timeout" "$service" "$backend" >/dev/null; then
    if [ "$force" = no ]; then
        say "left DRAINED: connections remain. Wait longer, or rerun with -f, or put it back: $lb enable -c $config $service $backend"
        exit 1
    fi
    say "connections remain after $timeout; going ahead (-f)"
fi

say "running: $*"
if ! "$@"; then
    say "the command failed; left DRAINED. Fix the server, then: $lb enable -c $config $service $backend"
    exit 1
fi

"$lb" enable -c "$config" "$service" "$backend" >/dev/null || { say "enable refused; still drained"; exit 1; }
say "enabled again"

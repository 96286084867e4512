#!/bin/sh
# csync2's action on a director whose /etc/lb-daemon/ just changed (configs/csync2.cfg):
# check the file as the daemon would, and reload only if it passes. Output goes to the
# action's logfile; a non-zero exit says the file was refused and nothing was reloaded.
#   LB_CONFIG   the file (default /etc/lb-daemon/lb.yaml)
#   LB_DAEMON   the binary (default lb-daemon, from PATH)
#   LB_RELOAD   how to reload (default: systemctl reload lb-daemon, which checks again
#               and sends SIGHUP)
set -u
config="${LB_CONFIG:-/etc/lb-daemon/lb.yaml}"
daemon="${LB_DAEMON:-lb-daemon}"
when=$(date '+%Y-%m-%dT%H:%M:%S%z')
if ! "$daemon" check -c "$config"; then
    echo "$when csync2-lb-action: $config refused by lb-daemon check; not reloaded (the running configuration keeps serving)"
    exit 1
fi
echo "$when csync2-lb-action: $config checked; reloading"
exec sh -c "${LB_RELOAD:-systemctl reload lb-daemon}"

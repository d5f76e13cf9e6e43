#!/bin/sh
# Python ($REAL_PYTHON) as on a host whose /etc/hosts maps its own name to 127.0.1.1, Debian's
# default for a machine without DNS: gloo, left to itself, then offers the other hosts a loopback
# address. tests/test_slurm_multinode.py passes it as slurm/launch.sh's PYTHON (root, on the test
# cluster's nodes).
set -eu
hosts=$(mktemp)
sed "s/^[0-9.]* $(hostname)\$/127.0.1.1 $(hostname)/" /etc/hosts > "$hosts"
# A mount namespace of the rank's own: the node's /etc/hosts stays as it is for everyone else.
exec unshare --mount --propagation private sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$hosts" "${REAL_PYTHON:?}" "$@"

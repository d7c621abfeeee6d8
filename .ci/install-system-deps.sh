#!/usr/bin/env bash
# System packages the test suite needs (Debian/Ubuntu, run as root), installed non-interactively:
#   openssh-server / openssh-client  every sandbox node runs its own sshd; ssh, ssh-keygen, ssh-keyscan
#   pdsh                             DeepSpeed's multi-node launcher backend
#   iproute2                         `ip netns`, veth pairs and the bridge of the cluster sandbox
#   procps, psmisc                   process inspection in tests
#   python3                          the remote probes run as `python3 -` on each node
#   g++                              DeepSpeed compiles its CPU communication op on first use
# Installing openssh-server does not start a system sshd in a container without systemd; the
# sandbox starts its own sshd per namespace, listening only on the namespace's address.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: not root, skipping (the cluster tests will be skipped too)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  openssh-server openssh-client pdsh iproute2 procps psmisc python3 g++
# sshd's privilege-separation directory (normally created by the service unit).
mkdir -p /run/sshd && chmod 0755 /run/sshd

#!/bin/bash
# Download, on a Debian 12 machine with apt access, the packages that the GPU machines lack for
# the GPU sandbox (benchmarks/gpu_sandbox.sh): iproute2 (ip, tc), openssh server and client, pdsh,
# and the shared libraries they need, into the ignored folder .gpudebs/ of the repository.
#
#     scripts/fetch_gpu_debs.sh            # then carry `.gpudebs` with the GPU run
#
# Nothing is installed here or there: benchmarks/gpu_sandbox.sh unpacks them with `dpkg -x` into a
# private prefix and runs them through wrappers that set LD_LIBRARY_PATH for those binaries alone.
# The library list is what `ldd` shows for ip, tc, sshd, ssh, ssh-keygen, ssh-keyscan, pdsh and its
# modules on Debian 12, mapped to packages with `dpkg -S` (glibc itself is left out: the GPU
# machine's Ubuntu 24.04 glibc is newer, and binaries built against 2.36 run on it).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpudebs
PACKAGES=(
  iproute2 openssh-server openssh-client openssh-sftp-server pdsh libgenders0
  libaudit1 libbpf1 libbsd0 libcap-ng0 libcap2 libcom-err2 libcrypt1 libdb5.3 libelf1 libgcrypt20
  libgpg-error0 libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 liblz4-1 liblzma5
  libmd0 libmnl0 libnsl2 libpam0g libpcre2-8-0 libselinux1 libssl3 libsystemd0 libtirpc3 libwrap0
  libxtables12 libzstd1 zlib1g
)
grep -qx '/.gpudebs/' .git/info/exclude 2>/dev/null || echo '/.gpudebs/' >> .git/info/exclude
mkdir -p "$DEST"
rm -f "$DEST"/*.deb
(cd "$DEST" && apt-get download -q "${PACKAGES[@]}")
ls "$DEST"/*.deb | wc -l | xargs echo "packages:"
du -sh "$DEST"

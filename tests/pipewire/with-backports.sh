#!/usr/bin/env bash
# tests/pipewire/with-backports.sh — run a command with another PipeWire
# build (e.g. bookworm-backports' 1.4 + WirePlumber 0.5) that is unpacked,
# not installed, in ROOT:
#
#   with-backports.sh ROOT COMMAND [ARGS...]
#
#   e.g.  mkdir /tmp/pw14 && cd /tmp/pw14
#         apt-get download -t bookworm-backports libpipewire-0.3-0 \
#             libpipewire-0.3-modules libspa-0.2-modules pipewire pipewire-bin \
#             libwireplumber-0.5-0 wireplumber    # (+ liblua5.4-0)
#         for d in *.deb; do dpkg-deb -x "$d" root; done
#         tests/pipewire/with-backports.sh /tmp/pw14/root \
#             cargo test -p vsnd-tests --test pipewire
#
# Sets PATH (ROOT's pipewire, wireplumber, pw-*), LD_LIBRARY_PATH (its
# libpipewire-0.3.so.0: same soname, so also a broker built against the
# installed headers loads it), PIPEWIRE_MODULE_DIR, SPA_PLUGIN_DIR,
# SPA_DATA_DIR (if ROOT has one), WIREPLUMBER_MODULE_DIR,
# WIREPLUMBER_DATA_DIR and VSND_PW_DATADIR (ROOT/usr/share: the packaged
# client.conf and wireplumber.conf). start.sh passes them to the daemons and
# into DIR/env; PipeWire::env() passes them to the broker. Build first
# (`cargo build --workspace --bins`) with the installed libraries: this
# environment is for running only.
set -euo pipefail

die() { printf 'pipewire/with-backports.sh: error: %s\n' "$*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: with-backports.sh ROOT COMMAND [ARGS...]"
ROOT="$(cd "$1" 2>/dev/null && pwd -P)" || die "no directory $1"
shift

MULTIARCH="$(gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
LIB="$ROOT/usr/lib/$MULTIARCH"
[ -e "$LIB/libpipewire-0.3.so.0" ] || die "no $LIB/libpipewire-0.3.so.0 (unpack libpipewire-0.3-0 into $ROOT)"
[ -d "$LIB/spa-0.2" ] || die "no $LIB/spa-0.2 (unpack libspa-0.2-modules)"
[ -d "$LIB/pipewire-0.3" ] || die "no $LIB/pipewire-0.3 (unpack libpipewire-0.3-modules)"
[ -x "$ROOT/usr/bin/pipewire" ] || die "no $ROOT/usr/bin/pipewire (unpack pipewire-bin)"
[ -x "$ROOT/usr/bin/wireplumber" ] || die "no $ROOT/usr/bin/wireplumber (unpack wireplumber)"

export PATH="$ROOT/usr/bin:$PATH"
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PIPEWIRE_MODULE_DIR="$LIB/pipewire-0.3"
export SPA_PLUGIN_DIR="$LIB/spa-0.2"
if [ -d "$ROOT/usr/share/spa-0.2" ]; then export SPA_DATA_DIR="$ROOT/usr/share/spa-0.2"; fi
WP_MOD=""
for d in "$LIB"/wireplumber-0.*; do [ -d "$d" ] && WP_MOD="$d"; done   # the newest
[ -n "$WP_MOD" ] || die "no $LIB/wireplumber-0.* (unpack libwireplumber-0.5-0)"
export WIREPLUMBER_MODULE_DIR="$WP_MOD"
export WIREPLUMBER_DATA_DIR="$ROOT/usr/share/wireplumber"
export VSND_PW_DATADIR="$ROOT/usr/share"
# tests/tests/pipewire.rs checks that the broker really loaded this libpipewire
export VSND_PW_EXPECT_LIBDIR="$LIB"

printf 'pipewire/with-backports.sh: %s, %s\n' \
    "$(pipewire --version | sed -n 's/.*[Ll]inked with libpipewire \(.*\)/libpipewire \1/p' | head -n1)" \
    "$(wireplumber --version | sed -n 's/.*[Ll]inked with \(libwireplumber .*\)/\1/p' | head -n1)" >&2
exec "$@"

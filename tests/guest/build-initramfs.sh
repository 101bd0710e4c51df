#!/usr/bin/env bash
# tests/guest/build-initramfs.sh OUTDIR
#
# Assembles the real-guest fixture used by tests/tests/real_guest.rs from
# packages that scripts/setup installed (nothing here is downloaded):
#
#   OUTDIR/vmlinuz            copy of the 6.12 kernel unpacked by scripts/setup
#   OUTDIR/initramfs.cpio.gz  busybox (static), aplay/arecord + exactly their
#                             shared libraries, the alsa-lib config they need,
#                             virtio_snd/virtio_blk (decompressed) and their
#                             dependencies, and tests/guest/init as /init
#   OUTDIR/kernel-release     the kernel release string (uname -r in the guest)
#   OUTDIR/inputs.sha256      hash of every input; the build is skipped when
#                             it matches (pass --force to rebuild anyway)
#
# The archive is reproducible (sorted, fixed mtimes, gzip -n): the same
# inputs give the same bytes.
#
# Environment:
#   VSND_GUEST_KERNEL_DIR  root of the unpacked kernel package
#                          (default /var/cache/vsnd-guest/current)
set -euo pipefail

die() { printf 'build-initramfs: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'build-initramfs: %s\n' "$*" >&2; }

FORCE=0
if [ "${1:-}" = --force ]; then FORCE=1; shift; fi
[ $# -eq 1 ] || die "usage: $0 [--force] OUTDIR"
OUT="$1"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KROOT="${VSND_GUEST_KERNEL_DIR:-/var/cache/vsnd-guest/current}"
SETUP_HINT="run scripts/setup (as root) first"

# --- locate inputs ----------------------------------------------------------
[ -d "$KROOT" ] || die "no guest kernel at $KROOT; $SETUP_HINT"
KROOT="$(cd "$KROOT" && pwd -P)"
shopt -s nullglob
vmlinuz=("$KROOT"/boot/vmlinuz-6.*)
shopt -u nullglob
[ ${#vmlinuz[@]} -eq 1 ] || die "expected exactly one $KROOT/boot/vmlinuz-6.*; $SETUP_HINT"
VMLINUZ="${vmlinuz[0]}"
KREL="${VMLINUZ##*/vmlinuz-}"
KCONFIG="$KROOT/boot/config-$KREL"
MODDIR=""
for d in "$KROOT/lib/modules/$KREL" "$KROOT/usr/lib/modules/$KREL"; do
    [ -d "$d" ] && MODDIR="$d" && break
done
[ -n "$MODDIR" ] || die "no modules for $KREL under $KROOT; $SETUP_HINT"
[ -f "$KCONFIG" ] || die "no $KCONFIG; $SETUP_HINT"

BUSYBOX=/bin/busybox
{ [ -x "$BUSYBOX" ] && "$BUSYBOX" --list >/dev/null 2>&1; } || die "no busybox at $BUSYBOX; $SETUP_HINT"
# The static build is required: the initramfs has no libraries for it.
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is not static (install busybox-static); $SETUP_HINT"; fi
APLAY="$(command -v aplay || true)"
[ -n "$APLAY" ] || die "aplay not found (alsa-utils); $SETUP_HINT"
APLAY="$(readlink -f "$APLAY")"
[ -f /usr/share/alsa/alsa.conf ] || die "/usr/share/alsa/alsa.conf missing (libasound2-data); $SETUP_HINT"
for t in cpio xz gzip; do command -v "$t" >/dev/null || die "$t not found; $SETUP_HINT"; done

INIT="$HERE/init"
[ -f "$INIT" ] || die "missing $INIT"

# --- up to date? --------------------------------------------------------------
# Everything that goes in, by content (kernel, modules dir listing, tools, init
# script, this script).
inputs_hash() {
    {
        sha256sum "$VMLINUZ" "$KCONFIG" "$BUSYBOX" "$APLAY" "$INIT" "${BASH_SOURCE[0]}" \
            /usr/share/alsa/alsa.conf
        ldd "$APLAY" | sed "s/ (0x[0-9a-f]*)//" | sort
        (cd "$MODDIR" && find . -name '*.ko*' -printf '%p %s\n' | sort)
    } | sha256sum | cut -d' ' -f1
}
HASH="$(inputs_hash)"
if [ $FORCE -eq 0 ] && [ -f "$OUT/inputs.sha256" ] && [ "$(cat "$OUT/inputs.sha256")" = "$HASH" ] \
    && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    log "up to date: $OUT"
    exit 0
fi

mkdir -p "$OUT"
STAGE="$(mktemp -d "$OUT/.stage.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,lib/modules,usr/share/alsa}

# --- busybox --------------------------------------------------------------------
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done

# --- aplay / arecord and exactly their libraries ----------------------------
install_with_libs() {
    local bin="$1" dst="$2" lib
    cp -L "$bin" "$ROOT$dst"
    # ldd prints "name => /path (addr)" and "/path/ld.so (addr)".
    for lib in $(ldd "$bin" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
        mkdir -p "$ROOT$(dirname "$lib")"
        [ -e "$ROOT$lib" ] || cp -L "$lib" "$ROOT$lib"
    done
}
rm -f "$ROOT/usr/bin/aplay" "$ROOT/usr/bin/arecord" # not busybox applets, but be sure
install_with_libs "$APLAY" /usr/bin/aplay
ln -s aplay "$ROOT/usr/bin/arecord" # aplay picks its mode from argv[0]
# amixer reads the jack controls (the gate tests check the guest sees the
# microphone unplugged while input is off).
AMIXER="$(command -v amixer || true)"
[ -n "$AMIXER" ] || die "amixer not found (alsa-utils); $SETUP_HINT"
install_with_libs "$(readlink -f "$AMIXER")" /usr/bin/amixer

# alsa-lib's global configuration; enough for the hw: plugin. Nothing from
# /etc (the host's may route to pipewire/pulse plugins that are not here).
cp /usr/share/alsa/alsa.conf "$ROOT/usr/share/alsa/"
for d in cards pcm ctl; do
    [ -d "/usr/share/alsa/$d" ] && cp -r "/usr/share/alsa/$d" "$ROOT/usr/share/alsa/"
done

# --- kernel modules -------------------------------------------------------------
# Which virtio bits are modules is read from the kernel's config; a module's
# dependencies from its own .modinfo "depends=" (what depmod turns into
# modules.dep; the .deb ships no modules.dep because depmod runs at install).
declare -A MODPATH=()
while IFS= read -r p; do
    n="${p##*/}"; n="${n%%.ko*}"; MODPATH["${n//-/_}"]="$p"
done < <(cd "$MODDIR" && find . -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' | sort)

decompress() { # file -> stdout
    case "$1" in
        *.xz) xz -dc "$1" ;;
        *.zst) zstd -dc "$1" ;;
        *.gz) gzip -dc "$1" ;;
        *) cat "$1" ;;
    esac
}

declare -A SEEN=()
ORDER=()
add_module() { # name; post-order walk: dependencies first
    local n="${1//-/_}" p deps dep
    [ -n "${SEEN[$n]:-}" ] && return 0
    SEEN[$n]=1
    p="${MODPATH[$n]:-}"
    [ -n "$p" ] || die "module $n not found in $MODDIR"
    deps="$(decompress "$MODDIR/$p" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)"
    for dep in ${deps//,/ }; do add_module "$dep"; done
    decompress "$MODDIR/$p" > "$ROOT/lib/modules/$n.ko"
    ORDER+=("$n")
}
want_config() { # CONFIG_X module: add module if =m, nothing if =y, fail otherwise
    local v
    v="$(sed -n "s/^$1=//p" "$KCONFIG")"
    case "$v" in
        y) ;;
        m) add_module "$2" ;;
        *) die "$KCONFIG: $1 is '${v:-unset}'; this kernel cannot run the guest test" ;;
    esac
}
want_config CONFIG_VIRTIO virtio
want_config CONFIG_VIRTIO_PCI virtio_pci
want_config CONFIG_VIRTIO_BLK virtio_blk
want_config CONFIG_SND_VIRTIO virtio_snd
printf '%s\n' "${ORDER[@]}" > "$ROOT/etc/vsnd-modules"
echo "$KREL" > "$ROOT/etc/vsnd-kernel-release"

# --- /init ------------------------------------------------------------------------
cp "$INIT" "$ROOT/init"
chmod 755 "$ROOT/init"

# --- archive (reproducible) ---------------------------------------------------
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
    | gzip -n -6 > "$STAGE/initramfs.cpio.gz"
cp "$VMLINUZ" "$STAGE/vmlinuz"
echo "$KREL" > "$STAGE/kernel-release"

mv -f "$STAGE/vmlinuz" "$OUT/vmlinuz"
mv -f "$STAGE/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv -f "$STAGE/kernel-release" "$OUT/kernel-release"
echo "$HASH" > "$OUT/inputs.sha256"
log "built $OUT (kernel $KREL; modules: ${ORDER[*]:-none}; $(du -h "$OUT/initramfs.cpio.gz" | cut -f1) initramfs)"

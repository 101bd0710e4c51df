#!/usr/bin/env bash
# tests/pipewire/start.sh — start a private, headless PipeWire daemon and its
# session manager (WirePlumber) with everything under one directory, and wait
# until they are ready. Idempotent: what already runs for DIR is left alone,
# what is missing (e.g. after `stop.sh DIR --daemon`) is started.
#
#   start.sh DIR [--watch PID] [--timeout SECONDS]
#
#   DIR            everything lives here (created if missing):
#                    run/       XDG_RUNTIME_DIR = PIPEWIRE_RUNTIME_DIR (socket pipewire-0)
#                    config/    PIPEWIRE_CONFIG_DIR=config/pipewire,
#                               WIREPLUMBER_CONFIG_DIR=config/wireplumber
#                    home/ state/ data/ cache/   HOME and XDG_* of the daemons
#                    log/pipewire.log, log/wireplumber.log
#                    pids       "NAME PID" lines: pipewire, wireplumber, watchdog
#                    env        sh-sourceable exports for clients (`. DIR/env`)
#   --watch PID    also start a watchdog that runs `stop.sh DIR` once PID has
#                  exited (the test fixture passes its own pid, so a killed
#                  test does not leave daemons behind)
#   --timeout S    how long to wait for readiness (default $VSND_PW_TIMEOUT or 20)
#
# Ready means: `pw-cli info 0` answers, pw-dump lists the nodes vsnd-test-sink,
# vsnd-test-source and vsnd-test-source-input (see pipewire.conf), and the
# session manager has made vsnd-test-sink the default sink and
# vsnd-test-source the default source. On timeout it says which of these is
# missing, prints the logs' tails and exits 1.
#
# Nothing of the host's configuration is read: the daemons run with a clean
# environment (env -i) whose HOME, XDG_* and *_CONFIG_DIR all point into DIR;
# the daemon's whole configuration is tests/pipewire/pipewire.conf. Clients
# get copies of the packaged client.conf (from $VSND_PW_DATADIR/pipewire,
# default /usr/share/pipewire) plus tests/pipewire/client.conf.d/.
#
# No D-Bus and no systemd are needed. Works as root. For trying another
# PipeWire build without installing it, these variables are passed through to
# the daemons and the clients when set: LD_LIBRARY_PATH PIPEWIRE_MODULE_DIR
# SPA_PLUGIN_DIR SPA_DATA_DIR WIREPLUMBER_MODULE_DIR WIREPLUMBER_DATA_DIR
# PIPEWIRE_DEBUG WIREPLUMBER_DEBUG (and VSND_PW_DATADIR for the packaged
# client.conf / wireplumber.conf).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="pipewire/start.sh"
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

DIR=""
WATCH=""
TIMEOUT="${VSND_PW_TIMEOUT:-20}"
while [ $# -gt 0 ]; do
    case "$1" in
        --watch) [ $# -ge 2 ] || die "--watch needs a PID"; WATCH="$2"; shift 2 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; TIMEOUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$DIR" ] || die "more than one DIR given"; DIR="$1"; shift ;;
    esac
done
[ -n "$DIR" ] || die "usage: start.sh DIR [--watch PID] [--timeout SECONDS]"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds, got '$TIMEOUT'"
[ -z "$WATCH" ] || [[ "$WATCH" =~ ^[0-9]+$ ]] || die "--watch must be a pid, got '$WATCH'"

for tool in pipewire wireplumber pw-cli pw-dump; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "'$tool' not found; install the PipeWire test packages (scripts/setup, PIPEWIRE_PKGS)"
done

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
RUN="$DIR/run"
# sun_path holds 108 bytes; 1.x also creates pipewire-0-manager.
[ "${#RUN}" -le 85 ] || die "DIR is too long for a unix socket path: $RUN/pipewire-0-manager"

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$HERE/lib.sh"

# --- configuration (rewritten on every start, so edits take effect) ---------
DATADIR="${VSND_PW_DATADIR:-/usr/share}"
mkdir -p "$RUN" "$DIR"/{config/pipewire,config/wireplumber,home,state,data,cache,log}
chmod 0700 "$RUN"
cp "$HERE/pipewire.conf" "$DIR/config/pipewire/pipewire.conf"
for c in client client-rt; do
    # 0.3.65 ships both (pw-cat uses client-rt.conf); 1.4 only client.conf.
    if [ -f "$DATADIR/pipewire/$c.conf" ]; then
        cp "$DATADIR/pipewire/$c.conf" "$DIR/config/pipewire/$c.conf"
        mkdir -p "$DIR/config/pipewire/$c.conf.d"
        cp "$HERE"/client.conf.d/*.conf "$DIR/config/pipewire/$c.conf.d/"
    fi
done
[ -f "$DIR/config/pipewire/client.conf" ] \
    || die "no packaged client.conf in $DATADIR/pipewire (is libpipewire-0.3-common installed?)"

WP_VERSION="$(wireplumber --version 2>/dev/null \
    | sed -n 's/^Linked with libwireplumber \([0-9]*\.[0-9]*\).*/\1/p' | head -n1)"
WP_ARGS=()
rm -rf "$DIR/config/wireplumber"
mkdir -p "$DIR/config/wireplumber"
case "$WP_VERSION" in
    0.4)
        cp "$HERE"/wireplumber-0.4/* "$DIR/config/wireplumber/"
        ;;
    0.5)
        [ -f "$DATADIR/wireplumber/wireplumber.conf" ] \
            || die "no packaged $DATADIR/wireplumber/wireplumber.conf"
        cp "$DATADIR/wireplumber/wireplumber.conf" "$DIR/config/wireplumber/"
        mkdir -p "$DIR/config/wireplumber/wireplumber.conf.d"
        cp "$HERE"/wireplumber-0.5/*.conf "$DIR/config/wireplumber/wireplumber.conf.d/"
        WP_ARGS=(-p vsnd)
        ;;
    *) die "unsupported WirePlumber version '${WP_VERSION:-unknown}' (0.4 and 0.5 are)" ;;
esac

# --- environments ------------------------------------------------------------
PASS_VARS=(LD_LIBRARY_PATH PIPEWIRE_MODULE_DIR SPA_PLUGIN_DIR SPA_DATA_DIR
           WIREPLUMBER_MODULE_DIR WIREPLUMBER_DATA_DIR PIPEWIRE_DEBUG WIREPLUMBER_DEBUG)
CLIENT_ENV=(
    XDG_RUNTIME_DIR="$RUN"
    PIPEWIRE_RUNTIME_DIR="$RUN"
    PIPEWIRE_REMOTE=pipewire-0
    PIPEWIRE_CONFIG_DIR="$DIR/config/pipewire"
)
for v in "${PASS_VARS[@]}"; do
    [ -z "${!v:-}" ] || CLIENT_ENV+=("$v=${!v}")
done
DAEMON_ENV=(
    PATH="$PATH"
    LANG=C.UTF-8
    HOME="$DIR/home"
    XDG_CONFIG_HOME="$DIR/config"
    XDG_STATE_HOME="$DIR/state"
    XDG_DATA_HOME="$DIR/data"
    XDG_CACHE_HOME="$DIR/cache"
    WIREPLUMBER_CONFIG_DIR="$DIR/config/wireplumber"
    # where WirePlumber's Lua scripts are; set, it stops 0.4 from also
    # looking for them in /etc/wireplumber/scripts
    WIREPLUMBER_DATA_DIR="${WIREPLUMBER_DATA_DIR:-$DATADIR/wireplumber}"
    VSND_PW_DIR="$DIR"
    "${CLIENT_ENV[@]}"
)
{
    echo "# clients of the private PipeWire in $DIR: . $DIR/env"
    for kv in "${CLIENT_ENV[@]}"; do
        printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    done
} > "$DIR/env.tmp"
mv -f "$DIR/env.tmp" "$DIR/env"

# --- processes ----------------------------------------------------------------
spawn() { # NAME ARGS... -> pid of the started process
    local name="$1"; shift
    printf '\n=== %s: %s started by start.sh\n' "$(date '+%F %T.%N')" "$name" >> "$DIR/log/$name.log"
    env -i "${DAEMON_ENV[@]}" "$@" >> "$DIR/log/$name.log" 2>&1 < /dev/null &
    echo $!
}

PW_PID="$(pw_pid_of "$DIR" pipewire)"
WP_PID="$(pw_pid_of "$DIR" wireplumber)"
WD_PID="$(pw_pid_of "$DIR" watchdog)"
pw_alive "$DIR" "$PW_PID" || PW_PID=""
pw_alive "$DIR" "$WP_PID" || WP_PID=""
pw_alive "$DIR" "$WD_PID" || WD_PID=""

START_NS="$(date +%s%N)"
if [ -z "$PW_PID" ]; then
    # A session manager of an earlier daemon would hold a dead connection.
    [ -z "$WP_PID" ] || { pw_stop_pids "$DIR" TERM "$WP_PID"; WP_PID=""; }
    PW_PID="$(spawn pipewire pipewire)"
fi
if [ -z "$WP_PID" ]; then
    # WirePlumber exits at once if the daemon's socket is not there yet.
    deadline=$(( $(date +%s) + TIMEOUT ))
    until [ -S "$RUN/pipewire-0" ]; do
        pw_alive "$DIR" "$PW_PID" || { pw_log_tails "$DIR"; die "pipewire exited during startup (log above)"; }
        [ "$(date +%s)" -lt "$deadline" ] || { pw_log_tails "$DIR"; die "no socket $RUN/pipewire-0 after ${TIMEOUT}s"; }
        sleep 0.02
    done
    WP_PID="$(spawn wireplumber wireplumber "${WP_ARGS[@]}")"
fi
if [ -n "$WATCH" ] && [ -z "$WD_PID" ]; then
    env -i PATH="$PATH" VSND_PW_DIR="$DIR" bash "$HERE/stop.sh" "$DIR" --after "$WATCH" \
        > /dev/null 2>&1 < /dev/null &
    WD_PID=$!
fi
{
    echo "pipewire $PW_PID"
    echo "wireplumber $WP_PID"
    [ -z "$WD_PID" ] || echo "watchdog $WD_PID"
} > "$DIR/pids.tmp"
mv -f "$DIR/pids.tmp" "$DIR/pids"

# --- readiness ------------------------------------------------------------------
WHY=""
ready() {
    local dump flat n
    if ! env "${CLIENT_ENV[@]}" timeout 5 pw-cli info 0 > /dev/null 2>&1; then
        WHY="'pw-cli info 0' fails: the daemon does not answer on $RUN/pipewire-0"
        return 1
    fi
    if ! dump="$(env "${CLIENT_ENV[@]}" timeout 5 pw-dump 2> /dev/null)"; then
        WHY="pw-dump fails"
        return 1
    fi
    flat="$(tr -d ' \t\n' <<< "$dump")"
    for n in vsnd-test-sink vsnd-test-source vsnd-test-source-input; do
        if ! grep -qF "\"node.name\":\"$n\"" <<< "$flat"; then
            WHY="pw-dump shows no node '$n' (see pipewire.conf)"
            return 1
        fi
    done
    if ! grep -qF '"key":"default.audio.sink","type":"Spa:String:JSON","value":{"name":"vsnd-test-sink"}' <<< "$flat" \
        || ! grep -qF '"key":"default.audio.source","type":"Spa:String:JSON","value":{"name":"vsnd-test-source"}' <<< "$flat"; then
        WHY="the session manager (WirePlumber $WP_VERSION) has not made vsnd-test-sink / vsnd-test-source the defaults"
        return 1
    fi
}

deadline=$(( $(date +%s) + TIMEOUT ))
until ready; do
    pw_alive "$DIR" "$PW_PID" || { pw_log_tails "$DIR"; die "pipewire (pid $PW_PID) exited during startup (log above)"; }
    pw_alive "$DIR" "$WP_PID" || { pw_log_tails "$DIR"; die "wireplumber (pid $WP_PID) exited during startup (log above)"; }
    if [ "$(date +%s)" -ge "$deadline" ]; then
        pw_log_tails "$DIR"
        die "not ready after ${TIMEOUT}s: $WHY"
    fi
    sleep 0.05
done
END_NS="$(date +%s%N)"
printf '%s: ready in %d ms (pipewire %s pid %s, wireplumber %s pid %s) in %s\n' "$PROG" \
    $(( (END_NS - START_NS) / 1000000 )) "$(pw_daemon_version "${CLIENT_ENV[@]}")" "$PW_PID" \
    "$WP_VERSION" "$WP_PID" "$DIR" >&2

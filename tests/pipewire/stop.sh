#!/usr/bin/env bash
# tests/pipewire/stop.sh — stop what tests/pipewire/start.sh started for DIR.
#
#   stop.sh DIR [--daemon] [--signal SIG] [--after PID]
#
#   (no option)    stop the daemon, the session manager and the watchdog and
#                  remove DIR/pids; DIR itself (logs, config) is left alone
#   --daemon       stop only the daemon and the session manager, as for a
#                  "daemon restarted mid-stream" test: clients lose their
#                  connection; `start.sh DIR` brings both back on the same
#                  socket (see also restart-daemon.sh)
#   --signal SIG   the first signal (default TERM); KILL makes it a crash.
#                  Whatever has not exited 5 s after it is SIGKILLed.
#   --after PID    first wait until process PID has exited (or DIR/pids is
#                  gone); start.sh --watch runs this as its watchdog
#
# Only processes whose environment carries VSND_PW_DIR=DIR are signalled.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { printf 'pipewire/stop.sh: error: %s\n' "$*" >&2; exit 1; }

DIR=""
ONLY_DAEMON=""
SIG=TERM
AFTER=""
while [ $# -gt 0 ]; do
    case "$1" in
        --daemon) ONLY_DAEMON=1; shift ;;
        --signal) [ $# -ge 2 ] || die "--signal needs a signal name"; SIG="${2#SIG}"; shift 2 ;;
        --after) [ $# -ge 2 ] || die "--after needs a PID"; AFTER="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$DIR" ] || die "more than one DIR given"; DIR="$1"; shift ;;
    esac
done
[ -n "$DIR" ] || die "usage: stop.sh DIR [--daemon] [--signal SIG] [--after PID]"
[ -d "$DIR" ] || exit 0
DIR="$(cd "$DIR" && pwd -P)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$HERE/lib.sh"

if [ -n "$AFTER" ]; then
    while kill -0 "$AFTER" 2>/dev/null && [ -f "$DIR/pids" ]; do
        sleep 1
    done
    [ -f "$DIR/pids" ] || exit 0
fi

PW_PID="$(pw_pid_of "$DIR" pipewire)"
WP_PID="$(pw_pid_of "$DIR" wireplumber)"
WD_PID="$(pw_pid_of "$DIR" watchdog)"

if [ -n "$ONLY_DAEMON" ]; then
    # The daemon first: that is what a test means by "the daemon went away".
    pw_stop_pids "$DIR" "$SIG" "$PW_PID"
    pw_stop_pids "$DIR" TERM "$WP_PID"
    if [ -n "$WD_PID" ]; then
        echo "watchdog $WD_PID" > "$DIR/pids.tmp"
        mv -f "$DIR/pids.tmp" "$DIR/pids"
    else
        rm -f "$DIR/pids"
    fi
else
    pw_stop_pids "$DIR" "$SIG" "$PW_PID" "$WP_PID"
    pw_stop_pids "$DIR" TERM "$WD_PID"
    rm -f "$DIR/pids"
fi

#!/usr/bin/env bash
# tests/pipewire/restart-daemon.sh — take the private PipeWire daemon of DIR
# (and its session manager) away and bring it back, for "daemon restarted
# mid-stream" tests. The socket path, the nodes' names and the configuration
# stay the same; object ids and serials change.
#
#   restart-daemon.sh DIR [--signal SIG] [--down SECONDS]
#
#   --signal SIG    how the daemon goes away: TERM (default, an orderly exit)
#                   or KILL (a crash: no goodbye to the clients)
#   --down SECONDS  how long it stays away before it is started again
#                   (default 0; fractions allowed)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { printf 'pipewire/restart-daemon.sh: error: %s\n' "$*" >&2; exit 1; }

DIR=""
SIG=TERM
DOWN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --signal) [ $# -ge 2 ] || die "--signal needs a signal name"; SIG="$2"; shift 2 ;;
        --down) [ $# -ge 2 ] || die "--down needs seconds"; DOWN="$2"; shift 2 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$DIR" ] || die "more than one DIR given"; DIR="$1"; shift ;;
    esac
done
[ -n "$DIR" ] || die "usage: restart-daemon.sh DIR [--signal SIG] [--down SECONDS]"
[ -f "$DIR/pids" ] || die "nothing runs for $DIR (no $DIR/pids); use start.sh"

"$HERE/stop.sh" "$DIR" --daemon --signal "$SIG"
sleep "$DOWN"
exec "$HERE/start.sh" "$DIR"

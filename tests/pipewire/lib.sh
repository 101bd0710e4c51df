# shellcheck shell=bash
# tests/pipewire/lib.sh — helpers shared by start.sh and stop.sh (sourced).
# A process "belongs" to DIR when its environment has VSND_PW_DIR=DIR: every
# process that start.sh starts gets that variable, so a pid in DIR/pids that
# has been reused by an unrelated process is never signalled.

# pw_pid_of DIR NAME: the pid recorded for NAME in DIR/pids (empty if none).
pw_pid_of() {
    [ -f "$1/pids" ] || return 0
    awk -v n="$2" '$1 == n { print $2 }' "$1/pids"
}

# pw_alive DIR PID: PID runs (not a zombie) and belongs to DIR.
pw_alive() {
    local dir="$1" pid="${2:-}" state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    state="$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ] || return 1
    { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qxF "VSND_PW_DIR=$dir"
}

# pw_stop_pids DIR SIGNAL PID...: send SIGNAL to those of PID... that belong
# to DIR, wait up to 5 s for them to go, then SIGKILL what is left.
pw_stop_pids() {
    local dir="$1" sig="$2" pid left
    shift 2
    for pid in "$@"; do
        [ "$pid" = "$$" ] && continue
        if pw_alive "$dir" "$pid"; then
            kill "-$sig" "$pid" 2>/dev/null || true
        fi
    done
    for _ in $(seq 100); do
        left=""
        for pid in "$@"; do
            [ "$pid" != "$$" ] && pw_alive "$dir" "$pid" && left="$left $pid"
        done
        [ -n "$left" ] || return 0
        sleep 0.05
    done
    for pid in $left; do
        printf 'pipewire: pid %s ignored SIG%s for 5 s, sending SIGKILL\n' "$pid" "$sig" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# pw_log_tails DIR: the end of the daemons' logs, on stderr.
pw_log_tails() {
    local f
    for f in "$1"/log/*.log; do
        [ -f "$f" ] || continue
        printf -- '--- last lines of %s:\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
}

# pw_daemon_version VAR=VALUE...: the version the daemon reports.
pw_daemon_version() {
    env "$@" timeout 5 pw-cli info 0 2>/dev/null | sed -n 's/^[[:space:]]*version: "\(.*\)"$/\1/p' | head -n1
}

#!/usr/bin/env bash
# tests/pipewire/selftest.sh — prove the private PipeWire setup end to end with
# command-line tools only (pw-play, pw-record, pw-link, pw-dump; perl for the
# PCM pattern and the comparison). Exits non-zero if any check fails.
#
#   selftest.sh [--keep]      (--keep: leave the temporary directory)
#
# (a) a known PCM pattern (S16LE, 48 kHz, stereo, 1 s of pseudo-random
#     samples plus the extremes -32768/32767) is played into vsnd-test-sink
#     while the sink's monitor is recorded; the pattern must appear bit-exact
#     in the recording, with silence before and after it.
# (b) the same pattern is played into vsnd-test-source-input while
#     vsnd-test-source is recorded; again bit-exact.
# (c) the capture streams (media.class Stream/Input/Audio) pw-dump lists
#     while (b) records: exactly the recorder.
# (d) the daemon is killed (SIGKILL) and restarted; the nodes come back.
# (e) further formats and channel counts: which survive the F32 graph.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KEEP=""
[ "${1:-}" != --keep ] || KEEP=1

T="$(mktemp -d /tmp/vsnd-pw-selftest.XXXXXX)"
cleanup() {
    "$HERE/stop.sh" "$T/pw" || true
    if [ -n "$KEEP" ]; then echo "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT

FAILED=0
pass() { printf 'PASS %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; FAILED=$((FAILED + 1)); }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

t0="$(date +%s%N)"
"$HERE/start.sh" "$T/pw" --watch $$
echo "startup: $(ms_since "$t0") ms (start.sh from nothing to ready)"
# shellcheck source=/dev/null
. "$T/pw/env"
pw-cli info 0 | sed -n 's/^[[:space:]]*version: /daemon version: /p'
echo "client library: $(pw-cli --version | sed -n 's/^Linked with //p')"

# gen FORMAT CHANNELS FRAMES FILE.raw FILE.wav [PAD_FRAMES]: a deterministic
# pattern (LCG) in FORMAT (s16|s32|f32|u8) plus the format's extremes first,
# as raw data and as a WAV file (the raw data followed by PAD_FRAMES of
# silence: bookworm's pw-play drops the last partial quantum of a file).
gen() {
    perl -e '
        use strict; use warnings;
        my ($fmt, $ch, $frames, $raw, $wav, $pad) = @ARGV;
        my %spec = (s16 => ["s<", 2, 1], s32 => ["l<", 4, 1], f32 => ["f<", 4, 3], u8 => ["C", 1, 1]);
        my ($p, $bps, $tag) = @{ $spec{$fmt} or die "format $fmt\n" };
        my %ext = (s16 => [-32768, 32767, -32767, 0, 1, -1],
                   s32 => [-2147483648, 2147483647, 0, 1, -1, 256, -256],
                   f32 => [-1.0, 1.0, 0.5, -0.5, 0.0, 2**-15, -(2**-15)],
                   u8  => [0, 255, 128, 127, 129]);
        my @e = @{ $ext{$fmt} };
        my $x = 0x12345678; my $d = "";
        for my $i (0 .. $frames * $ch - 1) {
            my $v;
            if ($i < @e) { $v = $e[$i] }
            else {
                $x = ($x * 1103515245 + 12345) % 4294967296;
                my $r = ($x >> 8) & 0xffffff;     # 24 random bits
                $v = $fmt eq "s16" ? ($r >> 8) - 32768
                   : $fmt eq "s32" ? ($r << 8) - 2147483648 + ($x & 0xff)
                   : $fmt eq "f32" ? (($r >> 8) - 32768) / 32768
                   : ($r >> 16);
            }
            $d .= pack($p, $v);
        }
        open(my $f, ">:raw", $raw) or die; print $f $d; close $f;
        $d .= "\0" x ($pad * $ch * $bps) if $fmt ne "u8";
        $d .= "\x80" x ($pad * $ch) if $fmt eq "u8";
        my $rate = 48000;
        open($f, ">:raw", $wav) or die;
        print $f "RIFF", pack("V", 36 + length $d), "WAVE", "fmt ",
            pack("VvvVVvv", 16, $tag, $ch, $rate, $rate * $ch * $bps, $ch * $bps, 8 * $bps),
            "data", pack("V", length $d), $d;
        close $f;
    ' "$@"
}

# find_pattern REC.wav PATTERN.raw SILENCE_BYTE(hex): print where the pattern is in the
# recording's data chunk and whether everything around it is silence; exit 1
# when it is not found bit-exact (then print where it diverges).
find_pattern() {
    perl -e '
        use strict; use warnings;
        my ($rec, $pat, $sil) = @ARGV;
        local $/; open(my $f, "<:raw", $rec) or die "$rec: $!\n"; my $w = <$f>; close $f;
        open($f, "<:raw", $pat) or die; my $p = <$f>; close $f;
        die "$rec: not a WAV file\n" unless substr($w, 0, 4) eq "RIFF";
        my ($i, $data, $align) = (12, undef, 1);
        while ($i + 8 <= length $w) {
            my ($id, $sz) = unpack("a4 V", substr($w, $i, 8));
            if ($id eq "fmt ") { $align = unpack("v", substr($w, $i + 20, 2)) }
            if ($id eq "data") {
                # sizes are only right when the recorder closed the file cleanly
                $sz = length($w) - $i - 8 if $sz == 0 || $sz == 0xffffffff || $i + 8 + $sz > length $w;
                $data = substr($w, $i + 8, $sz); last;
            }
            $i += 8 + $sz + ($sz & 1);
        }
        die "$rec: no data chunk\n" unless defined $data;
        my $off = index($data, $p);
        # silence is 0x00, or 0x80 for U8 (where 1.4 pw-play also pads its
        # last buffer with 0x00)
        my $q = $sil eq "80" ? qr/^[\x00\x80]*$/ : qr/^\x00*$/;
        if ($off >= 0) {
            my $pre = substr($data, 0, $off); my $post = substr($data, $off + length $p);
            my $quiet = ($pre =~ $q && $post =~ $q) ? "silence around it" : "NOT silence around it";
            printf "found bit-exact: %d bytes at byte %d (frame %d) of %d recorded, %s\n",
                length $p, $off, $off / $align, length $data, $quiet;
            exit($quiet eq "silence around it" ? 0 : 1);
        }
        my $h = index($data, substr($p, 64, 64));
        if ($h < 0) { printf "NOT found: %d bytes recorded, not even a piece of the pattern\n", length $data; exit 1 }
        my $start = $h - 64; my $n = 0; my $first = -1;
        for my $k (0 .. length($p) - 1) {
            my $a = $start + $k < length $data ? substr($data, $start + $k, 1) : "";
            if ($a ne substr($p, $k, 1)) { $n++; $first = $k if $first < 0 }
        }
        printf "NOT bit-exact: pattern starts at byte %d, %d of %d bytes differ, first at byte %d\n",
            $start, $n, length $p, $first;
        exit 1;
    ' "$@"
}

# wait_linked NODE: until pw-link shows NODE's input ports linked.
wait_linked() {
    for _ in $(seq 200); do
        if [ "$(pw-link -l | grep -c -- "|-> $1:input_")" -ge "$2" ]; then return 0; fi
        sleep 0.025
    done
    echo "recorder $1 was never linked" >&2
    return 1
}

# roundtrip LABEL TARGET_PLAY TARGET_REC CAPTURE_SINK FORMAT PLAY_CH REC_CH [lossy]
# Plays a PLAY_CH-channel pattern into TARGET_PLAY while recording REC_CH
# channels from TARGET_REC, and looks for the pattern in the recording (a mono
# pattern recorded as stereo is looked for with every sample doubled).
# "lossy": not being bit-exact is expected, and reported as INFO.
roundtrip() {
    local label="$1" play="$2" rec="$3" capsink="$4" fmt="$5" pch="$6" rch="$7" lossy="${8:-}"
    local name r sil=00 props out
    name="vsnd-selftest-rec-$label"
    [ "$fmt" != u8 ] || sil=80
    gen "$fmt" "$pch" 48000 "$T/$label.raw" "$T/$label.wav" 24000
    if [ "$pch" = 1 ] && [ "$rch" = 2 ]; then
        perl -e 'my %w = (s16 => 2, s32 => 4, f32 => 4, u8 => 1); my $w = $w{$ARGV[0]};
                 local $/; my $d = <STDIN>;
                 print map { $_ x 2 } unpack("(a$w)*", $d)' "$fmt" < "$T/$label.raw" > "$T/$label.expect"
    else
        cp "$T/$label.raw" "$T/$label.expect"
    fi
    props="{ node.name = $name stream.capture.sink = $capsink }"
    pw-record -P "$props" --target "$rec" --rate 48000 --channels "$rch" --format "$fmt" \
        "$T/$label.rec.wav" > "$T/$label.rec.log" 2>&1 &
    r=$!
    wait_linked "$name" "$rch"
    if [ "$label" = b ]; then
        echo "(c) capture streams while (b) records:"
        pw-dump | perl -MJSON::PP -e '
            local $/; my $d = decode_json(<STDIN>);
            for my $o (@$d) {
                my $p = $o->{info}{props} // {};
                next unless ($o->{type} // "") eq "PipeWire:Interface:Node"
                    && ($p->{"media.class"} // "") eq "Stream/Input/Audio";
                printf "    id %d node.name %s target.object %s\n", $o->{id},
                    $p->{"node.name"} // "?", $p->{"target.object"} // "-";
            }'
    fi
    pw-play --target "$play" --rate 48000 --channels "$pch" --format "$fmt" "$T/$label.wav" > "$T/$label.play.log" 2>&1
    sleep 0.2
    kill -TERM "$r"
    wait "$r" || true
    if out="$(find_pattern "$T/$label.rec.wav" "$T/$label.expect" "$sil")"; then
        pass "$label: $out"
    elif [ -n "$lossy" ]; then
        printf 'INFO %s (expected): %s\n' "$label" "$out"
    else
        fail "$label: $out"
    fi
}

echo "(a) sink monitor"
roundtrip a vsnd-test-sink vsnd-test-sink true s16 2 2
echo "(b) source"
roundtrip b vsnd-test-source-input vsnd-test-source false s16 2 2

echo "(d) daemon killed and restarted"
t0="$(date +%s%N)"
"$HERE/restart-daemon.sh" "$T/pw" --signal KILL
echo "restart: $(ms_since "$t0") ms (SIGKILL to ready)"
roundtrip d vsnd-test-sink vsnd-test-sink true s16 2 2

echo "(e) other formats and channel counts"
# mono into the stereo sink: both channels carry the mono samples
roundtrip e-mono-to-stereo vsnd-test-sink vsnd-test-sink true s16 1 2
roundtrip e-f32 vsnd-test-sink vsnd-test-sink true f32 2 2
roundtrip e-u8 vsnd-test-sink vsnd-test-sink true u8 2 2
roundtrip e-s16-source vsnd-test-source-input vsnd-test-source false s16 1 2
# S32 goes through F32 (24-bit mantissa): the low 8 bits are lost.
roundtrip e-s32 vsnd-test-sink vsnd-test-sink true s32 2 2 lossy
# A mono recording of the stereo monitor is a downmix, not a copy.
roundtrip e-stereo-to-mono vsnd-test-sink vsnd-test-sink true s16 1 1 lossy

if [ "$FAILED" -eq 0 ]; then echo "selftest: all checks passed"; else echo "selftest: $FAILED checks FAILED"; fi
[ "$FAILED" -eq 0 ]

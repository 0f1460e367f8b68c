#!/bin/sh
# PID 1 of the toolstack dom0: bring up xenstored/xenconsoled, run each job in /jobs/list as a
# domU with xl, stream its console to ours with a "[name] " prefix, and report on the serial:
#   @@ready <uptime>             toolstack is up
#   @@waiting                    no jobs in the initramfs: polling the payload disk (the host
#                                may snapshot the machine now; see snapshot.py)
#   @@payload <nonce>            the payload disk's jobs are unpacked
#   @@t <label> <centiseconds>   a phase boundary (uptime), for the host's timing breakdown
#   @@start <name>               before `xl create`
#   @@job <name> <VERDICT> <s>   verdict and seconds from `xl create` to the verdict
#   @@fatal <message>            dom0 setup failed; nothing more will come
#   @@done                       all jobs finished; dom0 powers off next
# /jobs/list lines: <index> <domain name> <silence limit in s> <time limit in s> <job name>;
# /jobs/<index>.cfg is the xl config the host wrote; /jobs/env names the verdicts (RESULT_RE,
# RESULT_PREFIX_LEN, V_CRASH, V_HANG, V_TIMEOUT), written from the harness's Verdict.
# /jobs comes with the initramfs (cold boot) or, when the initramfs has no /jobs/list, from the
# payload disk /dev/vda: a header block "XENPVPAYLOAD1 <nonce> <length> <sha256>" and a cpio.
# Nothing here may depend on the date or on randomness: a restored snapshot has both frozen;
# time limits use /proc/uptime, which continues from the snapshot without a jump.

export PATH=/bin:/usr/lib/xen-4.17/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu

fatal() {
    echo "@@fatal $*"
    poweroff -f
    sleep 1000
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || fatal "mount devtmpfs"
mkdir -p /dev/pts
# xenconsoled gives each domain a pty.
mount -t devpts devpts /dev/pts || fatal "mount devpts"
mount -t tmpfs tmpfs /run
ln -s /run /var/run
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc; do
    insmod /lib/modules/$m.ko || fatal "insmod $m"
done
if [ ! -e /jobs/list ]; then
    PAYLOAD=/dev/vda
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
        insmod /lib/modules/$m.ko || fatal "insmod $m"
    done
fi
mount -t xenfs xenfs /proc/xen || fatal "mount xenfs"
mkdir -p /run/xen /run/xenstored /var/lib/xenstored /var/lib/xen /var/log/xen/console /var/lock

xenstored --pid-file=/run/xenstored.pid || fatal "xenstored"
xen-init-dom0 > /tmp/xen-init-dom0.log 2>&1 || { cat /tmp/xen-init-dom0.log; fatal "xen-init-dom0"; }
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid \
    || fatal "xenconsoled"
# dom0 has one vCPU, and `xl create` is still busy on it while the guest starts and writes its
# first console lines (more so after a restore: qemu translates every code path afresh). A guest
# that waits a bounded time for its console ring to drain must not lose that race to xl.
i=0
until [ -s /run/xenconsoled.pid ] || [ $i -ge 50 ]; do sleep 0.02; i=$((i + 1)); done
read -r pid < /run/xenconsoled.pid && renice -15 -p "$pid" > /dev/null

# NOW = uptime in centiseconds (no fork: /proc/uptime and shell arithmetic).
now() {
    read -r up _ < /proc/uptime
    NOW=$(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

secs() {
    SECS="$(( $1 / 100 )).$(( $1 % 100 / 10 ))"
}

# A phase boundary for the host's timing breakdown: @@t <label> <uptime in centiseconds>.
mark() {
    now
    echo "@@t $1 $NOW"
}

# A pause without a fork: `read -t` on a FIFO nobody writes. (`sleep` is a fork and an exec of
# busybox every time, which under TCG costs dom0's one vCPU more than the loops below can spare.)
mkfifo /run/never
exec 9<> /run/never
pause() {
    read -t "$1" -u 9 _
}

# The `xl` processes alive right after `xl create`: xl leaves one behind that waits for the new
# domain and exits when it shuts down, crashes or is destroyed. While one of them lives, the
# domain runs, and nobody needs to ask `xl list` (~0.2 s of dom0's vCPU each time).
find_watchers() {
    WATCHERS=$(pidof xl)
}

watcher_alive() {
    for p in $WATCHERS; do
        kill -0 "$p" 2> /dev/null && return 0
    done
    return 1
}

# The domain's state column from `xl list` (e.g. "-b----", "---s--", "---sc-"), or "gone".
domstate() {
    set -- $(timeout 20 xl list "$1" 2>/dev/null | tail -n 1)
    if [ "$1" = "$DOM" ]; then STATE=$5; else STATE=gone; fi
}

# Prefixes console lines, counts them (for the quiet timeout) and records the first result line.
# The shim's console turns each "\n" into "\n\r", so its lines start with "\r" and its output
# ends in a lone "\r": strip the former, and print a lone "\r" as an empty line only once
# another line follows.
PREFIX_AWK='
function out(line) {
    print p line
    fflush()
    n++
    print n > nf
    close(nf)
    if (v == "" && match(line, re)) {
        v = substr(line, RSTART + plen, RLENGTH - plen)
        print v > vf
        close(vf)
    }
}
{
    if (held) { out(""); held = 0 }
    if ($0 == "\r") { held = 1; next }
    sub(/^\r/, "")
    sub(/\r$/, "")
    out($0)
}'

# The console reader ends when xenconsoled closes the log (after the domain is destroyed); if the
# domain never got a console it is still waiting to open the FIFO, so do not wait long.
end_reader() {
    i=0
    while kill -0 $reader 2> /dev/null && [ $i -lt 30 ]; do
        pause 0.1
        i=$((i + 1))
    done
    kill $reader 2> /dev/null
    wait $reader 2> /dev/null
}

run_job() {
    IDX=$1 DOM=$2 TMO=$3 LIMIT=$4 NAME=$5
    log=/var/log/xen/console/guest-$DOM.log
    vf=/tmp/verdict.$IDX
    nf=/tmp/lines.$IDX
    rm -f "$log" "$vf" "$nf"
    # xenconsoled appends to guest-<name>.log; as a FIFO with our reader on the other end, the
    # console streams without polling, and the reader sees EOF exactly when xenconsoled lets go
    # of the domain (so all its output is printed before the verdict marker).
    mkfifo "$log"
    awk -v p="[$NAME] " -v vf="$vf" -v nf="$nf" -v re="$RESULT_RE" -v plen="$RESULT_PREFIX_LEN" \
        "$PREFIX_AWK" < "$log" &
    reader=$!

    echo "@@start $NAME"
    now
    t0=$NOW
    echo "@@t create $NOW"
    # The timeouts only guard against a wedged toolstack; none is near them normally.
    if ! timeout 60 xl create "/jobs/$IDX.cfg" > /tmp/create.$IDX 2>&1 < /dev/null; then
        now
        while read -r line; do echo "[$NAME] xl create: $line"; done < /tmp/create.$IDX
        # xl may fail after the domain exists (and even runs): never leave it behind.
        timeout 30 xl destroy "$DOM" > /dev/null 2>&1 < /dev/null
        end_reader
        secs $((NOW - t0))
        echo "@@job $NAME $V_CRASH $SECS"
        return
    fi

    mark created
    find_watchers
    verdict=
    lines=0
    quiet_since=$t0
    # With a watcher, `xl list` is only a safety net every 5 s; without one, every 0.5 s.
    next_state=0
    [ -n "$WATCHERS" ] && next_state=$((t0 + 500))
    ended=
    while :; do
        now
        if [ -s "$vf" ]; then
            read -r verdict < "$vf"
            [ -n "$verdict" ] && break
        fi
        if [ -e "$nf" ]; then
            read -r n < "$nf"
            if [ "$n" != "$lines" ]; then lines=$n; quiet_since=$NOW; fi
        fi
        if [ -n "$ended" ]; then
            # Stopped without a result line (yet): its last lines may still be on their way
            # (xenconsoled, the FIFO, awk). Judge once its console has been quiet for a second
            # since it stopped, or after 10 s at most.
            if { [ $((NOW - ended)) -ge 100 ] && [ $((NOW - quiet_since)) -ge 100 ]; } \
                    || [ $((NOW - ended)) -ge 1000 ]; then
                echo "[$NAME] (domain stopped without a result line; xl state: $STATE)"
                verdict=$V_CRASH
                NOW=$ended
                break
            fi
        else
            if [ -n "$WATCHERS" ] && ! watcher_alive; then
                WATCHERS=
                next_state=$NOW
            fi
            if [ "$NOW" -ge "$next_state" ]; then
                if [ -n "$WATCHERS" ]; then
                    next_state=$((NOW + 500))
                else
                    next_state=$((NOW + 50))
                fi
                domstate "$DOM"
                case "$STATE" in
                    *c*|*s*|gone) ended=$NOW ;;
                esac
            fi
        fi
        if [ $((NOW - quiet_since)) -ge $((TMO * 100)) ]; then
            verdict=$V_HANG
            echo "[$NAME] (no console output for $TMO s)"
            break
        fi
        if [ $((NOW - t0)) -ge $((LIMIT * 100)) ]; then
            verdict=$V_TIMEOUT
            echo "[$NAME] (no result after $LIMIT s)"
            break
        fi
        pause 0.1
    done
    t1=$NOW

    case "$verdict" in
        "$V_CRASH"|"$V_HANG"|"$V_TIMEOUT") ;;
        *)
            # The guest shuts down right after its result line; let it, so that whatever it
            # (or the shim) prints on the way out reaches the log before we destroy it.
            i=0
            while [ $i -lt 10 ]; do
                if [ -n "$WATCHERS" ]; then
                    watcher_alive || break
                else
                    domstate "$DOM"
                    case "$STATE" in *s*|*c*|gone) break ;; esac
                fi
                pause 0.1
                i=$((i + 1))
            done ;;
    esac
    mark destroy
    timeout 30 xl destroy "$DOM" > /dev/null 2>&1 < /dev/null
    end_reader
    mark destroyed
    secs $((t1 - t0))
    echo "@@job $NAME $verdict $SECS"
}

# Poll the payload disk until it holds a payload whose body matches its header (O_DIRECT reads:
# the host rewrites the disk behind dom0's back). The host pads the body to whole 4 KiB blocks.
# TMPDIR and PAYLOAD_ROOT (where the cpio is unpacked) are only set by the harness's unit test.
wait_payload() {
    tmp=${TMPDIR:-/tmp}
    i=0
    while [ ! -e "$PAYLOAD" ]; do
        [ $i -ge 100 ] && fatal "no payload disk $PAYLOAD"
        sleep 0.1
        i=$((i + 1))
    done
    mark waiting
    echo "@@waiting"
    bad=0
    while :; do
        dd if="$PAYLOAD" of="$tmp/header" bs=4096 count=1 iflag=direct 2> /dev/null
        read -r magic nonce len sum rest < "$tmp/header"
        if [ "$magic" = XENPVPAYLOAD1 ] && [ -n "$sum" ] && [ -z "$rest" ]; then
            mark header
            dd if="$PAYLOAD" of="$tmp/payload" bs=1M skip=4096 count="$len" \
                iflag=direct,skip_bytes,count_bytes 2> /dev/null
            set -- $(sha256sum "$tmp/payload")
            [ "$1" = "$sum" ] && break
            bad=$((bad + 1))
            [ $bad -ge 20 ] && fatal "payload body does not match its header"
        fi
        sleep 0.02
    done
    mark read
    (cd "${PAYLOAD_ROOT:-/}" && cpio -i -d -u < "$tmp/payload" 2> "$tmp/cpio.log") \
        || { cat "$tmp/cpio.log"; fatal "payload cpio"; }
    rm -f "$tmp/payload" "$tmp/header"
    echo "@@payload $nonce"
}

now
secs $NOW
echo "@@ready $SECS"
[ -n "$PAYLOAD" ] && wait_payload
. /jobs/env
while read -r idx dom tmo limit name <&3; do
    run_job "$idx" "$dom" "$tmo" "$limit" "$name"
done 3< /jobs/list
echo "@@done"
poweroff -f
sleep 1000

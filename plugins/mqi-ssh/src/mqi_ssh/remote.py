"""The POSIX shell scripts that run a job detached on the remote host, and the command
lines that call them.

Nothing needs to be installed on the host but ``/bin/sh``, ``setsid`` (util-linux) and
coreutils. Every script is sent as ONE shell-quoted argument (``/bin/sh -c SCRIPT name
ARG...``) and gets its data as positional parameters, each shell-quoted too: no value
from a case folder or a config is ever pasted into shell syntax.

A job lives in its own folder (``JOB_DIR``, named from the job key, inside the host's
jobs folder). Files there:

``output.log``   the command's stdout and stderr
``pid``          ``SUPERVISOR_PID SUPERVISOR_START JOB_PGID JOB_START BOOT_ID`` (start
                 times are field 22 of /proc/PID/stat; they guard against pid reuse, the
                 boot id detects a reboot)
``exit_code``    written atomically when the command ended and its process group is empty
``timed_out``    the command ran past its timeout and its group was killed (exit 124)
``killed``       a kill was requested (cancel)

A missing working directory ends the job with exit code 126, a timeout with 124 (as
:mod:`mqi_framework.jobrunner` does locally).

Creating ``JOB_DIR`` (``mkdir``, atomic) is the claim: a second start of the same job key
finds the folder and re-attaches instead of running the command again.
"""

from __future__ import annotations

import shlex
from typing import Mapping, Optional

#: field 22 (start time) of /proc/PID/stat; the command name may contain spaces, so cut
#: after the last ") "
_START_TIME = r"""start_of() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }"""
_BOOT_ID = "boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown; }"

#: runs in its own session (setsid): starts the command in a new session/process group,
#: watches the timeout, stops leftovers, writes exit_code.
#: $1 JOB_DIR  $2 WORKDIR  $3 TIMEOUT (0: none)  $4 GRACE  $5 COMMAND
SUPERVISOR = _START_TIME + "\n" + _BOOT_ID + r"""
d=$1; workdir=$2; timeout=$3; grace=$4; cmd=$5
finish() { printf '%s\n' "$1" > "$d/exit_code.part" && mv -f "$d/exit_code.part" "$d/exit_code"; }
group_alive() { kill -0 "-$1" 2>/dev/null; }
stop_group() {
    kill -TERM "-$1" 2>/dev/null
    i=0
    while group_alive "$1" && [ "$i" -lt "$((grace * 10))" ]; do sleep 0.1; i=$((i + 1)); done
    group_alive "$1" && kill -KILL "-$1" 2>/dev/null
}
me_start=$(start_of $$)
if ! cd -- "$workdir" 2>/dev/null; then
    printf '[mqi] ERROR: working directory %s does not exist on this host\n' "$workdir" >> "$d/output.log"
    printf '%s %s 0 - %s\n' "$$" "$me_start" "$(boot_id)" > "$d/pid"
    finish 126
    exit 0
fi
setsid /bin/sh -c "$cmd" < /dev/null >> "$d/output.log" 2>&1 &
child=$!
printf '%s %s %s %s %s\n' "$$" "$me_start" "$child" "$(start_of "$child")" "$(boot_id)" > "$d/pid.part"
mv -f "$d/pid.part" "$d/pid"
if [ "$timeout" -gt 0 ]; then
    (
        waited=0
        while [ "$waited" -lt "$timeout" ]; do
            sleep 1
            [ -f "$d/exit_code" ] && exit 0
            kill -0 "$child" 2>/dev/null || exit 0
            waited=$((waited + 1))
        done
        : > "$d/timed_out"
        printf '\n[mqi] timed out after %ss: stopping the process group\n' "$timeout" >> "$d/output.log"
        stop_group "$child"
    ) &
    watchdog=$!
fi
wait "$child"
code=$?
[ -n "${watchdog:-}" ] && kill "$watchdog" 2>/dev/null
if group_alive "$child"; then
    printf '\n[mqi] the command left processes behind in its group: stopping them\n' >> "$d/output.log"
    stop_group "$child"
fi
[ -f "$d/timed_out" ] && code=124
finish "$code"
"""

#: claims JOB_DIR (mkdir) and starts the supervisor detached, or re-attaches; then waits
#: (up to 15 s) until the job recorded its pid. Prints ``started`` or ``attached``.
#: $1 JOBS_DIR  $2 JOB_DIR  $3 WORKDIR  $4 TIMEOUT  $5 GRACE  $6 COMMAND  $7 SUPERVISOR
LAUNCHER = r"""
umask 077  # job folders, logs and the engine's output are the clinic's data
jobs=$1; d=$2
mkdir -p -- "$jobs" || exit 90
if mkdir -- "$d" 2>/dev/null; then
    setsid /bin/sh -c "$7" mqi-job "$d" "$3" "$4" "$5" "$6" < /dev/null >> "$d/supervisor.log" 2>&1 &
    echo started
else
    echo attached
fi
i=0
while [ ! -f "$d/pid" ] && [ ! -f "$d/exit_code" ] && [ "$i" -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
"""

#: prints one status line per JOB_DIR argument, in order: ``exited CODE [timed_out]
#: [killed]``, ``running``, ``starting AGE``, ``rebooted``, ``lost``, ``missing``.
#: $@ JOB_DIR...
STATUS = _START_TIME + "\n" + _BOOT_ID + r"""
job_status() {
    d=$1
    if [ -f "$d/exit_code" ]; then
        line="exited $(cat "$d/exit_code")"
        [ -f "$d/timed_out" ] && line="$line timed_out"
        [ -f "$d/killed" ] && line="$line killed"
        echo "$line"; return
    fi
    [ -d "$d" ] || { echo missing; return; }
    if [ ! -f "$d/pid" ]; then
        now=$(date +%s); made=$(stat -c %Y "$d" 2>/dev/null || echo "$now")
        echo "starting $((now - made))"; return
    fi
    read -r spid sstart cpid cstart boot < "$d/pid"
    if [ "$boot" != "$this_boot" ]; then echo rebooted; return; fi
    if [ "$(start_of "$spid")" = "$sstart" ] || { [ "$cpid" != 0 ] && [ "$(start_of "$cpid")" = "$cstart" ]; }; then
        echo running; return
    fi
    if [ -f "$d/exit_code" ]; then echo "exited $(cat "$d/exit_code")"; return; fi
    echo lost
}
this_boot=$(boot_id)
for job in "$@"; do job_status "$job"; done
"""

#: kills the job's process group (TERM, then KILL after GRACE), unless it finished or the
#: recorded group is not the job's any more (reboot, pid reuse).  $1 JOB_DIR  $2 GRACE
KILL = _START_TIME + "\n" + _BOOT_ID + r"""
d=$1; grace=$2
[ -f "$d/exit_code" ] && { echo finished; exit 0; }
[ -f "$d/pid" ] || { echo "no pid"; exit 0; }
read -r spid sstart cpid cstart boot < "$d/pid"
[ "$boot" = "$(boot_id)" ] || { echo rebooted; exit 0; }
: > "$d/killed"
[ "$cpid" = 0 ] && { echo "not started"; exit 0; }
ours=no  # the recorded group is still the job's: its leader or its supervisor still runs
[ "$(start_of "$cpid")" = "$cstart" ] && ours=yes
[ "$(start_of "$spid")" = "$sstart" ] && ours=yes
if [ "$ours" = yes ] && kill -0 "-$cpid" 2>/dev/null; then
    printf '\n[mqi] kill requested: stopping the process group\n' >> "$d/output.log"
    kill -TERM "-$cpid" 2>/dev/null
    i=0
    while kill -0 "-$cpid" 2>/dev/null && [ "$i" -lt "$((grace * 10))" ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "-$cpid" 2>/dev/null
fi
i=0
while [ ! -f "$d/exit_code" ] && [ "$(start_of "$spid")" = "$sstart" ] && [ "$i" -lt 50 ]; do
    sleep 0.1; i=$((i + 1))
done
echo killed
"""


def script_call(script: str, name: str, *args: object) -> str:
    """``/bin/sh -c SCRIPT NAME ARG...`` with everything shell-quoted: safe to hand to the
    remote user's login shell, whatever the arguments contain."""
    return shlex.join(["/bin/sh", "-c", script, name, *(str(a) for a in args)])


def with_env(command: str, env: Mapping[str, str]) -> str:
    """``export K=V; ...`` in front of ``command`` (values shell-quoted, keys checked)."""
    parts = []
    for key, value in env.items():
        if not key.isidentifier() or not key.isascii():
            raise ValueError(f"environment variable name {key!r} is not a valid shell name")
        parts.append(f"export {key}={shlex.quote(str(value))}; ")
    return "".join(parts) + command


def launch(jobs_dir: str, job_dir: str, workdir: str, timeout: Optional[float], grace: float, command: str) -> str:
    """The command line that starts (or re-attaches to) one job."""
    seconds = int(-(-timeout // 1)) if timeout and timeout > 0 else 0  # whole seconds, rounded up
    return script_call(LAUNCHER, "mqi-launch", jobs_dir, job_dir, workdir, seconds, max(0, int(grace)), command,
                       SUPERVISOR)

#: SHA-256 of the NUL-separated file names on stdin, relative to $1, one line each in
#: order: ``openssl dgst`` when $2 is ``fast`` and the host has openssl, else ``sha256sum``;
#: exit 127 when neither exists.   $1 BASE  $2 fast|sha256sum
HASH = r"""
cd -- "$1" || exit 2
if [ "$2" = fast ] && command -v openssl >/dev/null 2>&1; then exec xargs -0 -r openssl dgst -sha256 -r; fi
command -v sha256sum >/dev/null 2>&1 || exit 127
exec xargs -0 -r sha256sum --
"""

#: SHA-256 of consecutive segments of a file that is still being written: for each
#: (START, LENGTH) pair it waits until the file holds START+LENGTH bytes, then prints the
#: segment's hash (one line each, in order). It gives up ("stalled", exit 3) when the
#: file did not grow for STALL seconds.   $1 PATH  $2 STALL  $3.. START LENGTH ...
SEGMENT_HASH = r"""
p=$1; stall=$2; shift 2
if command -v openssl >/dev/null 2>&1; then hasher="openssl dgst -sha256 -r"; else hasher="sha256sum"; fi
last=-2; still=0
while [ "$#" -ge 2 ]; do
    start=$1; len=$2; shift 2
    end=$((start + len))
    while :; do
        size=$(stat -c %s -- "$p" 2>/dev/null || echo -1)
        [ "$size" -ge "$end" ] && break
        if [ "$size" = "$last" ]; then
            still=$((still + 1))
            [ "$still" -gt "$((stall * 20))" ] && { echo stalled; exit 3; }
        else
            still=0; last=$size
        fi
        sleep 0.05
    done
    tail -c +"$((start + 1))" -- "$p" | head -c "$len" | $hasher
done
"""

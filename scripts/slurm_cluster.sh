#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the SLURM tests (tests/test_slurm.py) and for trying
# `transferlab -m hydra/launcher=slurm ...` locally: this machine as node <hostname> (partition debug, the
# default) plus simulated nodes sim1..simN (more slurmd processes, `slurmd -N`; partition sim) for
# multi-node jobs.
#
#   scripts/slurm_cluster.sh install  # only install the Debian packages if missing (root): what CI runs first
#   scripts/slurm_cluster.sh start    # install the Debian packages if missing, start munged, slurmctld and the
#                                     # slurmds; wait until the nodes are idle; print the environment to use it
#   scripts/slurm_cluster.sh env      # print that environment again:  eval "$(scripts/slurm_cluster.sh env)"
#   scripts/slurm_cluster.sh status   # exit 0 when the cluster answers and its nodes are up
#   scripts/slurm_cluster.sh stop     # cancel its jobs, stop the daemons it started (by their pid files)
#
# Everything lives under $TRANSFERLAB_SLURM_DIR (default /tmp/transferlab-slurm): slurm.conf, munge key and
# socket, spool and state folders, logs, pid files, and bin/sacct. Nothing in /etc is changed; clients find
# the cluster through SLURM_CONF. Ports: $TRANSFERLAB_SLURM_PORT (slurmctld, default 16817) and the next ones
# (the slurmds), away from SLURM's defaults so a site cluster is not disturbed. $TRANSFERLAB_SLURM_SIM_NODES
# (default 2) simulated nodes; they share this machine's CPUs, one each as far as SLURM knows.
#
# Made for machines without systemd or cgroups (containers): proctrack/linuxproc, task/none,
# select/cons_tres with CR_CPU, no accounting (so `sacct` is replaced by bin/sacct, which answers from
# `scontrol show job`: submitit polls sacct, and without an answer a job killed hard leaves it waiting forever).
set -euo pipefail

STATE=${TRANSFERLAB_SLURM_DIR:-/tmp/transferlab-slurm}
PORT=${TRANSFERLAB_SLURM_PORT:-16817}
WAIT_S=${TRANSFERLAB_SLURM_WAIT_S:-60}
SIM_NODES=${TRANSFERLAB_SLURM_SIM_NODES:-2}  # extra simulated nodes sim1..simN (partition "sim"), 0 for none
CONF=$STATE/slurm.conf
NODE=$(slurmd -C 2>/dev/null | sed -n 's/^NodeName=\([^ ]*\).*/\1/p' || true)  # this machine, as slurmd names it
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The state shared by all nodes ("idle"...), or "mixed: ..." while they differ.
node_state() {
    local states
    states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ')
    states=${states% }
    [[ $states == *" "* ]] && echo "mixed: $states" || echo "$states"
}
up_state() { [[ $1 == idle || $1 == mix || $1 == alloc ]]; }
slurmd_names() { echo "$NODE"; for i in $(seq "$SIM_NODES"); do echo "sim$i"; done; }

print_env() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$STATE/bin:\$PATH"
}

install_packages() {
    local missing=()
    for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [[ ${#missing[@]} -eq 0 ]] && return
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    [[ $(id -u) -eq 0 ]] || die "installing packages needs root; run: sudo apt-get install -y slurmctld slurmd slurm-client munge"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >&2
}

write_sacct_shim() {
    mkdir -p "$STATE/bin"
    cat >"$STATE/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct for a cluster without slurmdbd: answers `sacct -o FIELDS --parsable2 -j ID [-j ID ...]` (what submitit
# asks) from `scontrol -o show job`. Fields: JobID (ARRAYID_TASK for array tasks), State, NodeList, JobName,
# ExitCode. Jobs slurmctld has forgotten (MinJobAge) are left out, as sacct leaves out unknown jobs.
fields=JobID,State,NodeList ids=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -o|--format) fields=$2; shift 2 ;;
        --format=*) fields=${1#*=}; shift ;;
        -j|--jobs) IFS=, read -ra more <<<"$2"; ids+=("${more[@]}"); shift 2 ;;
        --jobs=*) v=${1#*=}; IFS=, read -ra more <<<"$v"; ids+=("${more[@]}"); shift ;;
        *) shift ;;  # --parsable2, -n, -X ...: the output is always parsable2 with a header
    esac
done
echo "${fields//,/|}"
for id in "${ids[@]}"; do
    scontrol -o show job "$id" 2>/dev/null
done | awk -v fields="$fields" '
    NF == 0 { next }
    {
        delete kv
        for (i = 1; i <= NF; i++) { p = index($i, "="); if (p) kv[substr($i, 1, p - 1)] = substr($i, p + 1) }
        id = kv["JobId"]
        if ("ArrayJobId" in kv && "ArrayTaskId" in kv) {
            t = kv["ArrayTaskId"]
            id = kv["ArrayJobId"] "_" (t ~ /^[0-9]+$/ ? t : "[" t "]")
        }
        if (seen[id]++) next
        nodes = kv["NodeList"]; if (nodes == "(null)" || nodes == "") nodes = "None assigned"
        n = split(fields, f, ","); line = ""
        for (i = 1; i <= n; i++) {
            name = f[i]; sub(/%.*/, "", name); name = tolower(name)
            v = ""
            if (name == "jobid" || name == "jobidraw") v = id
            else if (name == "state") v = kv["JobState"]
            else if (name == "nodelist") v = nodes
            else if (name == "jobname") v = kv["JobName"]
            else if (name == "exitcode") v = kv["ExitCode"]
            line = line (i > 1 ? "|" : "") v
        }
        print line
    }'
EOF
    chmod 755 "$STATE/bin/sacct"
}

write_config() {
    local topo node
    topo=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... Boards=... ... RealMemory=...
    [[ $topo == NodeName=* ]] || die "unexpected 'slurmd -C' output: $topo"
    node=${topo%% *}; node=${node#NodeName=}
    NODE=$node
    getent hosts "$node" >/dev/null || say "warning: node name $node does not resolve; Lightning's DDP takes MASTER_ADDR from it (add it to /etc/hosts)"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node test cluster on $node.
ClusterName=transferlab
SlurmctldHost=$node
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job (default 120 s)
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
# keep finished jobs visible to scontrol (and so to bin/sacct) for a day; SIGKILL 5 s after SIGTERM
MinJobAge=86400
KillWait=5
$topo State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ $SIM_NODES -gt 0 ]]; then
        {
            echo "# Simulated nodes for multi-node jobs: more slurmd processes on this machine (slurmd -N simI), one"
            echo "# CPU each. Their names don't resolve: a multi-node DDP job here needs MASTER_ADDR=127.0.0.1."
            for i in $(seq "$SIM_NODES"); do
                echo "NodeName=sim$i NodeHostname=$node NodeAddr=127.0.0.1 Port=$((PORT + 1 + i)) CPUs=1 RealMemory=1024 State=UNKNOWN"
            done
            echo "PartitionName=sim Nodes=sim[1-$SIM_NODES] MaxTime=INFINITE State=UP"
        } >>"$CONF"
    fi
}

start_munged() {
    local d=$STATE/munge
    mkdir -p "$d"
    if [[ ! -f $d/munge.key ]]; then
        dd if=/dev/urandom of="$d/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$d"
    chmod 755 "$d"; chmod 400 "$d/munge.key"
    runuser -u munge -- munged --socket="$d/munge.socket" --key-file="$d/munge.key" --pid-file="$d/munged.pid" \
        --log-file="$d/munged.log" --seed-file="$d/munged.seed" \
        || die "munged did not start; see $d/munged.log"
    for _ in $(seq 50); do [[ -S $d/munge.socket ]] && return; sleep 0.1; done
    die "munged's socket $d/munge.socket did not appear; see $d/munged.log"
}

start() {
    if status >/dev/null 2>&1; then
        say "already running (state in $STATE)"
        print_env
        return
    fi
    stop_daemons  # leftovers of a half-started cluster
    install_packages
    local t0=$SECONDS
    rm -rf "$STATE/ctld" "$STATE/spool" "$STATE/run"
    mkdir -p "$STATE"/{ctld,spool,run,log}
    chmod 755 "$STATE"
    write_config
    write_sacct_shim
    start_munged
    slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    local name
    for name in $(slurmd_names); do
        slurmd -f "$CONF" -N "$name" || die "slurmd -N $name did not start; see $STATE/log/slurmd-$name.log"
    done
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        up_state "$state" && break
        sleep 0.5
    done
    if ! up_state "$state"; then
        tail -n 20 "$STATE/log/"*.log >&2 || true
        die "the node is not up after ${WAIT_S}s (state: '${state:-no answer}'); logs above, all under $STATE/log"
    fi
    say "up in $((SECONDS - t0))s: $(sinfo -h -o '%P:%D nodes,%c cpus,%t' | tr '\n' ' ')(state in $STATE)"
    print_env
}

status() {
    local name
    pid_alive "$STATE/munge/munged.pid" && pid_alive "$STATE/run/slurmctld.pid" || { say "not running"; return 1; }
    for name in $(slurmd_names); do
        pid_alive "$STATE/run/slurmd-$name.pid" || { say "slurmd -N $name is not running"; return 1; }
    done
    local state
    state=$(node_state)
    up_state "$state" || { say "node state: '${state:-no answer}'"; return 1; }
    sinfo
    squeue
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, then SIGKILL after 10 s
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/comm" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop_daemons() {
    local file
    for file in "$STATE"/run/slurmd*.pid; do stop_pid "$file" slurmd; done
    stop_pid "$STATE/run/slurmctld.pid" slurmctld
    stop_pid "$STATE/munge/munged.pid" munged
}

stop() {
    if pid_alive "$STATE/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ -n ${jobs// } ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 60); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
        fi
    fi
    stop_daemons
    say "stopped (logs kept in $STATE/log)"
}

case ${1:-} in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) print_env ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A two-node Ray cluster on this one machine: a head and a second node, each with its own
# raylet, so multi-node code paths (placement across nodes, `ray job submit`, RAY_ADDRESS) can
# be exercised without a cloud. Used by tests/integration/test_cluster_files.py.
#
#   cluster/local-multinode.sh start [DIR]   start both nodes; Ray's temp dir is DIR (default: a
#                                            new /tmp/lesa-ray-XXXXXX); prints the client env and
#                                            writes it to DIR/cluster.env
#   cluster/local-multinode.sh status [DIR]  `ray status` of that cluster
#   cluster/local-multinode.sh stop [DIR]    stop both nodes (DIR, or $LESA_RAY_TMP)
#   cluster/local-multinode.sh token         only make sure the token file exists, private
#
# Then, from any shell on this machine:
#   source DIR/cluster.env
#   ray job submit --working-dir . -- lesa train launch/synthetic.yaml --out /tmp/run \
#       --set data.url=$PWD/demo_out/data     # absolute: the job runs in an uploaded copy
#
# Security defaults: the dashboard (the jobs API, RAY_ADDRESS) binds to 127.0.0.1, usage stats are
# off, and Ray's token auth is on (RAY_AUTH_MODE=token). Ray 2.60 has no option to bind the GCS,
# raylet and agent ports to loopback: they listen on all interfaces and refuse callers without
# the token (use a host firewall on a shared network). The token is read from
# $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a missing file is
# created (mode 600, 256 random bits; a folder created for it is 700), and an existing one that
# others could read is made 600 (anyone who reads it can run code on the cluster). A client (ray job submit, ray status, ray.init) needs
# RAY_AUTH_MODE=token and the same token: that is what cluster.env exports.
#
# `stop` does not run `ray stop`: that kills every Ray process on the machine, other clusters
# and other users' test runs included. Each node is started in a session of its own (setsid)
# and `stop` ends the processes of those two sessions, by process id, and nothing else.
#
# Knobs (environment): LESA_RAY_CPUS_PER_NODE (1), LESA_RAY_OBJECT_STORE_BYTES (268435456),
# LESA_RAY_START_TIMEOUT (60 s), LESA_RAY_KEEP=1 keeps a DIR this script created on `stop`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
if [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
    PY="$REPO/.venv/bin/python"
    # Job entrypoints (`lesa`, `python`) then resolve to the project's venv on both nodes.
    export PATH="$REPO/.venv/bin:$PATH"
else
    RAY=$(command -v ray) || { echo "local-multinode: no .venv/bin/ray and no ray on PATH" >&2; exit 1; }
    PY=$(command -v python3 || command -v python)
fi

CPUS=${LESA_RAY_CPUS_PER_NODE:-1}
OBJECT_STORE=${LESA_RAY_OBJECT_STORE_BYTES:-268435456}
START_TIMEOUT=${LESA_RAY_START_TIMEOUT:-60}
STATE_NAME=cluster.env
MARKER=.created-by-local-multinode

export RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true
# A RAY_ADDRESS from the caller (say, inside another job) must not redirect `ray start`.
unset RAY_ADDRESS

die() { echo "local-multinode: $*" >&2; exit 1; }

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

state_dir() {  # the cluster's dir from the argument or $LESA_RAY_TMP
    local dir=${1:-${LESA_RAY_TMP:-}}
    [[ -n "$dir" ]] || die "which cluster? pass its DIR (printed by start) or set LESA_RAY_TMP"
    [[ -f "$dir/$STATE_NAME" ]] || die "$dir/$STATE_NAME not found: no cluster started there"
    echo "$dir"
}

setup_token() {  # token auth on, and a token the nodes and the clients share
    if [[ -n "${RAY_AUTH_MODE:-}" && "${RAY_AUTH_MODE,,}" != token ]]; then
        die "RAY_AUTH_MODE=$RAY_AUTH_MODE: this recipe keeps Ray's token auth on; unset it"
    fi
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        TOKEN_ENV='# RAY_AUTH_TOKEN: the value the cluster was started with (not written here)'
        return
    fi
    export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    local folder mode
    folder=$(dirname "$RAY_AUTH_TOKEN_PATH")
    # umask 077 makes every folder mkdir -p creates 700, and the file 600 from its first byte.
    [[ -d "$folder" ]] || (umask 077 && mkdir -p "$folder")
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
        echo "local-multinode: wrote a new Ray auth token to $RAY_AUTH_TOKEN_PATH" >&2
    else
        mode=$(stat -c %a "$RAY_AUTH_TOKEN_PATH")
        if (( 8#$mode & 8#077 )); then
            chmod 600 "$RAY_AUTH_TOKEN_PATH" || die "$RAY_AUTH_TOKEN_PATH is mode $mode, readable by others: chmod 600 it"
            echo "local-multinode: $RAY_AUTH_TOKEN_PATH was mode $mode, readable by others: now 600" >&2
        fi
    fi
    TOKEN_ENV="export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
}

start_node() {  # start_node LOGFILE ARGS...: `ray start ARGS` in a session of its own; prints its id
    local log=$1; shift
    # The shell that setsid runs leads the new session, so its pid is the session id.
    if ! setsid -w bash -c 'echo $$ >"$0.sid"; exec "$@"' "$log" "$RAY" start "$@" >"$log" 2>&1 </dev/null; then
        cat "$log" >&2
        [[ -s "$log.sid" ]] && kill_session "$(cat "$log.sid")"
        return 1
    fi
    cat "$log.sid"
}

session_pids() {  # session_pids SID KIND: live processes of session SID (never our own);
    # KIND: raylet, gcs_server, other (neither) or all
    local own
    own=$(ps -o sid= -p $$ | tr -d ' ')
    [[ "$1" =~ ^[0-9]+$ && "$1" != "$own" && "$1" != 0 && "$1" != 1 ]] || return 0
    # Zombies (exited, not yet reaped by init) are left alone: there is nothing to stop.
    ps -eo pid=,sid=,stat=,comm= | awk -v s="$1" -v k="$2" '
        $2 == s && $3 !~ /^Z/ && (k == "all" || $4 == k ||
                                  (k == "other" && $4 != "raylet" && $4 != "gcs_server")) { print $1 }'
}

kill_session() {  # stop session $1 in `ray stop`'s order: the raylet, the rest, the GCS last;
    # SIGTERM each group, SIGKILL what is left of it after 5 s
    local sid=$1 kind pids i
    for kind in raylet other gcs_server; do
        pids=$(session_pids "$sid" "$kind")
        [[ -n "$pids" ]] || continue
        kill -TERM $pids 2>/dev/null || true
        for i in $(seq 50); do
            sleep 0.1
            pids=$(session_pids "$sid" "$kind")
            [[ -n "$pids" ]] || break
        done
        if [[ -n "$pids" ]]; then
            echo "local-multinode: SIGKILL to what ignored SIGTERM: $(echo $pids)" >&2
            kill -KILL $pids 2>/dev/null || true
        fi
    done
}

cmd_start() {
    local dir=${1:-${LESA_RAY_TMP:-}}
    if [[ -z "$dir" ]]; then
        dir=$(mktemp -d /tmp/lesa-ray-XXXXXX)
        touch "$dir/$MARKER"
    else
        mkdir -p "$dir"
        dir=$(cd "$dir" && pwd)
    fi
    # Unix socket paths DIR/n2/session_<date>_<pid>/sockets/... must stay under 107 bytes.
    (( ${#dir} <= 36 )) || die "$dir is too long for Ray's socket paths: use a short one like /tmp/lesa-ray-x"
    [[ ! -f "$dir/$STATE_NAME" ]] || die "$dir already holds a cluster: stop it first"
    setup_token

    local gcs dash client
    gcs=$(free_port); dash=$(free_port); client=$(free_port)
    local common=(--num-cpus="$CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE" --disable-usage-stats)
    local head_sid worker_sid
    head_sid=$(start_node "$dir/head-start.log" --head --port="$gcs" \
        --dashboard-host=127.0.0.1 --dashboard-port="$dash" --ray-client-server-port="$client" \
        --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)" \
        --runtime-env-agent-port="$(free_port)" --temp-dir="$dir" "${common[@]}") \
        || die "the head node did not start (log: $dir/head-start.log)"
    # Recorded now, so `stop` finds the head even if the second node fails.
    printf 'LESA_RAY_HEAD_SID=%s\n' "$head_sid" >"$dir/sessions"
    # The second node gets a temp dir of its own: sharing the head's, its log monitor would
    # stream the head's worker logs too and every remote print would reach the driver twice.
    if ! worker_sid=$(start_node "$dir/worker-start.log" --address="127.0.0.1:$gcs" \
            --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)" \
            --runtime-env-agent-port="$(free_port)" --temp-dir="$dir/n2" "${common[@]}"); then
        kill_session "$head_sid"
        die "the second node did not start (log: $dir/worker-start.log)"
    fi
    printf 'LESA_RAY_WORKER_SID=%s\n' "$worker_sid" >>"$dir/sessions"

    cat >"$dir/$STATE_NAME" <<EOF
# Client env for the local two-node Ray cluster in $dir (source this file).
export RAY_ADDRESS=http://127.0.0.1:$dash
export RAY_GCS_ADDRESS=127.0.0.1:$gcs
export RAY_AUTH_MODE=token
$TOKEN_ENV
export RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true
export LESA_RAY_TMP=$dir
EOF
    wait_for_nodes "$dir" 2
    echo "local two-node Ray cluster up (temp dir $dir); a client needs:"
    grep '^export\|^#.*RAY_AUTH' "$dir/$STATE_NAME" | grep -v '^# Client'
    echo "ray job submit uses RAY_ADDRESS (the dashboard); ray.init and ray status take RAY_GCS_ADDRESS."
    echo "stop it with: $0 stop $dir"
}

wait_for_nodes() {  # until the GCS lists $2 alive nodes, or LESA_RAY_START_TIMEOUT passes
    local dir=$1 want=$2
    # shellcheck disable=SC1090,SC1091
    (source "$dir/$STATE_NAME"
     "$PY" - "$want" "$START_TIMEOUT" <<'PYEOF'
import os, sys, time
from ray.util.state import list_nodes
want, deadline = int(sys.argv[1]), time.time() + float(sys.argv[2])
while True:
    try:
        alive = [n for n in list_nodes(address=os.environ["RAY_ADDRESS"]) if n.state == "ALIVE"]
        if len(alive) >= want:
            break
    except Exception as exc:  # the dashboard may still be starting
        alive = [exc]
    if time.time() > deadline:
        sys.exit(f"local-multinode: {len(alive)} of {want} nodes alive after {sys.argv[2]} s: {alive}")
    time.sleep(1)
PYEOF
    ) || { cmd_stop "$dir" >&2 || true; die "the cluster did not come up"; }
}

cmd_status() {
    local dir
    dir=$(state_dir "${1:-}")
    # shellcheck disable=SC1090,SC1091
    source "$dir/$STATE_NAME"
    "$RAY" status --address "$RAY_GCS_ADDRESS"
}

cmd_stop() {
    local dir
    dir=$(state_dir "${1:-}")
    local LESA_RAY_HEAD_SID="" LESA_RAY_WORKER_SID=""
    # shellcheck disable=SC1090,SC1091
    [[ -f "$dir/sessions" ]] && source "$dir/sessions"
    # The second node first, so the head does not wait for it to be declared dead.
    [[ -n "$LESA_RAY_WORKER_SID" ]] && kill_session "$LESA_RAY_WORKER_SID"
    [[ -n "$LESA_RAY_HEAD_SID" ]] && kill_session "$LESA_RAY_HEAD_SID"
    rm -f "$dir/$STATE_NAME" "$dir/sessions"
    if [[ -f "$dir/$MARKER" && "${LESA_RAY_KEEP:-0}" != 1 ]]; then
        rm -rf "$dir"
        echo "stopped the cluster in $dir and removed it"
    else
        echo "stopped the cluster in $dir (its logs are in $dir/session_*/logs)"
    fi
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    status) shift; cmd_status "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    token) setup_token; echo "${RAY_AUTH_TOKEN_PATH:-RAY_AUTH_TOKEN (from the environment)}" ;;
    *) echo "usage: $0 start [DIR] | status [DIR] | stop [DIR] | token" >&2; exit 2 ;;
esac

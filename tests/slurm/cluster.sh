#!/bin/sh
# Starts a private one-node Slurm cluster on loopback, as root, for the Slurm tests and
# benchmarks: munged, slurmctld and slurmd with their configuration, sockets, spool folders,
# logs and pid files all under DIR, on free TCP ports, so it touches neither /etc/slurm nor a
# cluster already running on the machine. Clients find it through SLURM_CONF=DIR/slurm.conf.
#
#   tests/slurm/cluster.sh DIR [GPUS]    start (GPUS fake GPUs in gres.conf, no device files)
#   cat DIR/pids                         the daemons started, to stop by pid
#
# Needs Debian's slurm-wlm and munge (.ci/run installs them).
set -eu
dir=$1
gpus=${2:-2}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/munge" "$dir/ctld" "$dir/slurmd" "$dir/log"
chmod 700 "$dir/munge"
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
ctld_port=$(free_port)
d_port=$(free_port)
while [ "$d_port" = "$ctld_port" ]; do d_port=$(free_port); done
host=$(hostname -s)
# More CPUs than the machine has, on purpose (config_overrides below): tests and benchmarks
# submit many one-CPU jobs at once.
cpus=16
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 2>/dev/null
chmod 400 "$dir/munge/munge.key"
cat > "$dir/slurm.conf" <<EOC
ClusterName=fpipetest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 Gres=gpu:$gpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOC
# Slurm 22.05 drops GPUs without device files (`Name=gpu Count=2` alone registers none), so
# the fake GPUs are empty files standing in for /dev/nvidiaN: Slurm hands them out and sets
# CUDA_VISIBLE_DEVICES as on a real GPU node.
mkdir -p "$dir/dev"
i=0
while [ "$i" -lt "$gpus" ]; do : > "$dir/dev/nvidia$i"; i=$((i + 1)); done
printf 'Name=gpu Count=%s File=%s/dev/nvidia[0-%s]\n' "$gpus" "$dir" "$((gpus - 1))" > "$dir/gres.conf"
export SLURM_CONF="$dir/slurm.conf"
: > "$dir/pids"
/usr/sbin/munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
cat "$dir/munge/munged.pid" >> "$dir/pids"
slurmctld -i
for _ in $(seq 50); do [ -s "$dir/slurmctld.pid" ] && break; sleep 0.1; done
cat "$dir/slurmctld.pid" >> "$dir/pids"
slurmd
for _ in $(seq 50); do [ -s "$dir/slurmd.pid" ] && break; sleep 0.1; done
cat "$dir/slurmd.pid" >> "$dir/pids"
for _ in $(seq 100); do
    if sinfo -h -o '%t' 2>/dev/null | grep -q idle; then
        echo "$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "the test cluster in $dir did not come up; see $dir/log/" >&2
exit 1

# The slurm.conf settings both test clusters share (tests/slurm/local-up.sh: one node;
# tests/slurm/multinode/up.sh: N hosts): munge through a private munged, backfill every 2 s,
# requeue, real partition preemption, and the timeouts the fault tests rely on. Sourced; the
# caller sets CTLD_PORT SLURMD_PORT MUNGE_SOCK CRED_EXPIRE R CTLD_PID.

shared_slurm_conf() {
  cat <<EOF
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged; cred_expire also sets how long a requeued job waits before it may run again
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
# real preemption: a job in partition "high" preempts (requeues) jobs in
# "debug"; the victim first gets its --signal (e.g. B:USR1) at preemption
# time, then SIGTERM/SIGKILL after GraceTime unless it requeued itself.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation=$R/state
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$R/log/slurmctld.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
EOF
}

# After the node lines (slurm.conf names nodes before the partitions that hold them).
shared_slurm_partitions() {
  cat <<EOF
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

# Sourced by the sbatch scripts beside it (submit them from the repository root, so $SLURM_SUBMIT_DIR finds it).
#
# run_requeueable CMD...  runs CMD (an `srun ... torchrun ...` step) in the background and waits for it. When SLURM
# sends USR1 to this batch shell (`#SBATCH --signal=B:USR1@<seconds>`: that many seconds before the time limit), it
# is forwarded to the step with `kill -USR1 <srun>`; srun passes it on to every process of the step. ldm's training
# processes (ldm.train.loop: SIGTERM and SIGUSR1) finish the current step, write one checkpoint and exit 0; the
# launcher must ignore USR1 (`trap '' USR1` before `exec torchrun`: torchrun would otherwise die of it, and its
# workers, which run in sessions of their own, inherit the ignore but install ldm's handler). Once the step has
# exited 0 the job is requeued; the requeued job runs the same command, which resumes from the run's `latest`
# checkpoint (train.resume=auto, the default). A step that finishes on its own (max_steps reached) is not requeued.

run_requeueable() {
    local pid status
    _ldm_usr1=0
    trap '_ldm_usr1=1; echo "[$(date +%T)] USR1: time limit near, ldm writes a checkpoint"; kill -USR1 "$pid"' USR1
    "$@" &
    pid=$!
    wait "$pid"
    status=$?
    while [ "$_ldm_usr1" = 1 ] && kill -0 "$pid" 2>/dev/null; do  # wait returned early to run the trap
        wait "$pid"
        status=$?
    done
    trap - USR1
    if [ "$_ldm_usr1" = 1 ] && [ "$status" = 0 ]; then
        echo "[$(date +%T)] checkpoint written; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}

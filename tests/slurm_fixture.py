"""A real one-node Slurm on this machine for the Slurm test (recipe: ../shared/slurm/README.md).

``local_slurm(tmp)`` starts munged (unless one already runs), slurmctld and slurmd with a generated slurm.conf under
``tmp`` on free ports, exports SLURM_CONF, waits until the node is idle, and on exit stops exactly the daemons it
started, by their pid files. Needs root and Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them).
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ('/usr/sbin/slurmctld', '/usr/sbin/slurmd', '/usr/sbin/munged')
MUNGE_PID = Path('/run/munge/munged.pid')


def slurm_missing() -> str:
    """Why a local Slurm cannot be started here ('' when it can)."""
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    missing += [c for c in ('sinfo', 'sbatch', 'srun', 'squeue') if shutil.which(c) is None]
    if missing:
        return f'Slurm not installed ({", ".join(missing)} missing; apt-get install slurm-wlm munge)'
    if os.geteuid() != 0:
        return 'starting a local Slurm needs root'
    return ''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _pid_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _stop(pid_file: Path, timeout: float = 15.0) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _start_munge() -> bool:
    """Starts munged unless one is running; True if this call started it."""
    if MUNGE_PID.is_file() and _pid_alive(MUNGE_PID):
        return False
    key = Path('/etc/munge/munge.key')
    if not key.is_file():
        subprocess.run(['mungekey', '--create'], check=True)
    shutil.chown(key, 'munge', 'munge')
    key.chmod(0o400)
    MUNGE_PID.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_PID.parent, 'munge', 'munge')
    subprocess.run(['/usr/sbin/munged', '--force'], check=True)
    return True


def write_conf(tmp: Path) -> Path:
    host = socket.gethostname().split('.')[0]
    for d in ('state', 'spool'):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / 'slurm.conf'
    conf.write_text(f"""ClusterName=voxshieldtest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
""")
    return conf


@contextlib.contextmanager
def local_slurm(tmp: Path, timeout: float = 60.0):
    """Yields the path of slurm.conf of a running one-node Slurm (SLURM_CONF exported inside the block)."""
    tmp = Path(tmp)
    conf = write_conf(tmp)
    started_munge = False
    old = os.environ.get('SLURM_CONF')
    os.environ['SLURM_CONF'] = str(conf)
    try:
        started_munge = _start_munge()
        subprocess.run(['/usr/sbin/slurmctld', '-f', str(conf), '-L', str(tmp / 'ctld.log')], check=True)
        subprocess.run(['/usr/sbin/slurmd', '-f', str(conf), '-L', str(tmp / 'd.log')], check=True)
        deadline = time.time() + timeout
        state = ''
        while time.time() < deadline:
            out = subprocess.run(['sinfo', '-h', '-o', '%t'], capture_output=True, text=True)
            state = out.stdout.strip()
            if state == 'idle':
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f'local Slurm not idle after {timeout:.0f} s (sinfo: {state!r}); logs in {tmp}')
        yield conf
    finally:
        _stop(tmp / 'slurmd.pid')
        _stop(tmp / 'slurmctld.pid')
        if started_munge:
            _stop(MUNGE_PID)
        if old is None:
            os.environ.pop('SLURM_CONF', None)
        else:
            os.environ['SLURM_CONF'] = old

"""The generator's DDP wrapping, checked on CPU with the gloo backend (2 processes)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunetv2_voxshield.distributed import unwrap, wrap_ddp
from nnunetv2_voxshield.generator import NoiseGenerator

KWARGS = dict(dims=3, in_channels=1, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2,
              strides=[[1, 1, 1], [2, 2, 2]])


def _inputs(rank):
    torch.manual_seed(100 + rank)
    return torch.randn(1, 1, 8, 8, 8)


def _worker(rank, world_size, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    torch.manual_seed(0)
    generator = wrap_ddp(NoiseGenerator(**KWARGS), torch.device('cpu'))
    generator(_inputs(rank)).square().mean().backward()
    grads = [p.grad.clone() for p in unwrap(generator).parameters()]
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


def test_ddp_generator_averages_gradients_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'grads.pt')), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / 'grads.pt')
    expected = None
    for rank in range(2):
        torch.manual_seed(0)
        g = NoiseGenerator(**KWARGS)
        g(_inputs(rank)).square().mean().backward()
        grads = [p.grad / 2 for p in g.parameters()]
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
    assert len(ddp_grads) == len(expected)
    for got, want in zip(ddp_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_unwrap_returns_plain_modules_unchanged():
    g = NoiseGenerator(**KWARGS)
    assert unwrap(g) is g


# ----------------------------------------------------------------------------------------- the export lock
LOCK_SCRIPT = '''
import os, sys
from nnunetv2_voxshield import distributed
distributed.LOCK_POLL_SECONDS = 0.001
folder, counter = sys.argv[1], os.path.join(sys.argv[1], 'counter')
for _ in range(int(sys.argv[2])):
    with distributed.export_lock(folder):
        with open(counter) as f:
            n = int(f.read())
        os.remove(counter)
        with open(counter, 'w') as f:
            f.write(str(n + 1))
'''


def _holder(path):
    import json
    with open(path) as f:
        return json.load(f)


def _write_lock(folder, holder: dict, age: float = 0.0):
    import json
    import os
    import time
    path = folder / '.export.lock'
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_export_lock_is_a_file_created_exclusively_and_removed_on_exit(tmp_path):
    """The lock is a file in the shared folder (O_CREAT | O_EXCL), naming its holder, not a flock (node-local on
    several cluster file systems)."""
    import os
    import socket
    from nnunetv2_voxshield.distributed import export_lock
    lock = tmp_path / '.export.lock'
    with export_lock(str(tmp_path)):
        holder = _holder(lock)
        assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid() and holder['token']
        try:
            os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            raise AssertionError('the lock file can be created again while held')
        except FileExistsError:
            pass
    assert not lock.exists()


def test_export_lock_waits_for_a_live_holder_and_names_it(tmp_path):
    import socket
    import subprocess
    import sys
    import pytest
    from nnunetv2_voxshield.dataset_io import InputError
    from nnunetv2_voxshield.distributed import export_lock
    live = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)
    try:
        path = _write_lock(tmp_path, {'host': socket.gethostname(), 'pid': live.pid, 'token': 'x'})
        with pytest.raises(InputError, match=f'held by {socket.gethostname()}:{live.pid}') as exc:
            with export_lock(str(tmp_path), timeout=0.3):
                raise AssertionError('entered a held lock')
        assert str(path) in str(exc.value) and len(str(exc.value).splitlines()) == 1
        assert _holder(path)['pid'] == live.pid  # untouched
    finally:
        live.stdin.close()
        live.wait()
    # the holder is gone now: its lock is taken over at once
    with export_lock(str(tmp_path), timeout=0):
        assert _holder(path)['token'] != 'x'
    assert not path.exists()


def test_export_lock_of_another_host_is_taken_over_only_when_old(tmp_path):
    import pytest
    from nnunetv2_voxshield.dataset_io import InputError
    from nnunetv2_voxshield.distributed import export_lock
    other = {'host': 'another-node.invalid', 'pid': 1, 'token': 'y'}
    path = _write_lock(tmp_path, other, age=10)
    with pytest.raises(InputError, match='another-node.invalid:1'):
        with export_lock(str(tmp_path), timeout=0.2, stale_after=60):
            pass
    path = _write_lock(tmp_path, other, age=120)
    with export_lock(str(tmp_path), timeout=0, stale_after=60):
        assert _holder(path)['host'] != 'another-node.invalid'
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_export_lock_excludes_across_processes(tmp_path):
    """Two processes, 100 read-modify-write cycles each under the lock: no update is lost."""
    import subprocess
    import sys
    (tmp_path / 'counter').write_text('0')
    procs = [subprocess.Popen([sys.executable, '-c', LOCK_SCRIPT, str(tmp_path), '100'], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert (tmp_path / 'counter').read_text() == '200'
    assert not (tmp_path / '.export.lock').exists()

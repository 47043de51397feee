"""victims.run_logged writes a training's output to its log as it comes (the audit's 'epoch k/N' reads it live)."""
import os
import sys
import threading
import time

import pytest

from nnunetv2_voxshield.victims import VictimError, run_logged

CHILD = ("import os, time\n"
         "print('Epoch 1', flush=False)\n"
         "while not os.path.exists({flag!r}):\n"
         "    time.sleep(0.01)\n"
         "print('done')\n")


def test_log_has_each_line_while_the_command_still_runs(tmp_path):
    log, flag = tmp_path / 'sub' / 'nnunet.log', tmp_path / 'flag'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}
    worker = threading.Thread(target=run_logged, args=([sys.executable, '-c', CHILD.format(flag=str(flag))],
                                                       env, str(log)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        seen = False
        while not seen and time.monotonic() < deadline and worker.is_alive():
            seen = log.is_file() and 'Epoch 1' in log.read_text().splitlines()
        assert seen, 'the line printed by the running command never reached the log'
        assert 'done' not in log.read_text().splitlines()
    finally:
        flag.touch()
        worker.join()
    assert log.read_text().splitlines()[-2:] == ['Epoch 1', 'done']


def test_failure_names_the_log_and_its_last_lines(tmp_path):
    log = tmp_path / 'x.log'
    with pytest.raises(VictimError, match='x.log') as e:
        run_logged([sys.executable, '-c', "print('boom'); raise SystemExit(3)", 'a', 'b', 'c'], dict(os.environ),
                   str(log))
    assert 'exit 3' in str(e.value) and 'boom' in str(e.value)

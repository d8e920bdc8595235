"""Helper for the tests that start the project's scripts as real processes (python or torchrun)."""
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, args, nproc=None, check=True, timeout=300):
    """Run ROOT/script with args, under `torchrun --nproc_per_node=nproc` when nproc is given; returns
    (returncode, stdout, stderr). The process gets its own session, so on a timeout the launcher AND its workers
    are killed (no orphans left waiting in gloo). check=True fails the test on a non-zero exit."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
           if nproc else [sys.executable]) + [os.path.join(ROOT, script)] + list(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    if check:
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    return p.returncode, out, err

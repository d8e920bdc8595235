"""tests/gpu_acceptance.py under pytest. Without COF_GPU_ACCEPTANCE=1 it runs the script's CPU path (no GPU visible,
one thread, ~15 s): every check that can run on a CPU must pass and the GPU-only ones must say SKIP. With
COF_GPU_ACCEPTANCE=1 (on a CUDA machine) it runs the whole script on the GPU and every check must pass."""
import os
import re
import signal
import subprocess
import sys

from gpu_acceptance import GPU_ONLY

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_CHECKS = {"model/fp32_logits", "model/bf16_logits", "model/greedy_generate", "model/kv_cache", "cof/greedy_loop",
              "cof/sampled_rollouts", "sft/train", "sft/checkpoint_in_transformers", "grpo/train"}
COMPILE = "cof/compiled_decode"   # PASS, or SKIP on a CPU where torch.compile cannot compile


def _run(args, env, timeout):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_acceptance.py")] + args, cwd=os.path.dirname(HERE),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)       # the script and anything it started (torchrun)
        out, _ = p.communicate()
        raise AssertionError(f"gpu_acceptance.py {' '.join(args)} ran past {timeout} s:\n{out[-4000:]}")
    results = {}
    for line in out.splitlines():
        m = re.match(r"(PASS|FAIL|SKIP) (\S+): ", line)
        if m:
            results[m.group(2)] = m.group(1)
    return p.returncode, out, results


def test_gpu_acceptance_script():
    if os.environ.get("COF_GPU_ACCEPTANCE") == "1":
        rc, out, results = _run(["--device", "cuda"], dict(os.environ), timeout=900)
        assert rc == 0 and "FAIL" not in results.values(), out[-6000:]
        assert all(results.get(name) == "PASS" for name in CPU_CHECKS | set(GPU_ONLY) | {COMPILE}), out[-6000:]
        return
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    rc, out, results = _run(["--device", "cpu", "--threads", "1"], env, timeout=300)
    assert rc == 0 and re.search(r"^SUMMARY: \d+ passed, 0 failed", out, re.M), out[-6000:]
    assert results.get(COMPILE) in ("PASS", "SKIP"), out[-6000:]
    assert {n for n, s in results.items() if s == "PASS"} - {COMPILE} == CPU_CHECKS, out[-6000:]
    assert {n for n, s in results.items() if s == "SKIP"} - {COMPILE} == set(GPU_ONLY), out[-6000:]

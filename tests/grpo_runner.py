"""Runs grpo.train from a JSON config with a reward that always varies inside a group (the length of the response text),
so that a random tiny model gets real gradients; used by tests/test_grpo.py, also under torchrun. Started through
procs.run_script, which puts the repository root on PYTHONPATH (by hand: `PYTHONPATH=. python tests/grpo_runner.py
'{"model": ...}'` from the root)."""
import json
import sys

import grpo
import trainer


def length_reward(records):
    """A stand-in reward for random weights: responses with more characters score higher (deterministic given the
    samples, and it varies inside a group even when every sample has the same number of tokens)."""
    return [len(r["response"]) / 100.0 for r in records]


if __name__ == "__main__":
    cfg = grpo.GRPOConfig.from_dict(json.loads(sys.argv[1]))
    grpo.train(cfg, reward_fn=length_reward)
    trainer.finish_run()

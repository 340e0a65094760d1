"""R1-Zero: GRPO with rule-based rewards on the project's engine (`nanoseek rl`).

rewards.py (rule rewards, prompt sets), loss.py (advantages, k3 KL, the clipped surrogate and its
aggregations), rollout.py (engine rollouts, packing, log-probs), trainer.py (the loop), evaluate.py
(held-out pass@1 / pass@k with intervals), config.py (sections and presets), plots.py.
"""

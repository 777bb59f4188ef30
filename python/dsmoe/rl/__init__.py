"""dsmoe.rl: R1-style reinforcement learning (GRPO) on dsmoe's DeepSeek-V3 model.

``group_advantages`` and ``grpo_loss`` (the objective), ``GRPOTrainer`` (rollouts from :mod:`dsmoe.serve`,
updates through the FP8 training path, the expert-bias update between steps) and the ``dsmoe rl`` demo
(:mod:`dsmoe.rl.demo`). See docs/rl.md."""
from .loss import LOSS_TYPES, group_advantages, grpo_loss  # noqa: F401
from .trainer import GRPOTrainer, Rollouts, completion_logprobs  # noqa: F401

__all__ = ["group_advantages", "grpo_loss", "LOSS_TYPES", "GRPOTrainer", "Rollouts", "completion_logprobs"]

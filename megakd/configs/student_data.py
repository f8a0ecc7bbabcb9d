"""Training on the student's own samples: GKD's mixed/on-policy data and DistiLLM's adaptive
off-policy schedule with a replay buffer (docs/on_policy.md)."""

from __future__ import annotations

from dataclasses import dataclass

from megakd.configs.fields import flag


@dataclass
class StudentDataConfig:
    """Which microbatches carry the student's own responses instead of the reference ones.

    Per microbatch (not per iteration, so one global batch mixes both at about the requested
    rate): with GKD's ``--kd-student-data-fraction`` λ the student samples responses for the
    microbatch's prompts with probability λ (λ = 1: on-policy); with DistiLLM's
    ``--kd-adaptive-sgo`` a fresh sample with probability φ·(1 − t/T), a replayed one with
    probability up to φ, the reference data otherwise, φ rising when validation CE worsens.
    The teacher scores whatever the microbatch holds; CE applies to reference responses only.
    """

    fraction: float = flag(0.0, name="--kd-student-data-fraction", low=0.0, high=1.0,
                           help="GKD's lambda: each microbatch's responses are the student's "
                                "samples for the same prompts with this probability (1: "
                                "on-policy distillation)")
    adaptive: bool = flag(False, name="--kd-adaptive-sgo",
                          help="DistiLLM's adaptive off-policy student-generated outputs: "
                               "fresh samples with probability phi*(1-t/T), replayed ones up "
                               "to phi, reference data otherwise; phi rises when validation CE "
                               "worsens (needs --eval-interval)")
    initial_phi: float = flag(0.0, name="--kd-sgo-initial-phi", low=0.0, high=1.0,
                              help="phi at the start (DistiLLM: 0)")
    phi_step: float = flag(0.1, name="--kd-sgo-phi-step", low=0.0, high=1.0,
                           low_inclusive=False,
                           help="phi's rise when validation CE worsens (DistiLLM: 0.1 = 1/N_phi)")
    loss_eps: float = flag(0.1, name="--kd-sgo-loss-eps", low=0.0,
                           help="validation CE must exceed the last reference by more than "
                                "this for phi to rise (DistiLLM: 0.1)")
    replay_buffer_size: int = flag(1000, name="--kd-sgo-replay-buffer-size", low=1,
                                   help="student samples kept for replay per data-parallel "
                                        "rank (DistiLLM: 1000), drawn uniformly")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or self.adaptive

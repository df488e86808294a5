"""Flow-matching image actions: timestep grids and noise schedules, guided Euler/SDE sampling with exact
log-probs, and the serialisable record of one denoising trace.

A flow policy builds a :class:`FlowVelocity` (its conditional and unconditional velocity branches) and calls
:func:`sample_flow` to draw images; the learner stacks the recorded SDE steps (:func:`stack_steps`) and
rescores them with :func:`step_logprobs` under the same guidance.  The losses live in
:mod:`r3_rl.algorithms.flow_losses`.  See ``docs/architecture.md`` ("Flow-matching library").
"""
from r3_rl.flow.guidance import FlowVelocity, Guidance, guided_velocity
from r3_rl.flow.sampler import FlowSample, initial_noise, sample_flow, sibling_seeds
from r3_rl.flow.schedule import EtaSchedule, StochasticSteps, derive_seed, timestep_grid, train_subset
from r3_rl.flow.trace import DenoisingTrace, SdeStep, StepBatch, stack_steps
from r3_rl.flow.transition import euler_step, gaussian_logprob, sde_gaussian, step_distribution, step_logprobs

__all__ = [
    "DenoisingTrace", "EtaSchedule", "FlowSample", "FlowVelocity", "Guidance", "SdeStep", "StepBatch",
    "StochasticSteps", "derive_seed", "euler_step", "gaussian_logprob", "guided_velocity", "initial_noise",
    "sample_flow", "sde_gaussian", "sibling_seeds", "stack_steps", "step_distribution", "step_logprobs",
    "timestep_grid", "train_subset",
]

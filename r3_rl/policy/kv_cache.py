"""KV caches of our own forwards, and activation checkpointing that keeps the training forward's cache.

* :class:`PreallocatedCache` (sampling): every layer's keys/values are written in place into buffers sized
  for the whole run (context + every new token, CFG rows included), and attention reads a view of the
  filled part.  transformers' ``DynamicCache`` concatenates instead: a copy of the whole cache at every
  step (576 of them per Janus image) and, at the step's peak, the old and the new cache side by side.
* :class:`ReplayCache` (training forward, shared context): a layer's keys are a fixed past (its shared
  context's, or none) followed by this forward's own, rebuilt from the same tensors on every call.  So a
  decoder layer that activation checkpointing recomputes in backward gets exactly the keys it got in the
  forward; with a ``DynamicCache`` it would append them a second time, which is why transformers drops
  the cache under checkpointing -- and that would cut the siblings' targets off their shared context.
* :func:`enable_gradient_checkpointing` (``learner.gradient_checkpointing``) turns on transformers'
  checkpointing (non-reentrant) and lets the layers keep a cache, which our training forwards only ever
  pass as a :class:`ReplayCache`.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"preallocated KV cache full: {end} tokens > capacity {self.capacity}")
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class PreallocatedCache(Cache):
    """A KV cache of ``capacity`` positions per row, allocated on the first write, filled in place."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[_PreallocatedLayer(capacity) for _ in range(num_layers)])


class _ReplayLayer(DynamicLayer):
    def __init__(self, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                 rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.past, self.rows = past, rows
        if past is not None:
            self.keys, self.values = past
            self.device = past[0].device
            self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.past is None:
            self.keys, self.values = key_states, value_states
        else:
            past_k, past_v = self.past
            if self.rows is not None:  # each row's context, gathered here: a copy that lives only until the cat
                past_k, past_v = past_k.index_select(0, self.rows), past_v.index_select(0, self.rows)
            self.keys = torch.cat([past_k, key_states], dim=-2)
            self.values = torch.cat([past_v, value_states], dim=-2)
        self.device = key_states.device
        self.is_initialized = True
        return self.keys, self.values


class ReplayCache(Cache):
    """A training-forward cache safe to replay: ``update`` never accumulates, it rebuilds past + new."""

    def __init__(self, num_layers: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 rows: torch.Tensor | None = None) -> None:
        layers = [_ReplayLayer(past[i] if past is not None else None, rows) for i in range(num_layers)]
        super().__init__(layers=layers)

    def select(self, rows: torch.Tensor) -> "ReplayCache":
        """A new cache whose past is row ``rows[i]`` of this one's keys/values (a differentiable index).

        The rows are gathered inside each layer's ``update``, not here: gathered up front, every layer's
        per-row copy of the context lived for the whole forward -- and, under activation checkpointing, until
        backward, since the checkpoint keeps the cache for its recompute.  For Janus-Pro-7B's refine
        micro-batch (8 siblings x 2 CFG rows over a 1,634-position context) that was 16 x 0.8 GB.  Now a
        layer's copy is freed as soon as its ``torch.cat`` has read it (``benchmarks/shared_context_memory.py``).
        This cache is left as it is: a replay of the forward that filled it must find it unchanged."""
        past = [(layer.keys, layer.values) for layer in self.layers]
        return ReplayCache(len(self.layers), past, rows)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers' own
    non-reentrant checkpointing), keeping the layers' KV cache (always a :class:`ReplayCache` in training)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


def checkpointing_enabled(model: torch.nn.Module) -> bool:
    """Whether any decoder layer of ``model`` recomputes its activations in backward."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

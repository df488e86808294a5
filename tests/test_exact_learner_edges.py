"""Exact small cases for LoRA, precision, DeepSpeed config, checkpoint loading and the frozen fingerprint -- each one
a bug a mutation audit (round 7, 2026-12-06) slipped past the suite.  Expected values come from a peer: the LoRA
formula W x + (alpha / r) B A x and peft's own ``all-linear`` resolution, DeepSpeed's own config parser, numpy
for the fingerprint's sample positions, or a hand-built pickle."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_helpers import learner_cfg, tiny_policy

from r3_rl.errors import UserError

# ------------------------------------------------------------------------------------------------------------ LoRA


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_an_adapted_projection_computes_w_x_plus_alpha_over_r_b_a_x() -> None:
    """LoRA's update is (alpha / r) B A (Hu et al. 2021; peft's ``scaling``): r=4, alpha=16 scales B A by 4."""
    from r3_rl.learner.lora import apply_lora

    policy = tiny_policy()
    apply_lora(policy, learner_cfg(lora={"r": 4, "alpha": 16, "target_modules": ["q_proj"]}).lora)
    (name, layer), = _lora_layers(policy.model).items()
    assert name.endswith("q_proj")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
        x = torch.randn(3, layer.in_features, generator=gen)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        want = x @ layer.base_layer.weight.T + (16 / 4) * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_the_recipes_lora_dropout_reaches_the_adapters() -> None:
    from r3_rl.learner.lora import apply_lora

    policy = tiny_policy()
    apply_lora(policy, learner_cfg(lora={"r": 2, "dropout": 0.25, "target_modules": ["v_proj"]}).lora)
    layers = _lora_layers(policy.model)
    assert layers and all(m.lora_dropout["default"].p == 0.25 for m in layers.values())


def test_all_linear_targets_what_peft_all_linear_targets() -> None:
    """peft's own ``all-linear`` adapts every linear layer but the output head; ours resolves to the same layers."""
    from peft import LoraConfig, get_peft_model

    from r3_rl.learner.lora import lora_targets

    policy = tiny_policy()
    ours = lora_targets(policy, learner_cfg(lora={"target_modules": "all-linear"}).lora)
    peer = get_peft_model(copy.deepcopy(policy.model), LoraConfig(r=2, target_modules="all-linear"))
    theirs = [n.removeprefix("base_model.model.") for n in _lora_layers(peer)]
    assert "lm_head" not in ours and sorted(ours) == sorted(theirs) and len(ours) == 7


def test_the_export_leaves_the_live_adapters_unmerged(tmp_path: Path) -> None:
    """The export merges on a copy: the live base weights are bit-identical afterwards, no layer is merged, and the
    adapters still act (a live model left merged would stop training them and double them on re-merge)."""
    from types import SimpleNamespace

    from r3_rl.learner.build import build_learner

    policy = tiny_policy()
    learner = build_learner(policy, None, SimpleNamespace(learner=learner_cfg(lora={"r": 4, "alpha": 8})))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.full_like(p, 0.05))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    learner.export(str(tmp_path / "merged"))
    after = policy.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    layers = _lora_layers(policy.model)
    assert layers and not any(m.merged for m in layers.values())


def test_the_reference_scores_with_the_adapters_off_for_text_and_denoising() -> None:
    """The KL reference under LoRA is the base model: both of its scores (text log-probs and a flow policy's
    denoising scores) run with every adapter switched off, and the adapters are back on afterwards."""
    from r3_rl.learner.lora import apply_lora

    policy = tiny_policy()
    ref = apply_lora(policy, learner_cfg(lora={"r": 2}).lora).reference()
    layers = list(_lora_layers(policy.model).values())
    seen: list[list[bool]] = []
    policy.segment_logprobs = lambda segs: seen.append([m.disable_adapters for m in layers]) or []  # type: ignore
    policy.denoising_scores = lambda segs: seen.append([m.disable_adapters for m in layers]) or []  # type: ignore
    ref.segment_logprobs([])
    ref.denoising_scores([])
    assert len(layers) == 4 and seen == [[True] * 4, [True] * 4]
    assert not any(m.disable_adapters for m in layers)


# ------------------------------------------------------------------------------------------------------ precision


def test_fp32_adapters_on_a_bf16_model_leave_it_computing_in_bf16() -> None:
    """peft builds adapters in fp32 on a bf16 base (torch backend): the policy still computes (and trains) in bf16."""
    from r3_rl.learner.lora import apply_lora
    from r3_rl.learner.precision import check_precision, compute_dtype

    policy = tiny_policy()
    policy.model.to(torch.bfloat16)
    apply_lora(policy, learner_cfg(lora={"r": 4}).lora)
    dtypes = {p.dtype for n, p in policy.model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}  # peft's autocast_adapter_dtype
    assert compute_dtype(policy.model) == torch.bfloat16
    assert check_precision(compute_dtype(policy.model), learner_cfg()) == "bf16"


def test_the_torch_backend_ignores_deepspeeds_zero_stage() -> None:
    """ZeRO-0's bf16 gradient accumulation is DeepSpeed's: the torch backend (fp32 masters) trains bf16 whatever
    ``learner.deepspeed.zero_stage`` says."""
    from r3_rl.learner.precision import check_precision

    assert check_precision(torch.bfloat16, learner_cfg(deepspeed={"zero_stage": 0})) == "bf16"


# ---------------------------------------------------------------------------------------------- DeepSpeed config


def test_a_users_deepspeed_key_overrides_the_learners_default() -> None:
    """``learner.deepspeed.config`` is merged last: DeepSpeed's own parser sees the user's value, not ours."""
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_config import _Ranks, ds_config, pick_accelerator

    pick_accelerator()  # before deepspeed is imported
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = learner_cfg(backend="deepspeed", micro_batch_size=2,
                      deepspeed={"config": {"steps_per_print": 7, "wall_clock_breakdown": True}})
    parsed = DeepSpeedConfig(ds_config(cfg), mpu=_Ranks(1))
    assert parsed.steps_per_print == 7 and parsed.wall_clock_breakdown is True


@pytest.mark.parametrize("stage, refused", [(0, True), (1, True), (2, False)])
def test_overlap_comm_is_refused_below_zero_2(stage: int, refused: bool) -> None:
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_config import check_ds_config

    cfg = learner_cfg(backend="deepspeed", deepspeed={"zero_stage": stage,
                                                       "config": {"zero_optimization": {"overlap_comm": True}}})
    if refused:
        with pytest.raises(UserError, match="overlap_comm needs ZeRO stage 2"):
            check_ds_config(cfg, "fp32")
    else:
        check_ds_config(cfg, "fp32")


def test_deepspeed_managing_gradient_accumulation_is_refused() -> None:
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_config import check_ds_config

    cfg = learner_cfg(backend="deepspeed", deepspeed={"config": {"managed_gradient_accumulation": True}})
    with pytest.raises(UserError, match="would manage gradient accumulation itself"):
        check_ds_config(cfg, "fp32")


# ----------------------------------------------------------------------------------------------- checkpoint files


class _NumpyPayload:
    """Unpickling this calls ``numpy.testing``'s ``runstring``: an ``exec`` behind a ``numpy.`` name."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        from numpy.testing._private.utils import runstring

        return (runstring, (f"open({self.marker!r}, 'w')", {}))


def test_a_numpy_callable_outside_the_allowlist_is_refused_by_the_scan(tmp_path: Path) -> None:
    from r3_rl.learner.safe_load import safe_torch_load, scan_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"x": _NumpyPayload(marker)}, tmp_path / "trainer.pt")
    with pytest.raises(UserError, match="references numpy.testing._private.utils.runstring"):
        scan_checkpoint(tmp_path)
    with pytest.raises(UserError, match="refusing to load it"):
        safe_torch_load(tmp_path / "trainer.pt")
    assert not marker.exists()


def test_an_unreadable_pt_does_not_end_the_scan(tmp_path: Path) -> None:
    """A junk ``.pt`` sorted first is skipped (the weights-only load decides on it); the files after it are still
    scanned, or one planted file would hide a payload behind it."""
    from r3_rl.learner.safe_load import scan_checkpoint

    (tmp_path / "a.pt").write_bytes(b"not a checkpoint")
    torch.save({"x": _NumpyPayload(tmp_path / "pwned")}, tmp_path / "b.pt")
    with pytest.raises(UserError, match=r"b\.pt: refusing to load it"):
        scan_checkpoint(tmp_path)


def test_files_up_to_hash_max_bytes_get_a_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"each up to HASH_MAX_BYTES": a file of exactly that size is hashed, one byte more is listed by size only."""
    from r3_rl.learner import manifest

    monkeypatch.setattr(manifest, "HASH_MAX_BYTES", 4)
    (tmp_path / "a").write_bytes(b"abcd")
    (tmp_path / "b").write_bytes(b"abcde")
    assert manifest.file_manifest(tmp_path) == {"a": {"bytes": 4, "sha256": hashlib.sha256(b"abcd").hexdigest()},
                                                "b": {"bytes": 5, "sha256": None}}


def test_the_frozen_fingerprint_samples_the_rounded_evenly_spaced_positions() -> None:
    """The digest is part of the checkpoint format (a resume compares it with the one saved): pinned here against
    numpy's ``rint(linspace(...))`` positions, so a change of positions (truncation, another count) that would
    refuse every existing LoRA checkpoint is seen.  10000 values: more than SAMPLES, so not every one is read."""
    from r3_rl.learner.frozen import SAMPLES, fingerprint

    t = torch.arange(10000, dtype=torch.float32) * 0.5
    where = np.rint(np.linspace(0, 9999, SAMPLES)).astype(np.int64)
    want = hashlib.sha256(b"w|torch.float32|(10000,)|" + t.numpy()[where].tobytes()).hexdigest()
    assert SAMPLES == 4096 and fingerprint([("w", t)]) == want

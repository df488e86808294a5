"""Exact small cases for checkpoint integrity, pickle-free loading, frozen-weight fingerprints, LoRA adapters and
which checkpoint ``--resume`` picks (round 13B audit).

Each test pins a behaviour a one-point mutation of ``r3_rl/learner/{manifest,safe_load,frozen,lora,
checkpoint_find}.py`` changed without the rest of the suite noticing.  Expected values are hand-computed (file
lists, sizes, hashlib digests, the order of fsyncs) or come from a peer (hashlib, ``torch.load`` itself).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from r3_rl.errors import UserError
from r3_rl.learner import manifest

# ------------------------------------------------------------------------------------------------- file list


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def test_a_file_of_a_few_hundred_kilobytes_gets_a_hash(tmp_path: Path) -> None:
    """HASH_MAX_BYTES is 256 MiB ("state files, configs, a small model"): a 257 KiB file is hashed, not sized only."""
    data = bytes(range(256)) * 1028  # 263168 bytes: past 256 KiB, far below 256 MiB
    (tmp_path / "trainer.pt").write_bytes(data)
    assert manifest.HASH_MAX_BYTES == 256 * 1024 * 1024
    assert manifest.file_manifest(tmp_path) == {
        "trainer.pt": {"bytes": 263168, "sha256": hashlib.sha256(data).hexdigest()}}


def test_the_file_list_names_nested_files_by_relative_path_in_path_order(tmp_path: Path) -> None:
    """Keys are POSIX paths relative to the checkpoint, sorted: ``a/x`` before ``b`` although rglob yields ``b``
    (top level) first; two files of one name in two folders are two entries."""
    _write(tmp_path, {"b": b"12", "a/x": b"1", "a/c/x": b"123"})
    assert list(manifest.file_sizes(tmp_path).items()) == [("a/c/x", 3), ("a/x", 1), ("b", 2)]
    got = manifest.file_manifest(tmp_path)
    assert list(got) == ["a/c/x", "a/x", "b"]
    assert got["a/x"] == {"bytes": 1, "sha256": hashlib.sha256(b"1").hexdigest()}


def test_sync_tree_flushes_every_file_then_folders_deepest_first_then_the_folder(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, {"m.json": b"{}", "state/s.pt": b"x", "state/deep/d.bin": b"y"})
    (tmp_path / "link").symlink_to(tmp_path / "m.json")
    seen: list[str] = []
    monkeypatch.setattr(manifest, "sync_path", lambda p: seen.append(Path(p).relative_to(tmp_path).as_posix()))
    manifest.sync_tree(tmp_path)
    assert seen == ["m.json", "state/deep/d.bin", "state/s.pt", "state/deep", "state", "."]


# --------------------------------------------------------------------------------------------- verify_files


def _listed(folder: Path, files: dict[str, bytes]) -> dict:
    _write(folder, files)
    return {"files": manifest.file_manifest(folder)}


def test_a_missing_listed_file_is_named_missing(tmp_path: Path) -> None:
    meta = _listed(tmp_path, {"state/trainer.pt": b"abc"})
    (tmp_path / "state" / "trainer.pt").unlink()
    with pytest.raises(UserError, match=r"trainer\.pt: missing; the checkpoint is damaged"):
        manifest.verify_files(tmp_path, meta)


def test_a_shorter_or_longer_file_is_refused_naming_both_sizes(tmp_path: Path) -> None:
    meta = _listed(tmp_path, {"state/trainer.pt": b"abcdef"})
    for data, size in ((b"abc", 3), (b"abcdefgh", 8)):
        (tmp_path / "state" / "trainer.pt").write_bytes(data)
        with pytest.raises(UserError, match=rf"trainer\.pt: {size} bytes, 6 when saved; the checkpoint is damaged"):
            manifest.verify_files(tmp_path, meta)


def test_same_size_other_contents_is_refused_by_the_hash(tmp_path: Path) -> None:
    meta = _listed(tmp_path, {"state/trainer.pt": b"abcdef"})
    (tmp_path / "state" / "trainer.pt").write_bytes(b"abcdeg")
    with pytest.raises(UserError, match=r"contents changed since it was saved \(SHA-256 differs\)"):
        manifest.verify_files(tmp_path, meta)
    meta["files"]["state/trainer.pt"]["sha256"] = None  # a large file: listed by size only
    manifest.verify_files(tmp_path, meta)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x"])
def test_an_entry_outside_the_folder_is_a_bad_entry_even_when_the_file_exists(tmp_path: Path, bad: str) -> None:
    ckpt = tmp_path / "step_000001"
    meta = _listed(ckpt, {"a/f": b"abc"})
    (tmp_path / "x").write_bytes(b"abc")
    entry = {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    with pytest.raises(UserError, match=r"checkpoint\.json: bad entry"):
        manifest.verify_files(ckpt, {"files": {**meta["files"], bad: entry}})


def test_an_entry_that_is_not_a_mapping_is_a_one_line_user_error(tmp_path: Path) -> None:
    _listed(tmp_path, {"a": b"abc"})
    for want in (3, None, [3]):
        with pytest.raises(UserError, match=r"bad entry 'a' in 'files'"):
            manifest.verify_files(tmp_path, {"files": {"a": want}})


def test_a_symbolic_link_to_a_matching_file_is_refused_as_a_link(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    meta = _listed(ckpt, {"m.json": b"{}"})
    (tmp_path / "same").write_bytes(b"{}")
    (ckpt / "m.json").unlink()
    (ckpt / "m.json").symlink_to(tmp_path / "same")
    with pytest.raises(UserError, match=r"m\.json: a symbolic link; the checkpoint is damaged"):
        manifest.verify_files(ckpt, meta)


def test_a_symbolic_link_to_a_folder_of_matching_files_is_refused_as_a_link(tmp_path: Path) -> None:
    """A linked folder reads every file under it from outside the checkpoint, as a linked file would."""
    ckpt = tmp_path / "c"
    meta = _listed(ckpt, {"model/w.bin": b"abc"})
    elsewhere = tmp_path / "elsewhere"
    (ckpt / "model").rename(elsewhere)
    (ckpt / "model").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError) as e:
        manifest.verify_files(ckpt, meta)
    assert str(e.value) == (f"{ckpt / 'model'}: a symbolic link; the checkpoint is damaged; "
                            "resume from an earlier one (--resume PATH) or delete this one")


# ------------------------------------------------------------------------------------------------ safe loading


def _fragment(tmp_path: Path) -> Path:
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.save({"frag": fragment_address(numel=3, start=1), "w": torch.ones(2)}, tmp_path / "optim_states.pt")
    return tmp_path / "optim_states.pt"


def test_the_load_honours_map_location(tmp_path: Path) -> None:
    from r3_rl.learner.safe_load import safe_torch_load

    torch.save({"w": torch.ones(3)}, tmp_path / "a.pt")
    assert safe_torch_load(tmp_path / "a.pt", map_location="meta")["w"].is_meta
    assert not safe_torch_load(tmp_path / "a.pt")["w"].is_meta


def test_deepspeed_classes_load_only_when_asked(tmp_path: Path) -> None:
    """A ZeRO state's fragment_address is allowlisted (scan and load) for DeepSpeed's files only."""
    from r3_rl.learner.safe_load import safe_torch_load, scan_checkpoint

    f = _fragment(tmp_path)
    scan_checkpoint(tmp_path)  # on the allowlist
    got = safe_torch_load(f, deepspeed=True)
    assert (got["frag"].numel, got["frag"].start) == (3, 1) and torch.equal(got["w"], torch.ones(2))
    with pytest.raises(UserError, match=r"optim_states\.pt: refusing to load it: Unsupported global"):
        safe_torch_load(f)


def test_a_refusal_names_the_whole_global_not_its_first_dotted_part(tmp_path: Path) -> None:
    """torch says ``Unsupported global: GLOBAL deepspeed.utils.tensor_fragment.fragment_address was not ...``: the
    one line keeps the dotted name (it said ``GLOBAL deepspeed``, cut at the first dot)."""
    from r3_rl.learner.safe_load import safe_torch_load

    f = _fragment(tmp_path)
    with pytest.raises(UserError, match=r"refusing to load it: Unsupported global: GLOBAL "
                                        r"deepspeed\.utils\.tensor_fragment\.fragment_address was not"):
        safe_torch_load(f)


def test_a_blocked_module_is_named_in_the_refusal(tmp_path: Path) -> None:
    """torch blocks some modules outright (``posix``, ``subprocess``) with another sentence, "Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked": the one line names the call (it said only "it is
    not a weights-only pickle")."""
    import os
    import pickle

    from r3_rl.learner.safe_load import safe_torch_load

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "trainer.pt").write_bytes(pickle.dumps({"rng": Payload()}, protocol=2))
    with pytest.raises(UserError) as e:
        safe_torch_load(tmp_path / "trainer.pt")
    assert str(e.value).startswith(f"{tmp_path / 'trainer.pt'}: refusing to load it: unsupported GLOBAL "
                                   f"{os.system.__module__}.system whose module {os.system.__module__} is blocked; "
                                   "only tensors and plain data are accepted")


def test_numpy_state_and_the_allowlisted_numpy_classes_pass_the_scan_and_the_load(tmp_path: Path) -> None:
    """Format 1's numpy RNG state (a uint32 array) loads; a pickle naming an allowlisted numpy class (its GLOBAL is
    ``numpy.dtypes.UInt32DType``) passes the scan as it passes the load: the two allowlists agree."""
    import numpy as np

    from r3_rl.learner.safe_load import safe_torch_load, scan_checkpoint

    state = np.random.RandomState(3).get_state()
    torch.save({"numpy": state, "cls": type(np.dtype(np.uint32))}, tmp_path / "trainer.pt")
    scan_checkpoint(tmp_path)
    got = safe_torch_load(tmp_path / "trainer.pt")
    assert got["cls"] is type(np.dtype(np.uint32)) and got["numpy"][0] == "MT19937"
    assert got["numpy"][1].dtype == np.uint32 and np.array_equal(got["numpy"][1], state[1])


def test_an_unsupported_opcode_is_a_refusal_naming_it(tmp_path: Path) -> None:
    from r3_rl.learner.safe_load import safe_torch_load

    (tmp_path / "op.pt").write_bytes(b"(i__main__\nX\n.")  # protocol 0 INST: builds an object by name
    with pytest.raises(UserError, match=r"op\.pt: refusing to load it: Unsupported operand 105;"):
        safe_torch_load(tmp_path / "op.pt")


def test_a_truncated_file_is_a_one_line_user_error(tmp_path: Path) -> None:
    from r3_rl.learner.safe_load import safe_torch_load

    torch.save({"w": torch.ones(3)}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"a\.pt: cannot read checkpoint file \(RuntimeError: PytorchStreamReader"):
        safe_torch_load(tmp_path / "a.pt")


def test_the_scan_reaches_pt_files_in_nested_folders(tmp_path: Path) -> None:
    """DeepSpeed writes its files one folder down (``deepspeed/global_stepN/``): a payload there is refused."""
    from r3_rl.learner.safe_load import scan_checkpoint


    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    deep = tmp_path / "deepspeed" / "global_step2"
    deep.mkdir(parents=True)
    torch.save({"x": _Payload()}, deep / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=r"mp_rank_00_model_states\.pt: refusing to load it: it references "
                                        r"builtins\.print"):
        scan_checkpoint(tmp_path)


class _Payload:
    def __reduce__(self):  # noqa: D105 - a planted callable (print: harmless if it ever ran)
        return (print, ("ran",))


def test_deepspeeds_own_loads_go_through_the_safe_load_with_its_classes_and_map_location(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from r3_rl.learner.safe_load import make_deepspeed_loads_safe

    f = _fragment(tmp_path)
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())  # no load_universal_checkpoint: not universal
    make_deepspeed_loads_safe(engine)
    got = engine.checkpoint_engine.load(str(f), map_location="meta")
    assert got["frag"].numel == 3 and got["w"].is_meta
    torch.save({"x": _Payload()}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="refusing to load it"):
        engine.checkpoint_engine.load(str(tmp_path / "bad.pt"))


# ------------------------------------------------------------------------------------------ frozen fingerprints


class _Tied(torch.nn.Module):
    """An embedding tied to the output head (trained), a frozen projection, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.frozen = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.ones(3))


def test_frozen_names_are_frozen_parameters_and_buffers_not_a_trained_tied_weights_second_name() -> None:
    module = _Tied()
    from r3_rl.learner.frozen import frozen_names

    assert set(module.state_dict()) == {"embed.weight", "frozen.weight", "frozen.bias", "head.weight", "scale"}
    assert frozen_names(module) == {"frozen.weight", "frozen.bias", "scale"}
    module.embed.requires_grad_(False)  # a frozen tied weight: both of its names
    assert frozen_names(module) == {"frozen.weight", "frozen.bias", "scale", "embed.weight", "head.weight"}


def _digest(*parts: tuple[str, torch.Tensor]) -> str:
    """The fingerprint of tensors of at most SAMPLES values, written out: every value is read, in name order."""
    d = hashlib.sha256()
    for name, t in sorted(parts, key=lambda x: x[0]):
        d.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)  # numpy has no bfloat16: its bits as int16
        d.update((flat.view(torch.int16) if t.dtype == torch.bfloat16 else flat).numpy().tobytes())
    return d.hexdigest()


def test_a_small_tensors_fingerprint_hashes_every_value_once_in_name_order() -> None:
    from r3_rl.learner.frozen import fingerprint

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    assert fingerprint([("b", b), ("a", a)]) == _digest(("a", a), ("b", b))
    assert fingerprint([("a", a), ("b", b)]) == fingerprint([("b", b), ("a", a)])
    assert fingerprint([("one", torch.tensor(3.0))]) == _digest(("one", torch.tensor(3.0)))
    assert fingerprint([]) is None


def test_the_fingerprint_covers_the_frozen_parameters_only() -> None:
    from r3_rl.learner.frozen import frozen_fingerprint

    module = _Tied()
    want = _digest(("frozen.bias", module.frozen.bias.detach()), ("frozen.weight", module.frozen.weight.detach()))
    assert frozen_fingerprint(module) == want
    module.frozen.requires_grad_(True)
    assert frozen_fingerprint(module) is None


def test_the_frozen_check_passes_an_old_checkpoint_and_names_both_fingerprints() -> None:
    from r3_rl.learner.frozen import check_same_frozen

    check_same_frozen(None, "a" * 64, "ckpt")  # written before fingerprints: it holds its frozen weights
    check_same_frozen("a" * 64, "a" * 64, "ckpt")
    with pytest.raises(UserError, match=r"^ckpt: the frozen \(base\) weights .* \(fingerprint bbbbbbbbbbbb vs "
                                        r"aaaaaaaaaaaa\)"):
        check_same_frozen("a" * 64, "b" * 64, "ckpt")
    with pytest.raises(UserError, match=r"fingerprint None vs aaaaaaaaaaaa"):
        check_same_frozen("a" * 64, None, "ckpt")


# ------------------------------------------------------------------------------------------------ LoRA targets


class _Experts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text, self.image = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.k_proj = _Experts()  # per-expert copies: each one is adapted
        self.norm = torch.nn.LayerNorm(4)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lm = torch.nn.ModuleList([_Block()])
        self.embed_tokens = torch.nn.Embedding(7, 4)
        self.lm2 = _Block()  # a sibling whose name starts with the language model's
        self.vision = _Block()
        self.lm_head = torch.nn.Linear(4, 7)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def _targets(targets, roots=("lm",), train_vision: bool = False) -> list[str]:
    from types import SimpleNamespace

    from r3_rl.learner.lora import lora_targets

    policy = SimpleNamespace(model=_Toy(), lora_scope=lambda vision: list(roots) + (["vision"] if vision else []),
                             lora_target_names=lambda written: list(written))
    return lora_targets(policy, SimpleNamespace(target_modules=targets, train_vision=train_vision))


def test_targets_stay_inside_the_scope_and_come_in_module_order() -> None:
    assert _targets(["v_proj", "q_proj"]) == ["lm.0.q_proj", "lm.0.v_proj"]
    assert _targets("q_proj", train_vision=True) == ["lm.0.q_proj", "vision.q_proj"]
    assert _targets(["q_proj"], roots=("",)) == ["lm.0.q_proj", "lm2.q_proj", "vision.q_proj"]


def test_a_container_target_adapts_its_linear_layers_and_a_leaf_target_itself() -> None:
    assert _targets(["k_proj"]) == ["lm.0.k_proj.text", "lm.0.k_proj.image"]
    assert _targets(["embed_tokens"], roots=("",)) == ["embed_tokens"]
    block = ["q_proj", "v_proj", "k_proj.text", "k_proj.image"]  # in module order, the embedding between blocks
    assert _targets(["all-linear", "embed_tokens"], roots=("",)) == (
        [f"lm.0.{n}" for n in block] + ["embed_tokens"] + [f"lm2.{n}" for n in block] + [f"vision.{n}" for n in block])


def test_all_linear_is_every_linear_layer_but_the_head_once_each() -> None:
    want = ["lm.0.q_proj", "lm.0.v_proj", "lm.0.k_proj.text", "lm.0.k_proj.image"]
    assert _targets("all-linear") == want
    assert _targets(["q_proj", "all-linear", "k_proj"]) == want
    every = _targets("all-linear", roots=("",))
    assert "lm_head" not in every and len(every) == 12 and not any(n.endswith("norm") for n in every)


def test_a_target_outside_the_scope_names_the_scope() -> None:
    with pytest.raises(UserError, match=r"'embed_tokens' is not a module of the policy's language model \(e\.g\. "
                                        r"k_proj, q_proj, v_proj\)"):
        _targets(["q_proj", "embed_tokens"])
    with pytest.raises(UserError, match=r"'nope' is not a module of the policy's language model or vision tower"):
        _targets(["nope"], train_vision=True)


def test_only_deepspeed_computes_adapters_in_the_base_dtype() -> None:
    from types import SimpleNamespace

    from r3_rl.learner.lora import adapters_in_base_dtype

    assert adapters_in_base_dtype(SimpleNamespace(backend="deepspeed")) is True
    assert adapters_in_base_dtype(SimpleNamespace(backend="torch")) is False


def test_adapters_in_the_base_dtype_are_bf16_and_only_adapters_train() -> None:
    from learner_helpers import learner_cfg, tiny_policy

    from r3_rl.learner.lora import apply_lora

    policy = tiny_policy()
    policy.model.to(torch.bfloat16)
    apply_lora(policy, learner_cfg(lora={"r": 2}).lora, in_base_dtype=True)
    trained = {n: p.dtype for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained) and set(trained.values()) == {torch.bfloat16}


def test_the_reference_scores_without_building_a_graph() -> None:
    from learner_helpers import learner_cfg, tiny_policy

    from r3_rl.learner.lora import apply_lora

    policy = tiny_policy()
    ref = apply_lora(policy, learner_cfg(lora={"r": 2}).lora).reference()
    policy.segment_logprobs = lambda segs: [torch.is_grad_enabled()]  # type: ignore[method-assign]
    policy.denoising_scores = lambda segs: [torch.is_grad_enabled()]  # type: ignore[method-assign]
    assert ref.segment_logprobs([]) == [False] and ref.denoising_scores([]) == [False]
    assert ref.model is policy.model


# ---------------------------------------------------------------------------------------- which checkpoint


def _ckpt(root: Path, name: str, meta: dict | None = None) -> Path:
    p = root / name
    p.mkdir(parents=True)
    (p / "checkpoint.json").write_text(json.dumps({"complete": True, "step": 0} if meta is None else meta))
    return p


def test_a_backup_copy_named_after_a_step_is_not_a_checkpoint(tmp_path: Path) -> None:
    from r3_rl.learner import checkpoint_find as cf

    run = tmp_path / "run"
    four = _ckpt(run / "checkpoints", "step_000004")
    _ckpt(run / "checkpoints", "step_000009.bak")
    _ckpt(run / "checkpoints", "step_000008-copy")
    assert cf.complete_checkpoints(run / "checkpoints") == [four]
    assert cf.latest_checkpoint(run) == four
    assert cf.set_aside_later(four, run) == []


def test_an_interrupted_swap_never_replaces_a_step_that_is_there(tmp_path: Path) -> None:
    from r3_rl.learner import checkpoint_find as cf

    root = tmp_path / "checkpoints"
    new = _ckpt(root, "step_000003", {"complete": True, "step": 3, "v": "new"})
    old = _ckpt(root, ".old-step_000003-77", {"complete": True, "step": 3, "v": "old"})
    gone = _ckpt(root, ".old-step_000005-77")
    assert cf.restore_interrupted_swap(root) == [root / "step_000005"]
    assert json.loads((new / "checkpoint.json").read_text())["v"] == "new" and old.is_dir() and not gone.exists()


def test_resume_auto_takes_a_checkpoint_that_names_no_recipe(tmp_path: Path) -> None:
    """Checkpoints written before they named their recipe are still this recipe's (``--resume auto``)."""
    from types import SimpleNamespace

    from r3_rl.learner import checkpoint_find as cf

    run = tmp_path / "x-20260101-000000"
    ckpt = _ckpt(run / "checkpoints", "step_000002")
    assert cf.find_resume("auto", SimpleNamespace(out_dir=str(tmp_path), name="x"), None) == (ckpt, run)


def test_apply_lora_trains_the_named_adapters_and_no_bias() -> None:
    """``bias="none"``: the base's biases (the vision tower's too) stay frozen; only the two adapter matrices train."""
    from types import SimpleNamespace

    from r3_rl.learner.lora import apply_lora

    policy = SimpleNamespace(model=_Toy(), lora_scope=lambda vision: ["lm"], lora_target_names=lambda w: list(w))
    apply_lora(policy, SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"], train_vision=False))
    trained = sorted(n for n, p in policy.model.named_parameters() if p.requires_grad)
    assert trained == ["lm.0.q_proj.lora_A.default.weight", "lm.0.q_proj.lora_B.default.weight"]


def test_an_adapter_file_missing_an_adapter_or_with_a_foreign_key_is_refused(tmp_path: Path) -> None:
    """The frozen base is not in the file (fine); a missing adapter or a key the model lacks is a damaged file."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from r3_rl.learner.frozen import frozen_fingerprint
    from r3_rl.learner.lora import apply_lora

    policy = SimpleNamespace(model=_Toy(), lora_scope=lambda vision: ["lm"], lora_target_names=lambda w: list(w))
    adapters = apply_lora(policy, SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"],
                                                  train_vision=False))
    adapters.save(tmp_path / "a.safetensors")
    saved = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(saved) == ["lm.0.q_proj.lora_A.default.weight", "lm.0.q_proj.lora_B.default.weight"]
    adapters.load(tmp_path / "a.safetensors")
    meta = {"frozen_fingerprint": frozen_fingerprint(policy.model)}
    save_file({"lm.0.q_proj.lora_A.default.weight": saved["lm.0.q_proj.lora_A.default.weight"]},
              str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(RuntimeError, match=r"missing \['lm\.0\.q_proj\.lora_B\.default\.weight'\]"):
        adapters.load(tmp_path / "b.safetensors")
    save_file({**saved, "foo": torch.ones(1)}, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(RuntimeError, match=r"unexpected \['foo'\]"):
        adapters.load(tmp_path / "c.safetensors")

"""Checkpoints: a bit-exact round trip without pickle, complete-only listing, fallback past damage, refusal of
pickles, and a full disk that keeps the previous checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

from lorakit import LoraConfig, inject
from lorakit.errors import LorakitError
from lorakit.fileio import AtomicWriteError
from lorakit.io import WEIGHTS_NAME
from lorakit.train import checkpoint
from lorakit.train.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    CheckpointError,
    find_resumable,
    list_checkpoints,
    load_trainer_state,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    set_aside,
    validate_checkpoint,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and on a busy machine a second one only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained(steps: int = 3):
    model = tiny_bert()
    inject(model, LoraConfig(rank=4, targets=["query", "value"], seed=0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params[::2], "lr": 1e-2}, {"params": params[1::2], "lr": 2e-2}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        model(ids).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _state(optimizer, scheduler, step: int) -> dict:
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": 1,
            "batch": 4, "rng": [rng_states()], "world_size": 1, "best": {"value": 0.5, "step": step, "stale": 0},
            "history": [{"step": step, "loss": 0.25, "lr": 1e-3}]}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run with complete checkpoints at steps 2 and 4."""
    model, optimizer, scheduler = _trained()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, _state(optimizer, scheduler, step))
    return tmp_path


def _malicious_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling creates `marker`

    return pickle.dumps(Payload())


def test_optimizer_scheduler_and_rng_states_round_trip_bit_exact(tmp_path):
    model, optimizer, scheduler = _trained()
    random.seed(7)
    torch.manual_seed(7)
    state = _state(optimizer, scheduler, 3)
    path = save_checkpoint(tmp_path, 3, model, state)
    expected_draws = (torch.rand(4), random.random())
    loaded = load_trainer_state(path)
    saved_opt, loaded_opt = optimizer.state_dict(), loaded["optimizer"]
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]  # betas stay a tuple, params stay ints
    assert loaded_opt["state"].keys() == saved_opt["state"].keys()
    for index, moments in saved_opt["state"].items():
        for key, tensor in moments.items():
            assert loaded_opt["state"][index][key].dtype == tensor.dtype
            assert torch.equal(loaded_opt["state"][index][key], tensor), (index, key)
    assert loaded["scheduler"] == scheduler.state_dict()
    assert {k: v for k, v in loaded.items() if k not in ("optimizer", "rng")} == \
        {k: v for k, v in state.items() if k not in ("optimizer", "rng")}
    restore_rng_states(loaded["rng"][0])
    assert torch.equal(torch.rand(4), expected_draws[0]) and random.random() == expected_draws[1]


def test_a_restored_optimizer_takes_the_same_next_step(tmp_path):
    model, optimizer, scheduler = _trained()
    path = save_checkpoint(tmp_path, 3, model, _state(optimizer, scheduler, 3))
    params = [p for p in model.parameters() if p.requires_grad]
    copies = [p.detach().clone().requires_grad_() for p in params]
    twin = torch.optim.AdamW([{"params": copies[::2], "lr": 1.0}, {"params": copies[1::2], "lr": 1.0}])
    twin.load_state_dict(load_trainer_state(path)["optimizer"])
    for p, c in zip(params, copies, strict=True):
        p.grad = torch.full_like(p, 0.5)
        c.grad = torch.full_like(c, 0.5)
    optimizer.step()
    twin.step()
    assert all(torch.equal(p, c) for p, c in zip(params, copies, strict=True))


def test_the_state_files_hold_no_pickle_only_json_and_safetensors(run_dir):
    path = run_dir / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in path.iterdir()) == ["adapter", STATE_JSON, STATE_TENSORS]
    doc = json.loads((path / STATE_JSON).read_text())
    assert doc["state"]["step"] == 4
    assert doc["state"]["optimizer"]["state"]["__items__"][0][1]["exp_avg"] == {"__tensor__":
                                                                                  "optimizer/state/0/exp_avg"}


def test_keys_that_look_like_markers_and_non_string_keys_round_trip(tmp_path):
    model, optimizer, scheduler = _trained(1)
    state = _state(optimizer, scheduler, 1) | {"odd": {"__tensor__": "not a tensor", 3: (1, [2.5, None]),
                                                        "t": torch.arange(3)}}
    loaded = load_trainer_state(save_checkpoint(tmp_path, 1, model, state))
    assert loaded["odd"].keys() == state["odd"].keys()
    assert loaded["odd"]["__tensor__"] == "not a tensor" and loaded["odd"][3] == (1, [2.5, None])
    assert torch.equal(loaded["odd"]["t"], torch.arange(3))


def test_a_state_with_an_object_a_checkpoint_cannot_hold_is_a_type_error(tmp_path):
    model, optimizer, scheduler = _trained(1)
    with pytest.raises(TypeError, match=r"trainer state /odd is a set"):
        save_checkpoint(tmp_path, 1, model, _state(optimizer, scheduler, 1) | {"odd": {1, 2}})
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoints"] and not list((tmp_path / "checkpoints").iterdir())


def test_list_checkpoints_ignores_incomplete_legacy_and_temporary_directories(run_dir):
    root = run_dir / "checkpoints"
    (root / "step-00000006").mkdir()  # empty
    (root / "step-00000008").mkdir()
    (root / "step-00000008" / "trainer.pt").write_bytes(b"old")  # the pickle format: never complete
    (root / ".step-00000010.new-abcd").mkdir()  # an interrupted write
    (root / "step-00000004" / STATE_TENSORS).rename(root / "step-00000012")  # a stray file
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / STATE_TENSORS).write_bytes((p / STATE_TENSORS).read_bytes()[:-40]), "does not match"),
    (lambda p: (p / STATE_JSON).write_text((p / STATE_JSON).read_text()[:-30]), "not valid JSON"),
    (lambda p: (p / STATE_JSON).unlink(), "is missing"),
    (lambda p: _flip_last_byte(p / "adapter" / WEIGHTS_NAME), "checksum mismatch"),
    (lambda p: (p / "adapter").rename(p / "elsewhere"), "holds no weights"),
], ids=["truncated-tensors", "truncated-json", "missing-json", "corrupted-adapter", "missing-adapter"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(run_dir, damage, reason):
    newest = run_dir / "checkpoints" / "step-00000004"
    damage(newest)
    path, state, skipped = find_resumable(run_dir)
    assert path.name == "step-00000002" and state["step"] == 2
    assert [p.name for p, _ in skipped] == ["step-00000004"]
    assert reason in skipped[0][1]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_skipped_checkpoint_is_set_aside_with_a_warning_naming_it_and_why(run_dir, caplog):
    newest = run_dir / "checkpoints" / "step-00000004"
    (newest / STATE_JSON).write_text("{")
    path, _, skipped = find_resumable(run_dir)
    with caplog.at_level(logging.WARNING):
        set_aside(skipped, path)
    assert "skipped checkpoint step-00000004:" in caplog.text and "not valid JSON" in caplog.text
    assert "resuming from the previous complete checkpoint step-00000002" in caplog.text
    assert not newest.exists() and (run_dir / "checkpoints" / "step-00000004.unusable").is_dir()
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]


def test_no_valid_checkpoint_is_one_error_line_naming_each_and_why(run_dir):
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step-{step:08d}" / STATE_TENSORS).write_bytes(b"")
    with pytest.raises(LorakitError) as caught:
        find_resumable(run_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("nothing to resume: no checkpoint in")
    assert "step-00000004: " in message and "step-00000002: " in message


def test_a_planted_pickle_as_trainer_pt_is_refused_without_being_unpickled(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(_malicious_pickle(probe))  # the payload works: unpickling it creates a file
    assert probe.exists()
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoints" / "step-00000002"
    (path / "adapter").mkdir(parents=True)
    (path / "trainer.pt").write_bytes(_malicious_pickle(marker))
    with pytest.raises(CheckpointError, match=r"trainer\.pt, the pickle format .* unpickling a file can run any "
                                              r"code; start a new run"):
        validate_checkpoint(path)
    with pytest.raises(LorakitError, match="nothing to resume"):
        find_resumable(tmp_path)
    assert not marker.exists()


def test_a_pickle_in_place_of_the_state_files_is_refused_without_being_unpickled(run_dir):
    marker = run_dir / "pwned"
    for step in (2, 4):
        path = run_dir / "checkpoints" / f"step-{step:08d}"
        for name in (STATE_JSON, STATE_TENSORS):
            (path / name).write_bytes(_malicious_pickle(marker))
    with pytest.raises(LorakitError, match="nothing to resume.*not valid JSON"):
        find_resumable(run_dir)
    assert not marker.exists()


def test_a_state_that_refers_to_a_missing_tensor_is_refused(run_dir):
    path = run_dir / "checkpoints" / "step-00000004"
    doc = json.loads((path / STATE_JSON).read_text())
    doc["state"]["rng"][0]["torch"] = {"__tensor__": "nowhere"}
    (path / STATE_JSON).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="refers to tensor 'nowhere'"):
        load_trainer_state(path)


def test_a_state_of_another_step_is_refused(run_dir):
    root = run_dir / "checkpoints"
    for name in (STATE_JSON, STATE_TENSORS):
        (root / "step-00000004" / name).write_bytes((root / "step-00000002" / name).read_bytes())
    with pytest.raises(CheckpointError, match="state of step 2, not of step-00000004"):
        validate_checkpoint(root / "step-00000004")


def test_a_full_disk_while_saving_keeps_the_previous_checkpoints_byte_identical(run_dir, monkeypatch):
    model, optimizer, scheduler = _trained(1)
    root = run_dir / "checkpoints"
    before = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def full_disk(directory: Path, state: dict) -> None:
        (directory / STATE_TENSORS).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_trainer_state", full_disk)
    with pytest.raises(AtomicWriteError) as caught:
        save_checkpoint(run_dir, 6, model, _state(optimizer, scheduler, 6))
    assert str(caught.value) == (f"no space left on device while writing checkpoint step-00000006 in {root}; the last "
                                 "complete checkpoint step-00000004 is kept")
    after = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]  # no temporary directory


def test_a_full_disk_at_the_first_checkpoint_says_none_exists(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained(1)
    monkeypatch.setattr(checkpoint, "save_weights",
                        lambda m, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(AtomicWriteError, match=r"step-00000001 in .*; no earlier checkpoint exists$"):
        save_checkpoint(tmp_path, 1, model, _state(optimizer, scheduler, 1))
    assert list((tmp_path / "checkpoints").iterdir()) == []

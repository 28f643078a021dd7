"""The checkpoint loader against segment_anything's own model on the same weights."""

from __future__ import annotations

import contextlib
import os
import pickletools
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from ultrasam.checkpoint import CheckpointError, load_model, read_checkpoint_object, save_checkpoint
from ultrasam_layout import mmengine_bookkeeping, runner_checkpoint, save_ultrasam_checkpoint, ultrasam_state_dict


def _decoder_logits(model, embedding, points=None, boxes=None, masks=None, multimask=True):
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)


def _prompts(grid: int):
    generator = torch.Generator().manual_seed(3)
    side = grid * 16
    points = (torch.rand(1, 3, 2, generator=generator) * side, torch.tensor([[1, 0, 1]]))
    boxes = torch.tensor([[0.2 * side, 0.25 * side, 0.7 * side, 0.8 * side]])
    masks = torch.randn(1, 1, grid * 4, grid * 4, generator=generator) * 3
    return {"points": {"points": points}, "box": {"boxes": boxes},
            "mask input + box": {"boxes": boxes, "masks": masks}}


@contextlib.contextmanager
def mmengine_unimportable():
    """While the loader runs, ``import mmengine`` (or any of its modules) fails: it must not need it."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in sys.modules if name.split(".")[0] == "mmengine"] + ["mmengine"]:
            patch.setitem(sys.modules, name, None)
        yield


def _pickled_globals(path: Path) -> set[str]:
    """The globals a torch zip checkpoint's pickle names (what the loader must resolve)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    return {" ".join(str(arg).split()) for opcode, arg, _ in pickletools.genops(data) if opcode.name == "GLOBAL"}


def test_ultrasam_layout_matches_segment_anything(tmp_path, tiny_sam):
    path = tmp_path / "UltraSam.pth"
    save_ultrasam_checkpoint(tiny_sam.state_dict(), path)
    # What mmengine writes and the loader must read without running it (ULTRASAM_FACTS.md).
    assert {"__builtin__ getattr", "mmengine.logging.history_buffer HistoryBuffer", "collections Counter",
            "collections OrderedDict", "_codecs encode"} <= _pickled_globals(path)
    with mmengine_unimportable():
        raw = read_checkpoint_object(path)
        loaded = load_model(path)
    assert list(raw) == ["meta", "state_dict", "message_hub", "param_schedulers"]
    assert len(raw["state_dict"]) == 293
    prefixes = [key.split(".")[0] for key in raw["state_dict"]]
    assert {p: prefixes.count(p) for p in set(prefixes)} == {
        "backbone": 177, "decoder": 68, "bbox_head": 36, "prompt_encoder": 12}
    assert raw["meta"]["cfg"].startswith("default_hooks = dict(")
    buffer = raw["message_hub"]["log_scalars"]["train/loss"]
    assert sorted(buffer.state["statistics_methods"]) == ["current", "max", "mean", "min"]
    assert repr(buffer.state["statistics_methods"]["min"]) == "<opaque mmengine.logging.history_buffer.HistoryBuffer.min>"
    assert raw["param_schedulers"][1]["milestones"] == Counter({20000: 1, 28888: 1})
    assert isinstance(raw["message_hub"]["runtime_info"]["best_score"], np.float64)

    assert loaded.kind == "ultrasam" and loaded.is_ultrasam
    model = loaded.model
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference_embedding = tiny_sam.image_encoder(image)
        embedding = model.image_encoder(image)
        assert torch.allclose(embedding, reference_embedding, atol=1e-5)
        for name, prompt in _prompts(16).items():
            expected, expected_iou = _decoder_logits(tiny_sam, reference_embedding, **prompt)
            logits, iou = _decoder_logits(model, embedding, **prompt)
            assert (logits - expected).abs().max() < 1e-4, name
            assert (iou - expected_iou).abs().max() < 1e-4, name


def test_without_lin2_fix_the_logits_differ(tmp_path, tiny_sam):
    """The x0.5 on the decoder MLP's lin2 is what makes UltraSam equal SAM: check it matters."""
    from ultrasam.checkpoint import build_sam, convert_ultrasam_state_dict, ULTRASAM_MLP_FIX

    converted = convert_ultrasam_state_dict(ultrasam_state_dict(tiny_sam.state_dict()))
    for key in list(converted):
        if ".mlp.lin2." in key and key.startswith("mask_decoder.transformer"):
            converted[key] = converted[key] / ULTRASAM_MLP_FIX
    unfixed = build_sam(converted)
    embedding = torch.randn(1, 256, 16, 16)
    prompt = _prompts(16)["box"]
    with torch.no_grad():
        expected, _ = _decoder_logits(tiny_sam, embedding, **prompt)
        logits, _ = _decoder_logits(unfixed, embedding, **prompt)
    assert (logits - expected).abs().max() > 0.1 * expected.abs().max()


def test_the_file_a_real_mmengine_runner_writes_loads(tmp_path, tiny_sam):
    """Not re-saved: the very file ``Runner.save_checkpoint`` wrote loads, with the runner's
    bookkeeping reported."""
    path = runner_checkpoint(ultrasam_state_dict(tiny_sam.state_dict()), tmp_path / "work_dir")
    with mmengine_unimportable():
        loaded = load_model(path)
    assert loaded.kind == "ultrasam" and loaded.info["iter"] == 3 and loaded.info["has_training_config"]
    assert loaded.info["mmengine_version"].startswith("0.10.")
    for name, tensor in tiny_sam.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_full_size_ultrasam_checkpoint(tmp_path):
    """ViT-B at full size: every one of the 293 tensors lands on SAM's tensor exactly."""
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]().eval()
    path = tmp_path / "UltraSam.pth"
    save_ultrasam_checkpoint(reference.state_dict(), path)
    loaded = load_model(path)
    assert loaded.info["weight_count"] == 93_735_728
    assert loaded.info["iter"] == mmengine_bookkeeping()["meta"]["iter"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    embedding = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        for name, prompt in _prompts(64).items():
            expected, _ = _decoder_logits(reference, embedding, **prompt)
            logits, _ = _decoder_logits(loaded.model, embedding, **prompt)
            assert (logits - expected).abs().max() < 1e-4, name


@pytest.mark.parametrize("wrap", ["plain", "medsam-style"])
def test_sam_format_checkpoints(tmp_path, tiny_sam, wrap):
    state = tiny_sam.state_dict()
    if wrap == "medsam-style":  # fine-tunes often save {"model": ...} with DDP's "module." prefix
        state = {"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    path = tmp_path / "sam.pth"
    torch.save(state, path)
    loaded = load_model(path)
    assert loaded.kind == "sam" and not loaded.is_ultrasam
    for name, tensor in tiny_sam.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_own_format_roundtrip_is_weights_only(tmp_path, tiny_sam):
    path = save_checkpoint(tmp_path / "own.pth", tiny_sam, {"trained_on": "test"})
    torch.load(path, weights_only=True)  # plain tensors and values only
    loaded = load_model(path)
    assert loaded.kind == "ultrasam-slicer" and loaded.info["meta"] == {"trained_on": "test"}
    for name, tensor in tiny_sam.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["own.pth"]  # no temporary file left


class _Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, tiny_sam, payload):
    marker = tmp_path / "payload-ran"
    evil = _Payload(f"touch {marker}") if payload == "os.system" else _ExecPayload(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_sam.state_dict(), "meta": {"hook": evil}}, path)
    with pytest.raises(CheckpointError, match="refused.*could run code"):
        load_model(path)
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path, tiny_sam):
    path = tmp_path / "cut.pth"
    save_checkpoint(path, tiny_sam)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"the checkpoint is truncated or damaged \(\d+ bytes: it starts as "
                       r"torch's zip format but the archive's directory at its end is missing\); download it again"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "image.pth"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.pth")


def test_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match=r"not a SAM, UltraSam or MedSAM checkpoint.*conv1\.weight"):
        load_model(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_sam):
    state = dict(tiny_sam.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing .*iou_token.*1 unexpected .*extra_head"):
        load_model(path)


def test_own_format_keeps_the_inference_rules_it_was_trained_with(tmp_path, tiny_sam):
    trained = load_model(save_checkpoint(tmp_path / "a.pth", tiny_sam, {"postprocess": "ultrasam"}))
    refined = load_model(save_checkpoint(tmp_path / "c.pth", tiny_sam, {"postprocess": "refine"}))
    plain = load_model(save_checkpoint(tmp_path / "b.pth", tiny_sam, {}))
    assert trained.info["postprocess"] == "ultrasam" and trained.is_ultrasam
    assert refined.info["postprocess"] == "refine" and not refined.is_ultrasam
    assert plain.info["postprocess"] == "sam"

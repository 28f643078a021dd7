"""bench/gpu_finetune.py, the prepared fine-tuning call for a lent GPU (issue 16).

- The data it carries gives the trainer what the original data gives: the trainer's own
  preparation of both, compared image by image (masks exactly, pixels up to JPEG's error).
- Its variants are configs the trainer accepts, starting from the shipped model.
- Its jobs are stopped at the budget, their best checkpoints come back in parts under the size
  limit, and the parts join into the checkpoint that was sent; a damaged part is refused.
  (Tiny scratch models stand in for compact-v3 here, since its full fine-tuning takes minutes a
  step on this CPU; the LiteMedSAM paths themselves are tested in test_training_frozen.py.)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the fine-tuning kit runs the trainer")
import torch  # noqa: E402

from training_tiny import TINY_SAM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_finetune  # noqa: E402

FIXTURE = REPO / "Testing" / "fixtures" / "regression" / "BUSBRA"


@pytest.fixture(scope="module")
def split_fixture(tmp_path_factory) -> Path:
    """The bundled BUS-BRA fixture as train. (4 images) and val. (2 images) files beside its images."""
    root = tmp_path_factory.mktemp("source") / "BUSBRA"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(FIXTURE / "images", root / "images")
    content = json.loads((FIXTURE / "annotations" / "BUSBRA__coco.json").read_text())
    for kind, images in (("train", content["images"][:4]), ("val", content["images"][4:])):
        ids = {image["id"] for image in images}
        part = {**content, "images": images, "annotations": [a for a in content["annotations"] if a["image_id"] in ids]}
        (root / "annotations" / f"{kind}.BUSBRA__coco.json").write_text(json.dumps(part))
    return root


@pytest.fixture(scope="module")
def carried(split_fixture, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("carry")
    for kind in ("train", "val"):
        gpu_finetune.shrink(split_fixture / "annotations" / f"{kind}.BUSBRA__coco.json", folder / "data")
    return folder


def _prepared(annotation_file: Path) -> list:
    from ultrasam_data.coco import read_annotation_file, read_sample
    from ultrasam_training.prepare import PrepareOptions, prepare

    options = PrepareOptions(gpu_finetune.IMAGE_SIZE, prompt_kind="box", keep_masks=True)
    records = read_annotation_file(annotation_file, None, [])
    return [(record, prepare(read_sample(record, record.rles), options, torch.Generator())) for record in records]


def test_carried_data_gives_the_trainer_what_the_original_gives(split_fixture, carried):
    for kind in ("train", "val"):
        original = _prepared(split_fixture / "annotations" / f"{kind}.BUSBRA__coco.json")
        shrunk = _prepared(carried / "data" / "BUSBRA" / "annotations" / f"{kind}.BUSBRA__coco.json")
        assert len(shrunk) == len(original) > 0
        for (record, item), (small_record, small_item) in zip(original, shrunk):
            assert max(small_record.height, small_record.width) == gpu_finetune.IMAGE_SIZE
            assert (small_record.dataset, small_record.group) == (record.dataset, record.group)
            assert small_record.path.suffix == ".jpg" and Path(record.path).stem == small_record.path.stem
            assert torch.equal(small_item.masks, item.masks)
            assert torch.equal(small_item.target, item.target)
            difference = (small_item.image.float() - item.image.float()).abs()
            assert difference.mean() < 2.0, "JPEG at the chosen quality should change grey levels by ~1 on average"


def test_every_variant_is_a_config_the_trainer_accepts(carried, tmp_path):
    from ultrasam_training.config import from_dict

    files = {"train": ["t.json"], "val": ["v.json"]}
    for name in gpu_finetune.VARIANTS:
        for dry_run in (False, True):
            config = from_dict(gpu_finetune.variant_config(name, files, tmp_path, dry_run))
            assert config.model.checkpoint == str(gpu_finetune.SHIPPED_MODEL) and Path(config.model.checkpoint).is_file()
            assert config.model.init == "checkpoint" and config.data.train == ["t.json"]
            assert config.output_dir == str(tmp_path / name)
    last_stage = from_dict(gpu_finetune.variant_config("last-stage", files, tmp_path, True))
    assert last_stage.model.frozen_encoder and last_stage.model.train_last_stage
    assert last_stage.prompts.correction_clicks == 1 and last_stage.run.steps == 2  # base and dry run kept
    full = from_dict(gpu_finetune.variant_config("full", files, tmp_path, False))
    assert not full.model.frozen_encoder and full.optim.milestones == []


def test_jobs_stop_at_the_budget_and_their_checkpoints_come_back_whole(carried, tmp_path, monkeypatch, capsys):
    from ultrasam.checkpoint import load_model

    tiny = {"model": {"init": "scratch", "scratch": TINY_SAM}, "data": {"flip": True},
            "optim": {"lr": 1e-3, "warmup_steps": 1, "milestones": []},
            "run": {"steps": 1_000_000, "batch_size": 2, "val_every": 1, "checkpoint_every": 1000, "log_every": 1,
                    "num_workers": 0, "precision": "fp32"}}
    monkeypatch.setattr(gpu_finetune, "BASE", tiny)
    monkeypatch.setattr(gpu_finetune, "VARIANTS", {"a": {}, "b": {"optim": {"lr": 1e-4}}})
    monkeypatch.setattr(gpu_finetune, "export_margin_s", lambda variants: 0.0)
    out = tmp_path / "out"
    part_bytes = 40_000
    assert gpu_finetune.train(carried, out, budget_s=30.0, dry_run=False, part_bytes=part_bytes) == 0

    summary = json.loads((out / "finetune.json").read_text())
    assert set(summary["variants"]) == {"a", "b"}
    for name, entry in summary["variants"].items():
        assert entry["stopped_at_budget"] and entry["steps"] >= 1 and not entry["errors"]
        assert entry["best"]["dice"] == max(v["dice"] for v in entry["val"])
        assert len(entry["parts"]) >= 2 and all((out / p).stat().st_size <= part_bytes for p in entry["parts"])
    assert gpu_finetune.join(out, tmp_path / "joined") == 0
    for name, entry in summary["variants"].items():
        joined = tmp_path / "joined" / f"{name}.pth"
        meta = load_model(joined).info["meta"]  # the checkpoint the best validation kept
        assert (meta["step"], meta["val"]["dice"]) == (entry["best"]["step"], entry["best"]["dice"])
        stored = torch.load(joined, weights_only=True)["model"]
        assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}

    damaged = out / summary["variants"]["a"]["parts"][0]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    shutil.rmtree(tmp_path / "joined")
    assert gpu_finetune.join(out, tmp_path / "joined") == 1
    assert "sha256 differs" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "joined").iterdir()) == ["b.pth"]  # nothing written for "a"

    (out / summary["variants"]["b"]["parts"][-1]).unlink()
    assert gpu_finetune.join(out, tmp_path / "again") == 1
    assert f"{summary['variants']['b']['parts'][-1]} did not come back" in capsys.readouterr().err
    assert not list((tmp_path / "again").iterdir())
    assert gpu_finetune.join(tmp_path, tmp_path / "again") == 2
    assert "no finetune.json" in capsys.readouterr().err


def test_prepare_refuses_missing_splits_before_writing(tmp_path, capsys):
    assert gpu_finetune.prepare(tmp_path / "carry", [tmp_path / "train.X__coco.json"]) == 2
    assert "docs/compact-v2.splits.sh" in capsys.readouterr().err and not (tmp_path / "carry").exists()

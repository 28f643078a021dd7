"""Frozen-encoder fine-tuning: each image embedded once into the on-disk cache, then only the
prompt encoder and mask decoder learn (and with ``train_last_stage`` a TinyViT encoder's last
stage and neck, on the cached tokens entering that stage), on UltraSam's own US-43d sample."""

from __future__ import annotations

import pytest
import torch

from conftest import shared_path
from training_tiny import run_module, tiny_config, tiny_sam_config, write_config
from ultrasam.checkpoint import SamConfig, load_model, sam_from_config, save_checkpoint
from ultrasam_training.config import ConfigError, from_dict
from ultrasam_training.embedding_cache import EmbeddingCache, LastStageEmbedder, image_key, last_stage_modules
from ultrasam_training.runlog import read_records
from ultrasam_training.step import encode


def _tiny_checkpoint(path):
    torch.manual_seed(0)
    return save_checkpoint(path, sam_from_config(tiny_sam_config()))


def _frozen_run(tmp_path, start, cache, name: str, steps: int, *launcher: str) -> list[dict]:
    """A frozen-encoder run from ``start`` on the US-43d sample (8 training images, flipped; 2 to validate)."""
    config = tiny_config(tmp_path / name, steps=steps)
    config["data"] = {"train": config["data"]["train"], "val_fraction": 0.2, "flip": True}
    config["model"] = {"init": "checkpoint", "checkpoint": str(start), "frozen_encoder": True,
                       "embedding_cache": str(cache)}
    run_module(*(launcher or ("ultrasam_training",)), "train", str(write_config(tmp_path / f"{name}.json", config)))
    return read_records(tmp_path / name / "metrics.jsonl")


def test_frozen_encoder_trains_only_the_decoder_from_a_cache_filled_once(tmp_path):
    shared_path("us43d_sample", "sample_coco_MMOTU2D.json")
    start = _tiny_checkpoint(tmp_path / "start.pth")
    cache = tmp_path / "cache"

    def run(name: str, steps: int):
        return _frozen_run(tmp_path, start, cache, name, steps)

    first = run("first", steps=12)
    embedded = [r for r in first if r["kind"] == "embedded"]
    assert [r["encoded"] for r in embedded] == [8 * 2 + 2]  # 8 training images and their mirrors, 2 validation
    assert len(list(cache.glob("*/*.pt"))) == 18
    assert [r["encoded"] for r in run("second", steps=2) if r["kind"] == "embedded"] == [0]  # reused

    before, after = load_model(start).model.state_dict(), load_model(tmp_path / "first" / "model.pth").model.state_dict()
    encoder = [name for name in before if name.startswith("image_encoder.")]
    assert all(torch.equal(before[name], after[name]) for name in encoder)
    assert not torch.equal(before["mask_decoder.iou_token.weight"], after["mask_decoder.iou_token.weight"])
    assert [r["step"] for r in first if r["kind"] == "val"] == [12]


def test_two_processes_split_the_embedding_between_them(tmp_path):
    shared_path("us43d_sample", "sample_coco_MMOTU2D.json")
    start = _tiny_checkpoint(tmp_path / "start.pth")
    records = _frozen_run(tmp_path, start, tmp_path / "cache", "pair", 2,
                          "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ultrasam_training")
    embedded = [r for r in records if r["kind"] == "embedded"]
    # rank 0: 4 training images and their mirrors, then the 2 validation images; rank 1: the other 4 and mirrors
    assert [(r["encoded"], r["per_rank"]) for r in embedded] == [(18, [10, 8])]
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == 18
    assert [r["kind"] for r in records].count("done") == 1


def test_cache_returns_the_encoder_output_and_encodes_each_image_once(tmp_path):
    torch.manual_seed(0)
    model = sam_from_config(tiny_sam_config())
    images = [torch.randint(0, 256, (3, 128, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    cache = EmbeddingCache(tmp_path, model, batch_size=2)
    with torch.no_grad():
        expected = encode(model.eval(), images, None)
    assert torch.allclose(cache(images), expected, atol=2e-3 * float(expected.abs().max()))  # stored as float16
    cache(images[:2] + [images[0].flip(-1)])
    assert cache.encoded == 4  # only the mirror was new
    assert image_key(images[0]) != image_key(images[0].flip(-1))


# A narrow TinyViT SAM in LiteMedSAM's layout (256-pixel input, 64 x 64 grid, four stages).
TINY_TINY_VIT = SamConfig(
    encoder="tiny_vit", image_size=256, patch_size=4, tiny_vit_embed_dims=(8, 16, 16, 32),
    tiny_vit_depths=(1, 1, 1, 1), tiny_vit_num_heads=(0, 1, 1, 2), tiny_vit_window_sizes=(0, 7, 7, 7),
    mask_in_chans=4, decoder_mlp_dim=64, iou_head_hidden_dim=32,
)
LAST_STAGE = ("image_encoder.layers.3.", "image_encoder.neck.")


def _tiny_vit_sam(seed: int = 0):
    torch.manual_seed(seed)
    return sam_from_config(TINY_TINY_VIT).eval()


def _images(count: int) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (3, 256, 192), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            for i in range(count)]


def test_cached_last_stage_input_run_through_the_stage_gives_the_encoder_output(tmp_path):
    model, images = _tiny_vit_sam(), _images(2)
    cache = EmbeddingCache(tmp_path, model, last_stage_input=True)
    with torch.no_grad():
        expected = encode(model, images, None)  # the whole encoder, as inference runs it
        embedded = LastStageEmbedder(model, cache)(images)
    assert cache(images).shape == (2, 64 * 64, 32)
    assert torch.allclose(embedded, expected, atol=2e-3 * float(expected.abs().max()))  # tokens stored as float16


def test_the_last_stage_store_is_keyed_to_the_weights_before_that_stage_only(tmp_path):
    model = _tiny_vit_sam()
    folder = EmbeddingCache(tmp_path, model, last_stage_input=True).folder
    assert folder != EmbeddingCache(tmp_path, model).folder  # never mixed with whole embeddings
    with torch.no_grad():
        model.image_encoder.layers[3].blocks[0].mlp.fc1.weight.add_(1.0)
        model.image_encoder.neck[0].weight.add_(1.0)
    assert EmbeddingCache(tmp_path, model, last_stage_input=True).folder == folder  # what training changes
    with torch.no_grad():
        model.image_encoder.layers[2].blocks[0].mlp.fc1.weight.add_(1.0)
    assert EmbeddingCache(tmp_path, model, last_stage_input=True).folder != folder


def test_training_the_last_stage_changes_it_and_the_decoder_and_nothing_before_it(tmp_path):
    shared_path("us43d_sample", "sample_coco_MMOTU2D.json")
    start = save_checkpoint(tmp_path / "start.pth", _tiny_vit_sam())
    cache = tmp_path / "cache"

    def run(name: str, checkpoint, steps: int):
        config = tiny_config(tmp_path / name, steps=steps)
        config["data"] = {"train": config["data"]["train"], "val_fraction": 0.2, "flip": False}
        config["model"] = {"init": "checkpoint", "checkpoint": str(checkpoint), "frozen_encoder": True,
                           "train_last_stage": True, "embedding_cache": str(cache)}
        run_module("ultrasam_training", "train", str(write_config(tmp_path / f"{name}.json", config)))
        return read_records(tmp_path / name / "metrics.jsonl")

    first = run("first", start, steps=3)
    assert [r["encoded"] for r in first if r["kind"] == "embedded"] == [8 + 2]
    before, after = load_model(start).model.state_dict(), load_model(tmp_path / "first" / "model.pth").model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    encoder = {name for name in before if name.startswith("image_encoder.")}
    last_stage = {name for name in encoder if name.startswith(LAST_STAGE)}
    assert changed & encoder == {name for name in last_stage if not name.split(".")[-1].startswith(("running_", "num_"))}
    assert "mask_decoder.iou_token.weight" in changed
    # A run from the trained model finds the store the first one filled: the stages before the last are unchanged.
    assert [r["encoded"] for r in run("second", tmp_path / "first" / "model.pth", steps=1)
            if r["kind"] == "embedded"] == [0]


def test_training_the_last_stage_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="model.train_last_stage needs model.frozen_encoder"):
        from_dict({"data": {"train": ["a.json"]}, "model": {"checkpoint": "x.pth", "train_last_stage": True}})
    vit = sam_from_config(tiny_sam_config())
    with pytest.raises(ConfigError, match="needs a TinyViT image encoder.*ImageEncoderViT"):
        last_stage_modules(vit)

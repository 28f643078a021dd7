#!/usr/bin/env bash
# The data splits of docs/compact-v2.train.json (seed 0 throughout). Run from the repository root.
# The first three steps are compact-v1's; the HC18 held-out images (val.HC, 81 images, 67 patients)
# are the HC18 test set, so compact-v2 validates on a part of HC18's *training* patients instead.
# Nothing here reads the BUS-BRA test fold (test.BUSBRA) for training or validation.
set -e
ultrasam convert busbra ../shared/data/busbra out/data
ultrasam convert hc18 ../shared/data/hc18 out/data
ultrasam-train split out/data/HC/annotations/HC__coco.json --val-fraction 0.2          # test: val.HC
ultrasam-train split out/data/BUSBRA/annotations/BUSBRA__coco.json --val-fraction 0.1  # val.BUSBRA: 97 images
# HC18 training patients -> 286 training images and 33 validation images
mkdir -p out/v2/hc_split/HC/annotations
ln -sfn "$(realpath out/data/HC/images)" out/v2/hc_split/HC/images
cp out/data/HC/annotations/train.HC__coco.json out/v2/hc_split/HC/annotations/HC__coco.json
ultrasam-train split out/v2/hc_split/HC/annotations/HC__coco.json --val-fraction 0.1

#!/usr/bin/env bash
# The data splits of docs/compact-v2.train.json, after compact-v1's conversion and splits:
#   ultrasam convert busbra ../shared/data/busbra out/data && ultrasam convert hc18 ../shared/data/hc18 out/data
#   ultrasam-train split out/data/HC/annotations/HC__coco.json --val-fraction 0.2      # val. = HC18 test
#   ultrasam-train split out/data/BUSBRA/annotations/BUSBRA__coco.json --val-fraction 0.1
# Nothing here reads the BUS-BRA test fold or the HC18 test images.
set -e
# subset DIR SOURCE_FILE FRACTION: copy SOURCE as DIR/<name>/annotations/<name>__coco.json and split it
subset() {
  dir=$1; src=$2; frac=$3; name=$(basename $(dirname $(dirname $src)))
  mkdir -p $dir/$name/annotations
  ln -sfn $(realpath $(dirname $(dirname $src)))/images $dir/$name/images
  cp $src $dir/$name/annotations/${name}__coco.json
  ultrasam-train split $dir/$name/annotations/${name}__coco.json --val-fraction $frac
}
subset out/v2/bb_train out/data/BUSBRA/annotations/train.BUSBRA__coco.json 0.75
subset out/v2/bb_val out/data/BUSBRA/annotations/val.BUSBRA__coco.json 0.3
subset out/v2/hc_split out/data/HC/annotations/train.HC__coco.json 0.1
subset out/v2/hc_train out/v2/hc_split/HC/annotations/train.HC__coco.json 0.6   # HC18 validation: hc_split's val.
# smaller subsets: what a 2-core CPU shared with six other engineers embeds in half an hour
subset out/v2/bb_train_s out/v2/bb_train/BUSBRA/annotations/train.BUSBRA__coco.json 0.78
subset out/v2/hc_train_s out/v2/hc_train/HC/annotations/train.HC__coco.json 0.79
subset out/v2/bb_val_s out/v2/bb_val/BUSBRA/annotations/val.BUSBRA__coco.json 0.33
subset out/v2/hc_val_s out/v2/hc_split/HC/annotations/val.HC__coco.json 0.3
# first N images of a COCO file (file order, as `ultrasam evaluate --limit`), written beside it as first<N>.<name>
first() {
  python3 - "$1" "$2" <<'PY'
import json, sys, pathlib
src, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
data = json.loads(src.read_text())
data["images"] = data["images"][:n]
ids = {image["id"] for image in data["images"]}
data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
(src.parent / f"first{n}.{src.name}").write_text(json.dumps(data))
PY
}
first out/v2/bb_train_s/BUSBRA/annotations/train.BUSBRA__coco.json 24
first out/v2/hc_train_s/HC/annotations/train.HC__coco.json 12
first out/v2/bb_val_s/BUSBRA/annotations/val.BUSBRA__coco.json 6
first out/v2/hc_val_s/HC/annotations/val.HC__coco.json 6

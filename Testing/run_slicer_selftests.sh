#!/usr/bin/env bash
# Run the extension's self-tests in real Slicer releases, headless under Xvfb: by default Slicer
# 5.8.1 (Python 3.9, the imp effect loader) and the latest stable release (Python 3.12, the
# importlib loader of 5.10+). Each self-test runs twice: with --testing, as ctest runs it, and
# without, as Reload and Test and the Self Tests module run it (testingEnabled() is False there).
#
# For a maintainer's Linux x86-64 machine with network access (curl, tar, python3, xvfb-run).
# CI here cannot download Slicer; pytest covers what runs without it (docs/SLICER.md).
#
# Usage: Testing/run_slicer_selftests.sh [VERSION ...]    e.g. 5.8.1 5.10.0 latest (default: 5.8.1 latest)
#   SLICER_CACHE       where Slicer packages are downloaded and unpacked (default ~/.cache/ultrasam-slicer)
#   SLICER_EXECUTABLE  a Slicer to use instead of downloading (then VERSION arguments are ignored)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SLICER_CACHE:-$HOME/.cache/ultrasam-slicer}
server=https://download.slicer.org
# test module name : folder it is in (what slicer.testing.runUnitTest imports it from)
tests=("UltraSamSlicer:$repo/UltraSamSlicer"
       "UltraSamSlicerEffectTest:$repo/UltraSamSlicer/Testing/Python"
       "UltraSamTraining:$repo/UltraSamTraining")

# Print the path of the Slicer executable of a release ("latest" or X.Y.Z), downloading it once.
slicer_release() {
  local query="os=linux&stability=release" record version url folder
  [ "$1" = latest ] || query="$query&version=$1"
  # download.slicer.org/find answers the matching package's record as JSON (Slicer/slicer_download).
  record=$(curl -fsSL "$server/find?$query")
  version=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["version"])' "$record")
  url=$server$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["download_url"])' "$record")
  folder=$cache/Slicer-$version
  if [ ! -x "$folder/Slicer" ]; then
    mkdir -p "$cache"
    echo "Downloading Slicer $version from $url" >&2
    curl -fL --retry 3 -o "$folder.tar.gz.part" "$url"
    mkdir -p "$folder.part"
    tar -xzf "$folder.tar.gz.part" -C "$folder.part" --strip-components=1
    mv "$folder.part" "$folder" && rm -f "$folder.tar.gz.part"
  fi
  echo "$folder/Slicer"
}

# Run one self-test; $3 is "--testing" or "" (the Reload and Test way). Returns Slicer's status.
run_test() {
  local slicer=$1 name=${2%%:*} folder=${2#*:} mode=$3 code
  # Without --testing Slicer neither stops after the code nor fails on an exception: say so here.
  code="import slicer, slicer.testing
try:
    slicer.testing.runUnitTest(['$folder'], '$name')
    status = 0
except Exception:
    status = 1
slicer.util.exit(status)"
  echo "=== $name ${mode:-(without --testing)} in $slicer"
  timeout 1800 xvfb-run --auto-servernum "$slicer" --no-splash $mode --disable-settings \
    --additional-module-paths "$repo/UltraSamSlicer" "$repo/UltraSamTraining" --python-code "$code"
}

if [ -n "${SLICER_EXECUTABLE:-}" ]; then
  slicers=("$SLICER_EXECUTABLE")
else
  slicers=()
  for version in "${@:-5.8.1 latest}"; do
    for one in $version; do slicers+=("$(slicer_release "$one")"); done
  done
fi

failed=()
for slicer in "${slicers[@]}"; do
  for test in "${tests[@]}"; do
    for mode in --testing ""; do
      run_test "$slicer" "$test" "$mode" || failed+=("${test%%:*} ${mode:-without --testing} ($slicer)")
    done
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "All self-tests passed in: ${slicers[*]}"

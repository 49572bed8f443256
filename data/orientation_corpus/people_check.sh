#!/bin/bash
# A check of score's default on photos of people from sources the corpus never saw: 83 upright photos from three
# Debian packages (historical portraits and a group from Gramps' example tree; faces and street photos from dlib's
# examples; three PASCAL VOC photos from labelme's examples), each scored in its four turns with
# `archive-vision checkset` and `score --truth`. The packages are kept out of the training corpus
# (archive_vision.orientation_corpus.CHECK_PACKAGES) so that this stays a check.
#
#   usage:  bash data/orientation_corpus/people_check.sh     (about 10 MB of downloads, 1 minute on 2 cores)
#   env:    WORK=<scratch dir> (default: under the system temp dir)  ARCHIVE_VISION=<the CLI> (default: the
#           checkout's .venv/bin/archive-vision, else archive-vision on PATH)
#
# Output:  $WORK/upright/<source>/*.jpg, $WORK/check (checkset), $WORK/scored (score: run.json's "truth", report.html)
#          and a line per source with how many of its turns were right.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="${WORK:-$(dirname "$(mktemp -u)")/archive-people-check}"
CLI="${ARCHIVE_VISION:-}"
[ -n "$CLI" ] || { [ -x "$REPO/.venv/bin/archive-vision" ] && CLI="$REPO/.venv/bin/archive-vision" || CLI=archive-vision; }
PY="$(dirname "$(command -v "$CLI")")/python"
[ -x "$PY" ] || PY=python3

rm -rf "$WORK/check" "$WORK/scored" "$WORK/upright"
mkdir -p "$WORK/debs" "$WORK/pkgs"
cd "$WORK/debs"
# the packages archive_vision.orientation_corpus keeps out of the corpus for this check (one list, read from there)
PACKAGES=$(cd "$REPO" && "$PY" -c 'from archive_vision.orientation_corpus import CHECK_PACKAGES as p; print(*sorted(p))')
for package in $PACKAGES; do
  ls "${package}"_*.deb >/dev/null 2>&1 || apt-get download -q "$package" >/dev/null
  [ -d "$WORK/pkgs/$package" ] || dpkg-deb -x "$(ls "${package}"_*.deb | head -1)" "$WORK/pkgs/$package"
done

# The photos, chosen by folder (every JPEG there is a photo): source -> files.
copy() {  # copy SOURCE FILE...: into upright/SOURCE as <parent folder>_<name>
  local source="$1"; shift
  mkdir -p "$WORK/upright/$source"
  for f in "$@"; do cp "$f" "$WORK/upright/$source/$(basename "$(dirname "$f")")_$(basename "$f")"; done
}
D=/usr/share/doc
copy gramps "$WORK"/pkgs/gramps$D/gramps/example/gramps/*.jpg
copy dlib_faces_lfw "$WORK"/pkgs/libdlib19.1$D/libdlib19.1/examples/johns/*/*.jpg
copy dlib_photos "$WORK"/pkgs/libdlib19.1$D/libdlib19.1/examples/*.jpg "$WORK"/pkgs/libdlib19.1$D/libdlib19.1/examples/faces/*.jpg
copy labelme_voc "$WORK"/pkgs/labelme-examples$D/labelme-examples/examples/semantic_segmentation/data_dataset_voc/JPEGImages/*.jpg

copied=$(find "$WORK/upright" -type f | wc -l)
[ "$copied" = 83 ] || { echo "people_check: $copied photos copied, not the 83 the figures are for (another Debian release?)" >&2; exit 1; }

"$CLI" checkset --input "$WORK/upright" --output "$WORK/check"
status=0
"$CLI" score --input "$WORK/check/images" --output "$WORK/scored" --truth "$WORK/check/truth.csv" "$@" \
  > "$WORK/score.log" 2>&1 || status=$?
grep -E '^(score finished|  )' "$WORK/score.log" || true
[ "$status" = 0 ] || { echo "people_check: score failed ($status); its log: $WORK/score.log" >&2; tail -20 "$WORK/score.log" >&2; exit "$status"; }

# Per source (the folder is the truth file's label column); the totals are run.json's truth.orientation.
"$PY" - "$WORK" <<'EOF'
import collections, csv, os, sys
work = sys.argv[1]
truth = {r["uri"]: r for r in csv.DictReader(open(os.path.join(work, "check", "truth.csv")))}
right, total = collections.Counter(), collections.Counter()
for row in csv.DictReader(open(os.path.join(work, "scored", "results.csv"))):
    if row["decision"] == "skipped":  # as score --truth counts: skipped rows have no answer
        continue
    t = truth[row["uri"]]
    total[t["label"]] += 1
    right[t["label"]] += int(row["orientation_degrees"]) == int(t["orientation"])
for source in sorted(total):
    print(f"  {source:16s} {right[source]:4d} of {total[source]:4d} turns right ({100 * right[source] / total[source]:.1f}%)")
EOF

#!/bin/bash
# Checks of score's built-in default on images from Debian packages the corpus never used, each image scored in its
# four turns through `archive-vision checkset` and `score --truth`:
#
#   people  83 upright photos of people: historical portraits and a group from Gramps' example tree; face crops
#           and photos from dlib's examples; three PASCAL VOC photos from labelme's examples (about 10 MB).
#   pages   75 pages of documents: from four PDFs of each of eight packages (TeX Live's Czech/Slovak, German,
#           Italian, Polish and Spanish documentation, its recommended fonts' manuals, gnuplot's and Asymptote's
#           manuals), first / middle / last page at 150 dpi (check_pages.py; about 90 MB of downloads).
#
# The packages are kept out of the training corpus (archive_vision.orientation_corpus.CHECK_PACKAGES) so that these
# stay checks; nothing from them is committed or shipped.
#
#   usage:  bash data/orientation_corpus/unseen_check.sh people|pages [score flags...]   (a minute or two each)
#   env:    WORK=<scratch dir> (default: under the system temp dir)  ARCHIVE_VISION=<the CLI> (default: the
#           checkout's .venv/bin/archive-vision, else archive-vision on PATH)
#
# Output:  $WORK/<check>/upright (the images), check/ (checkset), scored/ (score: run.json's "truth", report.html),
#          and a line per source with how many of its turns were right.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WHICH="${1:-}"; shift || true
case "$WHICH" in people) EXPECTED=83 ;; pages) EXPECTED=75 ;; *) echo "usage: $0 people|pages [score flags]" >&2; exit 2 ;; esac
WORK="${WORK:-$(dirname "$(mktemp -u)")/archive-unseen-check}"
CLI="${ARCHIVE_VISION:-}"
[ -n "$CLI" ] || { [ -x "$REPO/.venv/bin/archive-vision" ] && CLI="$REPO/.venv/bin/archive-vision" || CLI=archive-vision; }
PY="$(dirname "$(command -v "$CLI")")/python"
[ -x "$PY" ] || PY=python3
if [ "$WHICH" = pages ] && ! command -v pdftoppm >/dev/null; then
  echo "unseen_check: pages needs pdftoppm and pdfinfo (apt-get install poppler-utils)" >&2; exit 2
fi

OUT="$WORK/$WHICH"
rm -rf "$OUT"
mkdir -p "$WORK/debs" "$WORK/pkgs" "$OUT/upright"
cd "$WORK/debs"
# this check's packages, as archive_vision.orientation_corpus keeps them out of the corpus (one list, read there)
PACKAGES=$(cd "$REPO" && "$PY" -c "from archive_vision.orientation_corpus import CHECKS; print(*sorted(CHECKS['$WHICH']))")
for package in $PACKAGES; do
  ls "${package}"_*.deb >/dev/null 2>&1 || apt-get download -q "$package" >/dev/null
  [ -d "$WORK/pkgs/$package" ] || dpkg-deb -x "$(ls "${package}"_*.deb | head -1)" "$WORK/pkgs/$package"
done

if [ "$WHICH" = people ]; then
  copy() {  # copy SOURCE FILE...: into upright/SOURCE as <parent folder>_<name>
    local source="$1"; shift
    mkdir -p "$OUT/upright/$source"
    for f in "$@"; do cp "$f" "$OUT/upright/$source/$(basename "$(dirname "$f")")_$(basename "$f")"; done
  }
  D=/usr/share/doc
  copy gramps "$WORK"/pkgs/gramps$D/gramps/example/gramps/*.jpg
  copy dlib_faces_lfw "$WORK"/pkgs/libdlib19.1$D/libdlib19.1/examples/johns/*/*.jpg
  copy dlib_photos "$WORK"/pkgs/libdlib19.1$D/libdlib19.1/examples/*.jpg "$WORK"/pkgs/libdlib19.1$D/libdlib19.1/examples/faces/*.jpg
  copy labelme_voc "$WORK"/pkgs/labelme-examples$D/labelme-examples/examples/semantic_segmentation/data_dataset_voc/JPEGImages/*.jpg
else
  # shellcheck disable=SC2086
  "$PY" "$HERE/check_pages.py" "$WORK/pkgs" "$OUT/upright" $PACKAGES
fi
copied=$(find "$OUT/upright" -type f | wc -l)
[ "$copied" = "$EXPECTED" ] || { echo "unseen_check: $copied images, not the $EXPECTED the figures are for (another Debian release?)" >&2; exit 1; }

"$CLI" checkset --input "$OUT/upright" --output "$OUT/check"
status=0
"$CLI" score --input "$OUT/check/images" --output "$OUT/scored" --truth "$OUT/check/truth.csv" "$@" \
  > "$OUT/score.log" 2>&1 || status=$?
grep -E '^(score finished|  )' "$OUT/score.log" || true
[ "$status" = 0 ] || { echo "unseen_check: score failed ($status); its log: $OUT/score.log" >&2; tail -20 "$OUT/score.log" >&2; exit "$status"; }

# Per source (the folder is the truth file's label column); the totals are run.json's truth.orientation.
"$PY" - "$OUT" <<'PYEOF'
import collections, csv, os, sys
out = sys.argv[1]
truth = {r["uri"]: r for r in csv.DictReader(open(os.path.join(out, "check", "truth.csv")))}
right, total = collections.Counter(), collections.Counter()
for row in csv.DictReader(open(os.path.join(out, "scored", "results.csv"))):
    if row["decision"] == "skipped":  # as score --truth counts: skipped rows have no answer
        continue
    t = truth[row["uri"]]
    total[t["label"]] += 1
    right[t["label"]] += int(row["orientation_degrees"]) == int(t["orientation"])
for source in sorted(total):
    print(f"  {source:30s} {right[source]:4d} of {total[source]:4d} turns right ({100 * right[source] / total[source]:.1f}%)")
PYEOF

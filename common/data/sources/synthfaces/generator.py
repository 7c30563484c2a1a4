"""SynthFaces: the procedural face data set every feature runs on without downloads.

Each identity is a fixed set of face parameters (head shape, skin tone, eyes, brows, nose,
mouth, hair, facial hair, glasses) whose distribution is shifted by gender and age; each image
adds nuisance (pose, scale, illumination, background, expression, noise, blur). Identities are
told apart by stable geometry and colours, while nuisance keeps raw pixels unreliable, so that a
learned embedding clearly beats pixel matching.

Reproducibility: identity ``k`` is drawn from ``SeedSequence([seed, k])`` and its image ``j``
from ``SeedSequence([seed, k, j])``, each on its own stream (``spawn_key``), so identity ``k``
renders to the same bytes whatever ``num_identities`` is, and the same config always gives the
same arrays. (Streams need distinct spawn keys: ``SeedSequence([s, k, 0])`` and
``SeedSequence([s, k])`` would otherwise be the same state, as numpy pads entropy with zeros.)
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from tqdm import tqdm

from common.data.dataset import FaceDataset
from common.data.sources.synthfaces.render import (
    FACIAL_HAIR,
    GLASSES,
    HAIR_STYLES,
    RGB,
    Clutter,
    FaceParams,
    Nuisance,
    apply_photometric,
    mix_rgb,
    render_face,
    scale_rgb,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bump when rendering or sampling changes, so that cached npz files are recognisably stale."""

GROUP_NAMES: tuple[str, ...] = ("light", "medium", "brown", "dark")
"""Skin-tone buckets, light to dark: the ``group`` codes of SynthFaces."""

_STREAM_DEMOGRAPHICS, _STREAM_APPEARANCE, _STREAM_IMAGE, _STREAM_SMILE = 0, 1, 2, 3

CONDITIONS: tuple[str, ...] = ("wild", "studio")
"""How a population is photographed. ``wild``: the full nuisance (pose, lighting gradients and
colour casts, cluttered backgrounds, sensor noise, blur). ``studio``: the same draws pulled to a
studio's setting (near-frontal, even light, plain backdrop, little noise, no blur), so that a
model trained on studio photos has not learnt the invariances wild photos need: the domain gap
between a public pretraining population and the members' data (``pretrain.condition``)."""
_STUDIO_BACKDROP: RGB = (196, 198, 202)

_SKIN_BASE: tuple[RGB, ...] = ((238, 204, 178), (212, 165, 124), (160, 110, 74), (96, 63, 44))
_HAIR_PALETTE: tuple[RGB, ...] = ((22, 18, 16), (58, 38, 26), (105, 70, 42), (150, 108, 66),
                                  (214, 178, 108), (168, 72, 34), (118, 48, 30))
_HAIR_P_BY_GROUP = ((0.10, 0.18, 0.18, 0.16, 0.22, 0.10, 0.06), (0.28, 0.30, 0.20, 0.10, 0.06, 0.03, 0.03),
                    (0.55, 0.30, 0.10, 0.03, 0.01, 0.005, 0.005), (0.75, 0.20, 0.04, 0.01, 0.0, 0.0, 0.0))
_IRIS_PALETTE: tuple[RGB, ...] = ((100, 62, 32), (48, 30, 20), (70, 125, 190), (78, 135, 82),
                                  (135, 112, 58), (122, 134, 146))
_IRIS_P_BY_GROUP = ((0.2, 0.05, 0.35, 0.15, 0.15, 0.1), (0.45, 0.15, 0.12, 0.1, 0.13, 0.05),
                    (0.5, 0.42, 0.02, 0.02, 0.04, 0.0), (0.35, 0.65, 0.0, 0.0, 0.0, 0.0))
_GLASSES_COLOURS: tuple[RGB, ...] = ((20, 20, 20), (90, 55, 30), (200, 165, 60), (170, 30, 40), (40, 60, 150))
# Gender shifts: ~90% of women wear bob or long hair, ~90% of men short hair; ~65% of men have
# facial hair. Each cue alone is ambiguous for some faces; combined with jaw and brows, gender is
# as inferable from a face as it is in real data.
_HAIR_STYLE_P = {0: (0.01, 0.05, 0.04, 0.30, 0.38, 0.22), 1: (0.20, 0.45, 0.25, 0.06, 0.03, 0.01)}
_FACIAL_HAIR_P = {0: (1.0, 0.0, 0.0, 0.0, 0.0), 1: (0.35, 0.18, 0.13, 0.12, 0.22)}
_GREY: RGB = (200, 200, 196)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a SynthFaces data set (same config, same bytes)."""

    num_identities: int = 300
    images_per_identity: int | tuple[int, int] = 10  # fixed, or inclusive (min, max) per identity
    image_size: int = 64
    male_fraction: float = 0.5
    group_proportions: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # skin tone, light..dark
    age_proportions: tuple[float, float, float] = (0.4, 0.4, 0.2)
    smiling_rate: tuple[float, float] = (0.5, 0.5)  # P(smiling | female), P(smiling | male)
    # P(a smiling face shows its smile): below 1 the label is not always in the image, so a model
    # fills the gap with what correlates with it (gender, through smiling_rate): a biased model
    smile_visibility: float = 1.0
    seed: int = 0
    condition: str = "wild"  # how the photos are taken: CONDITIONS

    def validate(self) -> None:
        """Raise ValueError naming the offending field and what was expected."""
        _check_int("num_identities", self.num_identities, 1)
        _check_images_per_identity(self.images_per_identity)
        _check_int("image_size", self.image_size, 32, 128)
        _check_probability("male_fraction", self.male_fraction)
        _check_proportions("group_proportions", self.group_proportions, len(GROUP_NAMES))
        _check_proportions("age_proportions", self.age_proportions, 3)
        if not isinstance(self.smiling_rate, Sequence) or isinstance(self.smiling_rate, str) \
                or len(self.smiling_rate) != 2:
            raise ValueError(f"SynthConfig.smiling_rate: expected (P(smiling|female), P(smiling|male)), "
                             f"got {self.smiling_rate!r}")
        for name, value in zip(("female", "male"), self.smiling_rate):
            _check_probability(f"smiling_rate[{name}]", value)
        _check_probability("smile_visibility", self.smile_visibility)
        _check_int("seed", self.seed, 0)
        if self.condition not in CONDITIONS:
            raise ValueError(f"SynthConfig.condition: expected one of {list(CONDITIONS)}, got {self.condition!r}")

    def image_count_range(self) -> tuple[int, int]:
        """Inclusive (min, max) images per identity."""
        ipi = self.images_per_identity
        return (int(ipi[0]), int(ipi[1])) if isinstance(ipi, Sequence) else (int(ipi), int(ipi))

    def to_meta(self) -> dict[str, object]:
        """JSON-serialisable copy of the config (sequences as lists, numpy scalars as Python)."""
        return {k: _plain(v) for k, v in asdict(self).items()}


def _plain(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        bound = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"SynthConfig.{name}: expected an integer {bound}, got {value!r}")


def _check_probability(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"SynthConfig.{name}: expected a probability in [0, 1], got {value!r}")


def _check_proportions(name: str, value: object, k: int) -> None:
    if (not isinstance(value, Sequence) or len(value) != k
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0 for v in value)
            or not math.isclose(sum(value), 1.0, abs_tol=1e-6)):
        raise ValueError(f"SynthConfig.{name}: expected {k} non-negative numbers summing to 1, got {value!r}")


def _check_images_per_identity(value: object) -> None:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"SynthConfig.images_per_identity: expected an int or (min, max), got {value!r}")
        _check_int("images_per_identity[min]", value[0], 1)
        _check_int("images_per_identity[max]", value[1], int(value[0]))
    else:
        _check_int("images_per_identity", value, 1)


@dataclass(frozen=True)
class SynthIdentity:
    """Demographics, image count and face parameters of one identity."""

    index: int
    gender: int
    group: int
    age: int
    num_images: int
    face: FaceParams


def _stream(cfg: SynthConfig, key: list[int], stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, *key], spawn_key=(stream,)))


def _jitter(rng: np.random.Generator, colour: RGB, spread: float) -> RGB:
    """Colour with per-channel multiplicative variation (kept in 0..255)."""
    factors = 1.0 + rng.uniform(-spread, spread, 3)
    return tuple(int(np.clip(round(c * f), 0, 255)) for c, f in zip(colour, factors))  # type: ignore[return-value]


def sample_identity(cfg: SynthConfig, index: int) -> SynthIdentity:
    """Draw identity ``index``: it depends only on the seed, the index and the proportions."""
    rng = _stream(cfg, [index], _STREAM_DEMOGRAPHICS)
    gender = int(rng.random() < cfg.male_fraction)
    group = min(int(np.searchsorted(np.cumsum(cfg.group_proportions), rng.random(), side="right")),
                len(GROUP_NAMES) - 1)
    age = min(int(np.searchsorted(np.cumsum(cfg.age_proportions), rng.random(), side="right")), 2)
    lo, hi = cfg.image_count_range()
    num_images = int(rng.integers(lo, hi + 1))
    face = _sample_face(_stream(cfg, [index], _STREAM_APPEARANCE), gender, group, age)
    return SynthIdentity(index, gender, group, age, num_images, face)


def _sample_face(rng: np.random.Generator, gender: int, group: int, age: int) -> FaceParams:
    """Face parameters; gender shifts jaw, brows, hair and facial hair, age adds grey and lines."""
    male = gender == 1
    skin = _jitter(rng, scale_rgb(_SKIN_BASE[group], rng.uniform(0.93, 1.07)), 0.04)
    hair = _jitter(rng, _HAIR_PALETTE[rng.choice(len(_HAIR_PALETTE), p=_HAIR_P_BY_GROUP[group])], 0.1)
    grey = (0.0, rng.uniform(0.0, 0.35), rng.uniform(0.5, 0.9))[age]
    hair = mix_rgb(hair, _GREY, grey)
    return FaceParams(
        head_w=rng.uniform(0.22, 0.27) + (0.012 if male else 0.0),
        head_h=rng.uniform(0.28, 0.33),
        jaw=rng.uniform(0.45, 1.0) if male else rng.uniform(0.0, 0.55),
        chin_taper=rng.uniform(0.0, 0.2) if male else rng.uniform(0.15, 0.45),
        skin=skin,
        ear_size=rng.uniform(0.045, 0.065),
        eye_spacing=rng.uniform(0.085, 0.12),
        eye_y=rng.uniform(-0.045, -0.005),
        eye_size=rng.uniform(0.034, 0.05),
        iris=_jitter(rng, _IRIS_PALETTE[rng.choice(len(_IRIS_PALETTE), p=_IRIS_P_BY_GROUP[group])], 0.1),
        brow_thickness=rng.uniform(0.02, 0.034) if male else rng.uniform(0.011, 0.023),
        brow_slope=rng.uniform(-0.4, 0.6),
        brow_gap=rng.uniform(0.015, 0.04),
        brow_colour=scale_rgb(hair, 0.6),
        nose_length=rng.uniform(0.08, 0.13),
        nose_width=rng.uniform(0.022, 0.045),
        mouth_gap=rng.uniform(0.05, 0.075),
        mouth_width=rng.uniform(0.05, 0.075),
        lip_thickness=rng.uniform(0.008, 0.02),
        lip_colour=mix_rgb(skin, _jitter(rng, (185, 75, 80), 0.12), rng.uniform(0.35, 0.7)),
        hair_style=int(rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_P[gender])),
        hair_colour=hair,
        hair_length=rng.uniform(0.0, 0.6) if male else rng.uniform(0.4, 1.0),
        hairline=rng.uniform(0.0, 0.02) + (rng.uniform(0.0, 0.05) if male and age > 0 else 0.0),
        facial_hair=int(rng.choice(len(FACIAL_HAIR), p=_FACIAL_HAIR_P[gender])),
        glasses=int(rng.choice(len(GLASSES), p=(0.78, 0.11, 0.11))),
        glasses_colour=_GLASSES_COLOURS[rng.integers(len(_GLASSES_COLOURS))],
        wrinkles=(0, int(rng.random() < 0.6), 2)[age],
    )


def sample_nuisance(cfg: SynthConfig, ident: SynthIdentity, image: int) -> tuple[Nuisance, np.ndarray]:
    """Per-image nuisance and its standard-normal sensor-noise field, from the image's stream."""
    rng = _stream(cfg, [ident.index, image], _STREAM_IMAGE)
    nz = Nuisance(
        angle=float(np.clip(rng.normal(0.0, 7.0), -15.0, 15.0)),
        scale=rng.uniform(0.88, 1.1),
        shift=(rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.05)),
        yaw=rng.uniform(-1.0, 1.0),
        smiling=bool(rng.random() < cfg.smiling_rate[ident.gender]),
        eyes_closed=bool(rng.random() < 0.1),
        background=_random_rgb(rng),
        clutter=tuple(_sample_clutter(rng) for _ in range(min(int(rng.poisson(2.5)), 6))),
        clothing=_random_rgb(rng),
        gradient_angle=rng.uniform(0.0, 2 * math.pi),
        gradient_strength=rng.uniform(0.0, 0.45),
        brightness=rng.uniform(0.7, 1.2),
        colour_cast=tuple(rng.uniform(0.9, 1.1, 3).tolist()),  # type: ignore[arg-type]
        noise_sigma=rng.uniform(2.0, 9.0),
        blur=rng.uniform(0.3, 1.0) * cfg.image_size / 64 if rng.random() < 0.4 else 0.0,
    )
    noise = rng.standard_normal((cfg.image_size, cfg.image_size, 3), dtype=np.float32)
    if nz.smiling and cfg.smile_visibility < 1.0:  # its own stream: every other draw stays the same
        nz = replace(nz, smile_hidden=bool(
            _stream(cfg, [ident.index, image], _STREAM_SMILE).random() >= cfg.smile_visibility))
    return (_in_studio(nz) if cfg.condition == "studio" else nz), noise


def _in_studio(nz: Nuisance) -> Nuisance:
    """The wild draw ``nz`` moved into the studio: every image stream draws the same numbers in
    both conditions, so identities, expressions and counts are the same and only the setting differs."""
    return replace(
        nz, angle=0.2 * nz.angle, scale=1.0 + 0.3 * (nz.scale - 1.0), shift=(0.3 * nz.shift[0], 0.3 * nz.shift[1]),
        yaw=0.15 * nz.yaw, background=_STUDIO_BACKDROP, clutter=(), gradient_strength=0.1 * nz.gradient_strength,
        brightness=1.0 + 0.2 * (nz.brightness - 0.95), colour_cast=(1.0, 1.0, 1.0), noise_sigma=1.0, blur=0.0)


def _random_rgb(rng: np.random.Generator) -> RGB:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _sample_clutter(rng: np.random.Generator) -> Clutter:
    cx, cy = rng.uniform(-0.55, 0.55, 2)
    hw, hh = rng.uniform(0.03, 0.22, 2)
    return Clutter(int(rng.integers(3)), (cx - hw, cy - hh, cx + hw, cy + hh), _random_rgb(rng))


def render_identity(cfg: SynthConfig, ident: SynthIdentity) -> tuple[np.ndarray, np.ndarray]:
    """All images of one identity as (m, S, S, 3) uint8, and their smiling labels."""
    drawn = [sample_nuisance(cfg, ident, j) for j in range(ident.num_images)]
    nuisances = [nz for nz, _ in drawn]
    raw = np.stack([render_face(ident.face, nz, cfg.image_size) for nz in nuisances])
    noise = np.stack([noise for _, noise in drawn])
    smiling = np.array([nz.smiling for nz in nuisances], dtype=np.int8)
    return apply_photometric(raw, nuisances, noise), smiling


def generate(cfg: SynthConfig, progress: bool = False) -> FaceDataset:
    """Render the whole data set described by ``cfg`` (validated first)."""
    cfg.validate()
    start = time.perf_counter()
    identities = [sample_identity(cfg, k) for k in range(cfg.num_identities)]
    n = sum(ident.num_images for ident in identities)
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    smiling = np.empty(n, dtype=np.int8)
    pos = 0
    for ident in tqdm(identities, desc="SynthFaces", unit="id", disable=not progress):
        m = ident.num_images
        images[pos:pos + m], smiling[pos:pos + m] = render_identity(cfg, ident)
        pos += m
    per_image = np.repeat(np.arange(len(identities)), [ident.num_images for ident in identities])

    def column(attr: str) -> np.ndarray:
        return np.array([getattr(ident, attr) for ident in identities])[per_image]

    sample_ids = [f"synth/{ident.index:05d}/{j:03d}" for ident in identities for j in range(ident.num_images)]
    log.info("SynthFaces: %d images of %d identities (%dpx) in %.2fs", n, len(identities), cfg.image_size,
             time.perf_counter() - start)
    return FaceDataset(
        images=images, identity=column("index"), gender=column("gender"), group=column("group"),
        age=column("age"), labels={"smiling": smiling}, sample_ids=np.array(sample_ids), source="synthfaces",
        group_names=GROUP_NAMES,
        meta={"generator": "synthfaces", "version": GENERATOR_VERSION, "config": cfg.to_meta()},
    )

"""Drawing one synthetic face from identity parameters and per-image nuisance.

The renderer is deliberately dumb: every random choice is made by the caller
(``common.data.sources.synthfaces.generator``) and arrives here as plain numbers, so that rendering is a pure
function of (identity, nuisance, size) and the same parameters always give the same bytes.

Geometry is expressed in *face units*: the origin is the face centre, y points down and one unit
is ``_FACE_SCALE`` image widths (times the per-image scale). All shapes are polygons or polylines
in face units, mapped to pixels through one affine matrix (in-plane rotation, scale,
translation), drawn with Pillow at ``supersample_factor`` times the output size and
box-downsampled, which anti-aliases every edge.
Photometric nuisance (illumination gradient, brightness, colour cast, sensor noise) is applied
afterwards to a whole batch in numpy, see ``apply_photometric``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

# Hair styles: index -> name. Short styles are more likely for men, long ones for women.
HAIR_STYLES: tuple[str, ...] = ("shaved", "crop", "quiff", "bob", "long", "long_bangs")
# Facial hair: index -> name.
FACIAL_HAIR: tuple[str, ...] = ("none", "stubble", "moustache", "goatee", "beard")
# Glasses: index -> name.
GLASSES: tuple[str, ...] = ("none", "round", "square")
_FRAMING_STYLES = ("bob", "long", "long_bangs")  # styles whose hair frames the face down the sides

_HAIRLINE_Y = -0.15  # where the scalp hair ends on the forehead, before per-identity offset
_FACE_SCALE = 1.1    # image widths per face unit at nuisance scale 1: the head fills ~60% of the width
_FACE_CENTRE_Y = 0.53  # slightly below the image centre so that the hair is rarely cropped


@dataclass(frozen=True)
class FaceParams:
    """Stable appearance of one identity (all lengths in face units)."""

    head_w: float          # half width of the skull
    head_h: float          # half height of the skull
    jaw: float             # 0 = round jaw, 1 = square jaw
    chin_taper: float      # how much the lower face narrows towards the chin
    skin: RGB
    ear_size: float
    eye_spacing: float     # half distance between the eye centres
    eye_y: float
    eye_size: float        # half width of an eye
    iris: RGB
    brow_thickness: float
    brow_slope: float      # > 0: outer ends lower
    brow_gap: float        # distance from eye top to brow
    brow_colour: RGB
    nose_length: float
    nose_width: float
    mouth_gap: float       # nose tip to mouth
    mouth_width: float     # half width
    lip_thickness: float
    lip_colour: RGB
    hair_style: int        # index into HAIR_STYLES
    hair_colour: RGB
    hair_length: float     # 0 (short) .. 1 (long); scales side and back hair
    hairline: float        # offset of the hairline (> 0: receding)
    facial_hair: int       # index into FACIAL_HAIR
    glasses: int           # index into GLASSES
    glasses_colour: RGB
    wrinkles: int          # 0 none, 1 forehead lines, 2 forehead + crow's feet + folds


@dataclass(frozen=True)
class Clutter:
    """One background object: kind 0 rectangle, 1 ellipse, 2 thick line; box in face units."""

    kind: int
    box: tuple[float, float, float, float]
    colour: RGB


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation that must not change who the face is."""

    angle: float           # in-plane rotation, degrees
    scale: float
    shift: tuple[float, float]
    yaw: float             # -1..1: inner features slide sideways, far side shrinks
    smiling: bool
    eyes_closed: bool
    background: RGB
    clutter: tuple[Clutter, ...]
    clothing: RGB
    gradient_angle: float  # radians; direction in which illumination increases
    gradient_strength: float
    brightness: float
    colour_cast: tuple[float, float, float]
    noise_sigma: float     # sensor noise, in grey levels
    blur: float            # Gaussian blur radius in output pixels (0: none)
    smile_hidden: bool = False  # smiling, but the photo shows a neutral mouth (SynthConfig.smile_visibility)


def supersample_factor(size: int) -> int:
    """Drawing scale so that the canvas is about 200 px: enough for smooth edges, still fast."""
    return max(2, math.ceil(200 / size))


def scale_rgb(colour: RGB, factor: float) -> RGB:
    """Darken (< 1) or lighten (> 1) a colour, clipped to 0..255."""
    return tuple(int(min(255, max(0, round(c * factor)))) for c in colour)  # type: ignore[return-value]


def mix_rgb(a: RGB, b: RGB, t: float) -> RGB:
    """Linear blend from ``a`` (t = 0) to ``b`` (t = 1)."""
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


class _Pen:
    """Draws face-unit shapes through one affine map onto a Pillow canvas."""

    def __init__(self, image: Image.Image, nuisance: Nuisance) -> None:
        self.draw = ImageDraw.Draw(image)
        size = image.size[0]
        k = nuisance.scale * size * _FACE_SCALE
        a = math.radians(nuisance.angle)
        self.unit = k
        self.matrix = np.array([[k * math.cos(a), -k * math.sin(a)], [k * math.sin(a), k * math.cos(a)]])
        self.offset = np.array([size * (0.5 + nuisance.shift[0]), size * (_FACE_CENTRE_Y + nuisance.shift[1])])

    def _px(self, xy: np.ndarray) -> list[float]:
        """Flat [x0, y0, x1, y1, ...] pixel coordinates, the cheapest form Pillow accepts."""
        return (np.asarray(xy, dtype=np.float64) @ self.matrix.T + self.offset).ravel().tolist()

    def polygon(self, xy: np.ndarray, fill: RGB) -> None:
        self.draw.polygon(self._px(xy), fill=fill)

    def line(self, xy: np.ndarray, colour: RGB, width: float) -> None:
        self.draw.line(self._px(xy), fill=colour, width=max(1, round(width * self.unit)), joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: RGB, n: int = 24) -> None:
        self.polygon(ellipse_points(cx, cy, rx, ry, n), fill)

    def ring(self, cx: float, cy: float, rx: float, ry: float, colour: RGB, width: float) -> None:
        pts = ellipse_points(cx, cy, rx, ry, 24)
        self.line(np.vstack([pts, pts[:1]]), colour, width)


@functools.lru_cache(maxsize=64)
def _unit_arc(n: int, start: float, stop: float) -> tuple[np.ndarray, np.ndarray]:
    """Cached cos/sin tables: a face needs hundreds of arcs of a handful of shapes."""
    t = np.linspace(start, stop, n, endpoint=stop - start < 2 * math.pi - 1e-9)
    return np.cos(t), np.sin(t)


def ellipse_points(cx: float, cy: float, rx: float, ry: float, n: int = 24,
                   start: float = 0.0, stop: float = 2 * math.pi) -> np.ndarray:
    """Points on an ellipse (or an arc of it, angles in radians, y down)."""
    cos, sin = _unit_arc(n, start, stop)
    out = np.empty((n, 2))
    out[:, 0] = cx + rx * cos
    out[:, 1] = cy + ry * sin
    return out


@functools.lru_cache(maxsize=16)
def _unit_parabola(n: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.linspace(0.0, 1.0, n)
    return v, (2.0 * v - 1.0) ** 2


def _parabola(x0: float, x1: float, y_ends: float, y_mid: float, n: int = 9) -> np.ndarray:
    """A symmetric curve through (x0, y_ends), (mid, y_mid), (x1, y_ends)."""
    v, u2 = _unit_parabola(n)
    out = np.empty((n, 2))
    out[:, 0] = x0 + (x1 - x0) * v
    out[:, 1] = y_mid + (y_ends - y_mid) * u2
    return out


def head_outline(p: FaceParams, t: np.ndarray | None = None) -> np.ndarray:
    """Skull outline at angles ``t``: an ellipse on top, a superellipse jaw narrowing to the chin."""
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False) if t is None else t
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    expo = 2.0 / (2.0 + 2.5 * p.jaw)
    x = np.where(lower, np.sign(c) * np.abs(c) ** expo, c) * p.head_w
    y = np.where(lower, np.abs(s) ** expo, s) * p.head_h
    x = np.where(lower, x * (1.0 - p.chin_taper * (y / p.head_h) ** 2), x)
    return np.stack([x, y], axis=1)


def _draw_background(pen: _Pen, nz: Nuisance) -> None:
    for obj in nz.clutter:
        x0, y0, x1, y1 = obj.box
        if obj.kind == 0:
            pen.polygon(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), obj.colour)
        elif obj.kind == 1:
            pen.ellipse((x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2, obj.colour)
        else:
            pen.line(np.array([[x0, y0], [x1, y1]]), obj.colour, 0.03)


def _draw_back_hair(pen: _Pen, p: FaceParams) -> None:
    """Hair behind the head and neck: long styles reach the shoulders, bobs the jaw."""
    style = HAIR_STYLES[p.hair_style]
    if style not in _FRAMING_STYLES:
        return
    w = p.head_w * 1.12
    bottom = p.head_h * (0.55 + 0.35 * p.hair_length) if style == "bob" else p.head_h * (1.0 + 0.6 * p.hair_length)
    top = ellipse_points(0, -0.02, w, p.head_h * 1.1, 15, math.pi, 2 * math.pi)
    flare = 1.0 + (0.25 if style != "bob" else 0.05)
    pts = np.vstack([[[-w * flare, bottom]], top, [[w * flare, bottom]]])
    pen.polygon(pts, p.hair_colour)


def _draw_body(pen: _Pen, p: FaceParams, nz: Nuisance) -> None:
    neck = scale_rgb(p.skin, 0.85)
    nw = p.head_w * 0.5
    pen.polygon(np.array([[-nw, 0.1], [nw, 0.1], [nw * 1.1, 0.45], [-nw * 1.1, 0.45]]), neck)
    pen.ellipse(0, p.head_h + 0.32, p.head_w * 2.1, 0.25, nz.clothing)


def _draw_ears(pen: _Pen, p: FaceParams, nz: Nuisance) -> None:
    colour = scale_rgb(p.skin, 0.92)
    for side in (-1, 1):
        shrink = 1.0 - 0.35 * max(0.0, side * nz.yaw)  # the ear turned away shrinks
        pen.ellipse(side * p.head_w * (1.0 - 0.05 * side * nz.yaw), 0.01, p.ear_size * 0.6 * shrink,
                    p.ear_size, colour)


def _draw_head(pen: _Pen, p: FaceParams) -> None:
    pen.polygon(head_outline(p), p.skin)


def _draw_facial_hair(pen: _Pen, p: FaceParams, dx: float) -> None:
    """Beard and stubble follow the jaw; moustache and goatee frame the mouth."""
    kind = FACIAL_HAIR[p.facial_hair]
    mouth_y = p.eye_y + p.nose_length + p.mouth_gap
    if kind in ("stubble", "beard"):
        top = mouth_y - 0.07
        outline = head_outline(p, np.linspace(-0.5 * math.pi, 1.5 * math.pi, 60))
        jaw = outline[outline[:, 1] > top] * (1.0 if kind == "stubble" else 1.04)
        upper_lip = mouth_y - p.lip_thickness - 0.015
        ring = np.array([[-p.head_w * 0.6, top], [dx - p.mouth_width * 1.3, upper_lip],
                         [dx + p.mouth_width * 1.3, upper_lip], [p.head_w * 0.6, top]])
        colour = mix_rgb(p.skin, p.hair_colour, 0.45) if kind == "stubble" else p.hair_colour
        pen.polygon(np.vstack([jaw, ring]), colour)
    if kind in ("moustache", "goatee", "beard"):
        y = mouth_y - p.lip_thickness - 0.012
        w = p.mouth_width * 1.15
        pen.line(_parabola(dx - w, dx + w, y + 0.015, y), p.hair_colour, 0.022)
    if kind == "goatee":
        pen.ellipse(dx, mouth_y + 0.06, p.mouth_width * 0.55, 0.04, p.hair_colour)


def _draw_wrinkles(pen: _Pen, p: FaceParams, dx: float) -> None:
    if p.wrinkles == 0:
        return
    colour = scale_rgb(p.skin, 0.72)
    brow_y = p.eye_y - p.eye_size * 0.55 - p.brow_gap
    for i in range(3 if p.wrinkles == 2 else 2):
        y = brow_y - 0.035 - 0.022 * i
        pen.line(_parabola(dx - p.head_w * 0.45, dx + p.head_w * 0.45, y + 0.006, y), colour, 0.006)
    if p.wrinkles == 2:
        for side in (-1, 1):
            ex = dx + side * (p.eye_spacing + p.eye_size * 1.25)
            for k in (-1, 1):
                pen.line(np.array([[ex, p.eye_y], [ex + side * 0.025, p.eye_y + k * 0.015]]), colour, 0.005)
            nose_y = p.eye_y + p.nose_length
            pen.line(np.array([[dx + side * p.nose_width * 1.3, nose_y - 0.01],
                               [dx + side * (p.mouth_width + 0.02), nose_y + p.mouth_gap + 0.02]]), colour, 0.006)


def _draw_eyes(pen: _Pen, p: FaceParams, nz: Nuisance, dx: float) -> None:
    line = (40, 30, 30)
    for side in (-1, 1):
        far = max(0.0, side * nz.yaw)  # the eye on the side turned away looks narrower
        cx = dx + side * p.eye_spacing * (1.0 - 0.12 * far)
        rx = p.eye_size * (1.0 - 0.3 * far)
        ry = p.eye_size * 0.55
        if nz.eyes_closed:
            pen.line(_parabola(cx - rx, cx + rx, p.eye_y, p.eye_y + ry * 0.4), line, 0.008)
            continue
        pen.ellipse(cx, p.eye_y, rx, ry, (245, 245, 240))
        ix = cx + 0.4 * rx * nz.yaw * 0.5
        pen.ellipse(ix, p.eye_y, ry * 0.8, ry * 0.8, p.iris, 16)
        pen.ellipse(ix, p.eye_y, ry * 0.35, ry * 0.35, (15, 10, 10), 12)
        pen.line(ellipse_points(cx, p.eye_y, rx, ry, 10, math.pi, 2 * math.pi), line, 0.007)


def _draw_brows(pen: _Pen, p: FaceParams, dx: float) -> None:
    y = p.eye_y - p.eye_size * 0.55 - p.brow_gap
    for side in (-1, 1):
        cx = dx + side * p.eye_spacing
        inner, outer = cx - side * p.eye_size * 1.05, cx + side * p.eye_size * 1.2
        pts = np.array([[inner, y], [cx, y - 0.012], [outer, y + p.brow_slope * p.eye_size]])
        pen.line(pts, p.brow_colour, p.brow_thickness)


def _draw_nose(pen: _Pen, p: FaceParams, dx: float) -> None:
    shade = scale_rgb(p.skin, 0.78)
    top, tip = p.eye_y + 0.02, p.eye_y + p.nose_length
    pen.polygon(np.array([[dx, top], [dx + p.nose_width * 0.6, tip], [dx - p.nose_width * 0.6, tip]]),
                scale_rgb(p.skin, 0.93))
    pen.line(np.array([[dx - p.nose_width, tip - 0.008], [dx - p.nose_width * 0.4, tip + 0.008],
                       [dx + p.nose_width * 0.4, tip + 0.008], [dx + p.nose_width, tip - 0.008]]), shade, 0.009)


def _draw_mouth(pen: _Pen, p: FaceParams, nz: Nuisance, dx: float) -> None:
    """Neutral (or a hidden smile): closed straight lips. Smiling: wide upturned open mouth showing teeth.

    The smile must survive 64 px, dark skin and noise, so it is large and high-contrast: a white
    crescent of teeth and upturned corners with smile lines.
    """
    y = p.eye_y + p.nose_length + p.mouth_gap
    if nz.smiling and not nz.smile_hidden:
        w = p.mouth_width * 1.3
        corner = y - 0.03
        depth = 0.045 + p.lip_thickness
        upper = _parabola(dx - w, dx + w, corner, y - 0.006, 11)
        pen.polygon(np.vstack([upper, _parabola(dx - w, dx + w, corner, y + depth, 11)[::-1]]), p.lip_colour)
        inner = _parabola(dx - w * 0.9, dx + w * 0.9, corner, y + depth - p.lip_thickness, 11)[::-1]
        pen.polygon(np.vstack([upper[1:-1], inner]), (90, 20, 28))
        teeth = _parabola(dx - w * 0.85, dx + w * 0.85, corner + 0.004, y + depth * 0.55, 11)[::-1]
        pen.polygon(np.vstack([upper[1:-1], teeth]), (250, 250, 245))
        fold = scale_rgb(p.skin, 0.7)
        for side in (-1, 1):
            cx = dx + side * (w + 0.008)
            pen.line(np.array([[cx - side * 0.004, corner - 0.02], [cx + side * 0.006, corner],
                               [cx, corner + 0.018]]), fold, 0.007)
        return
    w = p.mouth_width
    t = p.lip_thickness
    pen.polygon(np.vstack([_parabola(dx - w, dx + w, y, y - t, 9),
                           _parabola(dx - w, dx + w, y, y + t * 1.2, 9)[::-1]]), p.lip_colour)
    pen.line(np.array([[dx - w, y], [dx + w, y]]), scale_rgb(p.lip_colour, 0.55), 0.006)


def _draw_front_hair(pen: _Pen, p: FaceParams) -> None:
    """Scalp hair over the top of the head; fringe for bangs, sides for bobs and long hair."""
    style = HAIR_STYLES[p.hair_style]
    hairline = _HAIRLINE_Y + p.hairline
    w, h = p.head_w * 1.06, p.head_h * 1.08
    if style == "shaved":
        cap = ellipse_points(0, 0, p.head_w, p.head_h, 17, math.pi, 2 * math.pi)
        pen.polygon(np.vstack([cap, [[p.head_w * 0.8, hairline], [-p.head_w * 0.8, hairline]]]),
                    mix_rgb(p.skin, p.hair_colour, 0.5))
        return
    volume = 0.05 if style == "quiff" else 0.02
    cap = ellipse_points(0, 0, w, h + volume, 21, math.pi, 2 * math.pi)
    sides = p.head_w * 0.85
    front = _parabola(sides, -sides, hairline + 0.03, hairline, 9)
    if style == "long_bangs":
        front = _parabola(sides, -sides, hairline + 0.07, hairline + 0.075, 9)
    if style == "quiff":
        front = np.array([[sides, hairline + 0.02], [0.0, hairline - 0.01], [-sides * 0.4, hairline + 0.05],
                          [-sides, hairline + 0.03]])
    side_y = 0.0 if style in _FRAMING_STYLES else hairline + 0.07  # short hair stays above the ears
    pen.polygon(np.vstack([cap, [[w, side_y]], front, [[-w, side_y]]]), p.hair_colour)
    if style in _FRAMING_STYLES:
        drop = p.head_h * (0.25 + 0.35 * p.hair_length)
        for side in (-1, 1):
            pen.polygon(np.array([[side * w, -0.05], [side * p.head_w * 0.86, 0.0],
                                  [side * p.head_w * 0.98, drop], [side * w * 1.08, drop]]), p.hair_colour)


def _draw_glasses(pen: _Pen, p: FaceParams, dx: float) -> None:
    if p.glasses == 0:
        return
    r = p.eye_size * 1.35
    for side in (-1, 1):
        cx = dx + side * p.eye_spacing
        if GLASSES[p.glasses] == "round":
            pen.ring(cx, p.eye_y, r, r * 0.85, p.glasses_colour, 0.014)
        else:
            box = np.array([[cx - r, p.eye_y - r * 0.7], [cx + r, p.eye_y - r * 0.7], [cx + r, p.eye_y + r * 0.7],
                            [cx - r, p.eye_y + r * 0.7], [cx - r, p.eye_y - r * 0.7]])
            pen.line(box, p.glasses_colour, 0.014)
        arm = np.array([[cx + side * r, p.eye_y - 0.01], [side * p.head_w, p.eye_y - 0.015]])
        pen.line(arm, p.glasses_colour, 0.008)
    pen.line(np.array([[dx - p.eye_spacing + r, p.eye_y - 0.01], [dx + p.eye_spacing - r, p.eye_y - 0.01]]),
             p.glasses_colour, 0.009)


def render_face(p: FaceParams, nz: Nuisance, size: int) -> np.ndarray:
    """Draw one face (geometry and blur only) as an (size, size, 3) uint8 array."""
    ss = supersample_factor(size)
    image = Image.new("RGB", (size * ss, size * ss), nz.background)
    pen = _Pen(image, nz)
    dx = 0.035 * nz.yaw  # yaw-like shift of the inner features relative to the head outline
    _draw_background(pen, nz)
    _draw_back_hair(pen, p)
    _draw_body(pen, p, nz)
    _draw_ears(pen, p, nz)
    _draw_head(pen, p)
    _draw_facial_hair(pen, p, dx)
    _draw_wrinkles(pen, p, dx)
    _draw_eyes(pen, p, nz, dx)
    _draw_brows(pen, p, dx)
    _draw_nose(pen, p, dx * 1.5)
    _draw_mouth(pen, p, nz, dx)
    _draw_front_hair(pen, p)
    _draw_glasses(pen, p, dx)
    small = image.reduce(ss)
    if nz.blur > 0:
        small = small.filter(ImageFilter.GaussianBlur(nz.blur))
    return np.asarray(small, dtype=np.uint8)


def apply_photometric(images: np.ndarray, nuisances: list[Nuisance], noise: np.ndarray) -> np.ndarray:
    """Illumination gradient, brightness, colour cast and sensor noise for a batch, in numpy.

    ``noise`` holds one standard-normal (H, W, 3) field per image, drawn from that image's own
    random stream so that batching never changes an image's bytes.
    """
    _, h, w, _ = images.shape
    ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, h, dtype=np.float32),
                         np.linspace(-0.5, 0.5, w, dtype=np.float32), indexing="ij")
    ang = np.array([z.gradient_angle for z in nuisances], dtype=np.float32)[:, None, None]
    strength = np.array([z.gradient_strength for z in nuisances], dtype=np.float32)[:, None, None]
    bright = np.array([z.brightness for z in nuisances], dtype=np.float32)[:, None, None]
    light = bright * (1.0 + 2.0 * strength * (np.cos(ang) * xs + np.sin(ang) * ys))
    cast = np.array([z.colour_cast for z in nuisances], dtype=np.float32)[:, None, None, :]
    sigma = np.array([z.noise_sigma for z in nuisances], dtype=np.float32)[:, None, None, None]
    out = images.astype(np.float32) * light[..., None] * cast + noise * sigma
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

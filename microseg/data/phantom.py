"""A micro-ultrasound prostate phantom written in the real dataset's exact layout.

Each patient is a sweep of pseudo-sagittal slices. A slice is imaged the way ultrasound
forms an image, on a polar grid of scan lines fanned from a virtual apex above the probe.

Image model:

1. anatomy, as an echogenicity map E (mean backscatter power) and an attenuation map alpha
   (Np/mm): periprostatic tissue with a smooth log-normal texture and fine streaks (fibro-fatty
   planes, about 0.2 x 1 mm), the layered rectal wall under the probe, the gland, a dark fluid
   bladder on its base side with an echogenic wall, the urethra and bright calcifications.
   The gland differs from its surroundings in three ways: it is hypo-echoic (power
   ``1 - c(phi)``, c about 0.7, varying around the contour), its texture is granular instead of
   streaked (dark sub-millimetre acini covering about a tenth of it), and its capsule is a
   brighter rim (+60..300 % power over about 0.25 mm) along most of the contour;
2. scatterers ``n ~ N(0, 1)`` with amplitude ``sqrt(E)``, attenuated two-way along each scan
   line ``exp(-2 * cumsum(alpha) dr)`` and amplified by a time-gain compensation that corrects
   90 % of the tissue attenuation (calcifications thus cast acoustic shadows away from the
   probe, fluid an enhancement); electronic noise 40 dB under tissue, drawn with the scatterers
   (one N(0, 1) field per slice: its power joins E, so it is correlated across lines like them;
   it lies below the display's floor except in the fluid);
3. RF lines = scatterers convolved with the PSF: across lines a Gaussian beam, along depth a
   pulse ``cos(2 pi k / 4) exp(-k^2 / (2 sigma_a^2))`` (carrier at a quarter of the radial
   sampling rate); the pulse and the analytic-signal filter are applied together in the
   Fourier domain along depth, so envelope = |analytic RF| (fully developed speckle);
4. log compression ``254 * clip(1 + 20 log10(env / ref) / DR, 0, 1)``, DR = 60 dB, tissue at 55 % grey;
5. scan conversion to the Cartesian image (bilinear), black outside the fan.

The expert contour is the true gland boundary R(phi, s). Where the border is hard to see the
image carries little evidence for it: with boundary weakness w(phi, s) in [0, 1] the gland's
edge is blurred over ``0.1 + 1.5 w`` mm, its contrast, acini and capsule fade by ``1 - w``,
and up to 3 mm of gland-like tissue (bladder neck, urethral sphincter) lies outside it, so
there only the gland's shape and its visible borders constrain the contour. w combines
``1 - (1 - w_bladder)(1 - w_apex)(1 - w_ends)``: the sector facing the bladder (strongest
mid-sweep, the midline), the apex sector where the urethra leaves the gland (midline slices;
the urethra itself is a hypo-echoic channel with a bright wall through the gland within 3 mm
of the midline), and the whole contour of the small gland near both ends of the sweep (half
strength in the image, full strength for the raters).
Calcification shadows hide the contour behind them (physically: the signal there is weak).

Raters: every other rater's contour is ``R(phi, s) + error * 5.5 mm * scale(s)^1.5 * (W n + 0.08 m)``
(clipped at 0; scale(s) is the gland's in-plane size factor, 1 mid-sweep), with
W = ``1 - (1 - w)(1 - w_shadow)`` the hidden part of the contour, n a smooth in/out field (a
systematic over- or under-reach of +-1, the same sign for every rater of a patient, plus smooth
variation half of which they share: everyone finds the same places ambiguous) and m a smooth
field for small errors elsewhere. ``RATER_ERRORS`` orders them by experience (their scores
against the expert on the demo's test patients: docs/benchmarks.md). The errors are in mm,
so native-size phantoms score the same (three patients at 962 x 1372 and at 240 x 343: HD95
within 0.05 mm, DSC within 0.001).

Sizes: the pixel spacing is the real 0.033586 mm at 962 x 1372 and scales by 962 / H at other
sizes; anatomy is in mm, so a smaller phantom is the same anatomy at a coarser pixel. The PSF is
sized in pixels (speckle grain about two pixels, as at native size), i.e. a reduced phantom
images like a proportionally lower-frequency probe rather than averaging the speckle away.
The sweep spans ``SWEEP_MM`` = 48 mm at gland depth, so the slice spacing written to the header is
``48 / (S - 1)`` mm (0.19 mm for 250 slices, close to the real sweeps); slice ``z`` sits at sweep
position ``s = 2 z / (S - 1) - 1``; the gland spans ``|s| < 0.72..0.86``, so the first and last
slices are always empty.

The set is written into a temporary folder beside the output and renamed into place when it is
complete, so a killed run leaves no partial dataset. An existing output folder is replaced whole
only if it is empty or was written by this simulator (it holds ``.microseg_phantom.json``, with
the settings); anything else is refused.
A progress bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from scipy import fft
from scipy.ndimage import gaussian_filter

from microseg.core.atomic import atomic_folder, write_text
from microseg.core.errors import OptionError
from microseg.core.parallel import resolve_jobs, run_jobs
from microseg.core.preprocess import INTENSITY_MAX
from microseg.data.layout import EXPERT, IMAGES, NON_EXPERT, RATERS, file_name, rater_kind
from microseg.data.volumes import write_volume

NATIVE_SIZE = (962, 1372)
NATIVE_SPACING_MM = 0.033586
SWEEP_MM = 48.0
FACE_RADIUS_MM = 12.0  # probe face / fan apex distance
FACE_DEPTH_MM = 0.8  # depth at which the probe face arc crosses the centre line
APEX_Y_MM = FACE_DEPTH_MM - FACE_RADIUS_MM  # the fan's virtual apex, above the top edge
FAN_HALF_ANGLE = math.radians(40.0)
BLADDER_ANGLE_DEG = 160.0
DYNAMIC_RANGE_DB = 60.0
TISSUE_ALPHA = 0.04  # Np/mm, amplitude attenuation of soft tissue (TGC corrects 90 % of it)
RATER_ERRORS = {"clinician": 0.7, "master_student": 0.84, "non_expert": 0.9, "medical_student": 0.98}
RATER_REACH_MM = 5.5  # contour error where the border is hidden, at error 1 and full gland size
URETHRA_MM = 3.0  # the urethra is seen within this distance of the midline (sweep position 0)
TEXTURE_GRID_MM = 1.5
FINE_GRID_MM = 0.3
MARKER = ".microseg_phantom.json"
N_ANGLES = 4096
PHI = (np.arange(N_ANGLES, dtype=np.float32) + 0.5) * (2 * np.pi / N_ANGLES) - np.pi


def pixel_spacing(height: int) -> float:
    """In-plane spacing (mm) of a phantom ``height`` rows tall: 0.033586 * 962 / height."""
    return NATIVE_SPACING_MM * NATIVE_SIZE[0] / height


def slice_spacing(n_slices: int) -> float:
    """Sweep spacing (mm) written to the header: ``SWEEP_MM / (n_slices - 1)``."""
    return SWEEP_MM / (n_slices - 1)


def _angle_index(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Index into the ``PHI`` table of the angle atan2(dy, dx)."""
    idx = ((np.arctan2(dy, dx) + np.pi) * (N_ANGLES / (2 * np.pi))).astype(np.int32)
    return np.minimum(idx, N_ANGLES - 1)


def _bump(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - centre) / width) ** 2)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """0 for t <= 0, 1 for t >= 1, 3t^2 - 2t^3 between (compact, unlike a logistic)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _sector(centre: float, width: float) -> np.ndarray:
    """Gaussian window over PHI around the direction ``centre`` (radians), sd ``width``."""
    delta = np.angle(np.exp(1j * (PHI - centre))).astype(np.float32)
    return np.exp(-0.5 * (delta / width) ** 2).astype(np.float32)


def _smooth_field(rng: np.random.Generator, orders: range) -> np.ndarray:
    """A random smooth function of the angle (table over PHI) with unit standard deviation."""
    k = np.asarray(orders, dtype=np.float32)[:, None]
    a, b = rng.normal(0.0, 1.0, (2, len(k), 1)) / np.maximum(k, 1.0)
    field = (a * np.cos(k * PHI) + b * np.sin(k * PHI)).sum(0)
    return ((field - field.mean()) / field.std()).astype(np.float32)


class ScanGeometry:
    """The fan: polar sample positions (mm) and the scan-conversion maps for one image size."""

    def __init__(self, height: int, width: int):
        self.shape = (height, width)
        self.spacing = sp = pixel_spacing(height)
        self.width_mm = width * sp
        r0, r1 = FACE_RADIUS_MM, height * sp - APEX_Y_MM
        n_r = 2 * height
        n_t = math.ceil(2 * FAN_HALF_ANGLE * r1 / sp)
        dr, dt = (r1 - r0) / n_r, 2 * FAN_HALF_ANGLE / n_t
        self.rf_shape = (n_t, n_r)  # [scan lines, depth samples] of the RF
        # The anatomy maps (echogenicity, attenuation, gain) are smooth at the RF sampling: they are
        # computed on every second line and depth sample and interpolated to the RF grid.
        self.dr, self.dt = 2 * dr, 2 * dt
        self.depth = ((np.arange(0, n_r, 2) + 0.5) * dr).astype(np.float32)  # from the probe face
        r = r0 + self.depth
        theta = (-FAN_HALF_ANGLE + (np.arange(0, n_t, 2) + 0.5) * dt).astype(np.float32)[:, None]
        self.x = (r * np.sin(theta)).astype(np.float32)  # [lines, depth] mm from the centre line
        self.y = (r * np.cos(theta) + APEX_Y_MM).astype(np.float32)  # mm below the top edge
        xc = ((np.arange(width) + 0.5) * sp - self.width_mm / 2).astype(np.float32)[None, :]
        yc = ((np.arange(height) + 0.5) * sp).astype(np.float32)[:, None]
        rc, tc = np.hypot(xc, yc - APEX_Y_MM), np.arctan2(xc, yc - APEX_Y_MM)
        self.map_r = ((rc - r0) / dr - 0.5).astype(np.float32) / 2  # the envelope keeps every 2nd sample
        self.map_t = ((tc + FAN_HALF_ANGLE) / dt - 0.5).astype(np.float32)
        self.fov = (rc >= r0) & (rc <= r1) & (np.abs(tc) <= FAN_HALF_ANGLE)
        self.outside = ~self.fov
        self.xc, self.yc = np.broadcast_to(xc, self.shape), np.broadcast_to(yc, self.shape)
        # PSF in samples: axial sigma 2 samples (1 pixel), carrier period 4 samples; beam sigma 1.5 px.
        k = np.arange(-8, 9, dtype=np.float32)
        pulse = np.cos(2 * np.pi * k / 4) * np.exp(-0.5 * (k / 2.0) ** 2)
        self.n_fft = 2 * fft.next_fast_len((n_r + len(k) + 1) // 2)  # even, and n_fft / 2 is a fast length
        spectrum = fft.rfft(np.roll(np.pad(pulse, (0, self.n_fft - len(k))), -8))[: self.n_fft // 2]
        analytic = np.full(self.n_fft // 2, 2.0, dtype=np.float32)  # 2 for 0 < f < 1/2, 1 at DC, 0 for f < 0
        analytic[0] = 1.0
        self.analytic_pulse = (spectrum * analytic).astype(np.complex64)
        self.pulse_energy = float((pulse**2).sum())
        self.beam_sigma = 1.5 * sp / (0.5 * (r0 + r1) * dt)
        beam = np.exp(-0.5 * (np.arange(-20, 21) / self.beam_sigma) ** 2)
        self.rf_rms = math.sqrt(float((pulse**2).sum() * ((beam / beam.sum()) ** 2).sum()))  # tissue, E = 1
        radius = int(4.0 * self.beam_sigma + 0.5)  # scipy's gaussian_filter1d kernel (truncate 4), in float32
        beam = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.beam_sigma) ** 2)
        self.beam = (beam / beam.sum()).astype(np.float32)[:, None]
        # electronic noise: RF amplitude 1 % of tissue's after the PSF, as a scatterer power before it
        self.noise_power = 0.01**2 * self.rf_rms**2 / (self.pulse_energy * float((self.beam**2).sum()))
        self.reference = math.sqrt(2.0) * self.rf_rms * 10 ** (0.45 * DYNAMIC_RANGE_DB / 20)  # tissue at 55 % grey
        d = self.depth
        wall = 1.8 * _bump(d, 0.3, 0.25) - 0.6 * _bump(d, 1.2, 0.5) + 0.8 * _bump(d, 2.1, 0.3)
        self.rectal_wall = (1 + wall).astype(np.float32)  # mucosa, muscularis, serosa under the probe
        # remap coordinates of the polar samples in the texture grids (one cell of padding)
        self.texture_maps = {
            grid: ((self.x + self.width_mm / 2) / grid + 1, self.y / grid + 1)
            for grid in (TEXTURE_GRID_MM, FINE_GRID_MM)
        }

    def box(self, x: float, y: float, half_mm: float) -> tuple[slice, slice]:
        """The (rows, columns) of image pixels whose centres lie within ``half_mm`` of (x, y) in each axis."""
        rows = np.searchsorted(self.yc[:, 0], (y - half_mm, y + half_mm), side="right")
        cols = np.searchsorted(self.xc[0], (x - half_mm, x + half_mm), side="right")
        return slice(max(0, int(rows[0]) - 1), int(rows[1]) + 1), slice(max(0, int(cols[0]) - 1), int(cols[1]) + 1)

    def window(self, x: float, y: float, half_mm: float) -> tuple[slice, slice]:
        """The (lines, depth) block of anatomy-grid samples within about ``half_mm`` of the point (x, y)."""
        r, t = math.hypot(x, y - APEX_Y_MM), math.atan2(x, y - APEX_Y_MM)
        i, j = (t + FAN_HALF_ANGLE) / self.dt, (r - FACE_RADIUS_MM) / self.dr
        di = (math.asin(half_mm / r) if half_mm < r else math.pi) / self.dt + 2
        dj = half_mm / self.dr + 2
        n_t, n_r = self.x.shape
        return (
            slice(int(np.clip(i - di, 0, n_t)), int(np.clip(i + di + 1, 0, n_t))),
            slice(int(np.clip(j - dj, 0, n_r)), int(np.clip(j + dj + 1, 0, n_r))),
        )


class Anatomy:
    """One patient's random anatomy; all lengths in mm, ``s`` is the sweep position in [-1, 1]."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.a, self.b = u(13.0, 16.0), u(8.5, 10.5)  # semi-axes along the image width / depth
        self.cx, self.cy = u(1.0, 4.0), 3.5 + self.b + u(0.5, 2.0)
        self.extent = u(0.72, 0.86)  # gland half-extent along the sweep
        self.shape0 = 0.07 * _smooth_field(rng, range(2, 6))
        self.shape1 = 0.04 * _smooth_field(rng, range(2, 5))
        self.contrast = np.clip(0.7 + 0.15 * _smooth_field(rng, range(1, 5)), 0.4, 0.88)
        self.capsule = 1.5 * np.clip(1.0 + 0.5 * _smooth_field(rng, range(1, 7)), 0.4, 2.0)
        self.bladder_angle = math.radians(BLADDER_ANGLE_DEG + u(-10.0, 10.0))
        self.bladder_sector = _sector(self.bladder_angle, u(0.4, 0.55))
        self.apex_sector = _sector(self.bladder_angle + math.pi, u(0.3, 0.4))
        self.urethra_offset = u(-1.5, 1.5)  # mm across the bladder-apex axis from the gland centre
        self.bladder_axes = (u(9.0, 13.0), u(6.0, 9.0))  # across / along the bladder direction
        self.bladder_extent = u(0.45, 0.65)
        gap = u(1.5, 3.0)
        r_mid = self.radius(0.0)[_angle_index(np.cos(self.bladder_angle), np.sin(self.bladder_angle))]
        dist = r_mid + gap + self.bladder_axes[1]
        self.bladder_centre = (
            self.cx + dist * math.cos(self.bladder_angle),
            self.cy + dist * math.sin(self.bladder_angle),
        )
        n_calc = int(rng.integers(1, 5))  # (s, radial fraction, angle, radius mm, sweep half-extent mm)
        self.calcs = np.stack(
            [
                u(-0.5, 0.5, n_calc) * self.extent,
                u(0.1, 0.6, n_calc),
                u(-np.pi, np.pi, n_calc),
                u(0.2, 0.6, n_calc),
                u(1.5, 3.0, n_calc),
            ],
            axis=1,
        )

    def centre(self, s: float) -> tuple[float, float]:
        return self.cx + 1.0 * s, self.cy + 1.5 * s * s

    def scale(self, s: float) -> float:
        """In-plane size factor of the gland at sweep position s (ellipsoid), 0 outside it."""
        return math.sqrt(max(0.0, 1.0 - (s / self.extent) ** 2))

    def radius(self, s: float) -> np.ndarray:
        """Contour radius R(phi) over PHI at sweep position s (all zeros where the gland is absent)."""
        ellipse = self.a * self.b / np.sqrt((self.b * np.cos(PHI)) ** 2 + (self.a * np.sin(PHI)) ** 2)
        return (self.scale(s) * ellipse * (1 + self.shape0 + s * self.shape1)).astype(np.float32)

    def midline(self, s: float) -> float:
        return math.exp(-0.5 * (s / (0.4 * self.extent)) ** 2)

    def weakness(self, s: float, ends_weight: float = 0.5) -> np.ndarray:
        """Boundary weakness w in [0, 1] over PHI: bladder sector, apex (urethra) sector, sweep ends.

        In the image the small gland near the sweep ends stays faintly visible (``ends_weight``
        0.5: a 2D model has no other cue there); raters count it fully hidden (1.0)."""
        mid = self.midline(s)
        ends = ends_weight * min(1.0, max(0.0, (0.7 - self.scale(s)) / 0.4))
        return 1 - (1 - (0.4 + 0.6 * mid) * self.bladder_sector) * (1 - 0.8 * mid * self.apex_sector) * (1 - ends)

    def urethra_width(self, s: float) -> float:
        """Half-width (mm) of the urethra in slice s: 1.2 mm at the midline, 0 beyond URETHRA_MM."""
        ds = abs(s) * SWEEP_MM / 2
        return 1.2 * math.sqrt(max(0.0, 1 - (ds / URETHRA_MM) ** 2)) if self.scale(s) > 0 else 0.0

    def calcifications(self, s: float) -> list[tuple[float, float, float]]:
        """(x, y, radius) in mm of the calcifications cut by slice s."""
        radius, (cx, cy), found = self.radius(s), self.centre(s), []
        for cs, frac, angle, rad, half in self.calcs:
            ds = abs(s - cs) * SWEEP_MM / 2
            if ds < half:
                r_here = frac * radius[_angle_index(np.cos(angle), np.sin(angle))]
                found.append(
                    (
                        cx + r_here * math.cos(angle),
                        cy + r_here * math.sin(angle),
                        rad * math.sqrt(1 - (ds / half) ** 2),
                    )
                )
        return found

    def shadow(self, s: float) -> np.ndarray:
        """Over PHI, how far the contour lies in a calcification's acoustic shadow (0..1)."""
        radius, (cx, cy) = self.radius(s), self.centre(s)
        px, py = cx + radius * np.cos(PHI), cy + radius * np.sin(PHI) - APEX_Y_MM
        theta, rho = np.arctan2(px, py), np.hypot(px, py)
        out = np.zeros(N_ANGLES, dtype=np.float32)
        for x, y, rad in self.calcifications(s):
            r_c = math.hypot(x, y - APEX_Y_MM)
            hidden = _bump(theta * r_c, math.atan2(x, y - APEX_Y_MM) * r_c, rad + 1.5) * (rho > r_c + rad)
            out = np.maximum(out, hidden)
        return out


class Rater:
    """A rater's contour (module docstring): ``R_e + error * 3 mm * scale * (W n + 0.08 m)``."""

    def __init__(self, rng: np.random.Generator, error: float, shared: tuple[float, list[np.ndarray]]):
        self.error = error
        bias, common = shared
        own = [_smooth_field(rng, range(1, 4)) for _ in range(2)]
        self.n = [bias + 0.35 * (common[0] + own[0]), 0.35 * (common[1] + own[1])]
        self.m = [_smooth_field(rng, range(1, 6)) for _ in range(2)]

    def radius(self, anatomy: Anatomy, s: float) -> np.ndarray:
        n, m = self.n[0] + s * self.n[1], self.m[0] + s * self.m[1]
        hidden = 1 - (1 - anatomy.weakness(s, ends_weight=1.0)) * (1 - anatomy.shadow(s))
        offset = self.error * RATER_REACH_MM * anatomy.scale(s) ** 1.5 * (hidden * n + 0.08 * m)
        return np.maximum(anatomy.radius(s) + offset, 0.0)


def _gland(geo: ScanGeometry, anat: Anatomy, s: float, tex: dict[str, np.ndarray], echo: np.ndarray) -> None:
    """Paint the gland, its capsule, the gland-like tissue at its weak border and the urethra into ``echo``."""
    radius = anat.radius(s)
    cx, cy = anat.centre(s)
    g = geo.window(cx, cy, float(radius.max()) + 6.0)
    dx, dy = geo.x[g] - cx, geo.y[g] - cy
    rho, idx = np.hypot(dx, dy), _angle_index(dx, dy)
    contour, weak = radius[idx], anat.weakness(s)[idx]
    inside = _smoothstep(0.5 + (contour - rho) / (3 * (0.1 + 1.5 * weak)))
    like = np.maximum(inside, weak * _smoothstep(1 - (rho - contour) / 3.0))
    acini = 1 - 0.6 * (1 - weak) * _smoothstep((tex["acini"][g] - 1.1) / 0.5)
    gland = (1 - anat.contrast[idx] * (1 - weak)) * tex["gland"][g] * acini
    capsule = 1 + anat.capsule[idx] * (1 - weak) * _bump(rho, contour, 0.25)
    block = echo[g]
    block *= (1 - like) + like * gland / tex["streaks"][g] / tex["tissue"][g]
    block *= capsule
    half = anat.urethra_width(s)
    if half > 0:
        across = np.abs(dy * math.cos(anat.bladder_angle) - dx * math.sin(anat.bladder_angle) - anat.urethra_offset)
        block *= 1 - inside * (0.6 * _smoothstep(0.5 + (half - across) / 0.3) - 0.8 * _bump(across, half, 0.2))


def _bladder(geo: ScanGeometry, anat: Anatomy, s: float, echo: np.ndarray, alpha: np.ndarray) -> None:
    """Paint the fluid bladder (anechoic, little attenuation) with its echogenic wall."""
    size = math.sqrt(max(0.0, 1 - (s / anat.bladder_extent) ** 2))
    if size == 0:
        return
    across, along = (anat.bladder_axes[0] * size, anat.bladder_axes[1] * size)
    b = geo.window(*anat.bladder_centre, max(across, along) + 2.0)
    ca, sa = math.cos(anat.bladder_angle), math.sin(anat.bladder_angle)
    bx, by = geo.x[b] - anat.bladder_centre[0], geo.y[b] - anat.bladder_centre[1]
    norm = np.hypot((bx * ca + by * sa) / along, (by * ca - bx * sa) / across)
    fluid = np.clip((1 - norm) * along / 0.25, 0, 1)
    echo[b] = (echo[b] * (1 - fluid) + 0.001 * fluid) * (1 + 0.8 * _bump(norm * along, along, 0.3))
    alpha[b] -= 0.9 * TISSUE_ALPHA * fluid


def _echogenicity(
    geo: ScanGeometry, anat: Anatomy, s: float, tex: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Echogenicity E and attenuation alpha (Np/mm) of one slice on the polar anatomy grid."""
    echo = tex["tissue"] * tex["streaks"] * geo.rectal_wall
    alpha = np.full(echo.shape, TISSUE_ALPHA, dtype=np.float32)
    if anat.scale(s) > 0:
        _gland(geo, anat, s, tex, echo)
        for x, y, rad in anat.calcifications(s):
            w = geo.window(x, y, rad)
            blob = np.hypot(geo.x[w] - x, geo.y[w] - y) < rad
            echo[w][blob], alpha[w][blob] = 40.0, 0.8
    _bladder(geo, anat, s, echo, alpha)
    return echo, alpha


_ONE = np.ones((1, 1), np.float32)


def _polar_image(geo: ScanGeometry, echo: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Image one slice: scatterers, attenuation and TGC, PSF, envelope, log compression (grey, polar)."""
    gain = np.exp(2 * 0.9 * TISSUE_ALPHA * geo.depth - 2 * geo.dr * np.cumsum(alpha, axis=1))
    power = echo * gain * gain + geo.noise_power
    amplitude = cv2.resize(np.sqrt(power), geo.rf_shape[::-1], interpolation=cv2.INTER_LINEAR)
    scatterers = rng.standard_normal(geo.rf_shape, dtype=np.float32)
    scatterers *= amplitude
    rf = cv2.sepFilter2D(scatterers, -1, _ONE, geo.beam, borderType=cv2.BORDER_REFLECT)  # the beam, across lines
    half = geo.n_fft // 2
    # analytic RF at every second depth sample: the positive half of its spectrum, inverse-transformed at half length
    analytic = fft.ifft(fft.rfft(rf, n=geo.n_fft, axis=1)[:, :half] * geo.analytic_pulse, axis=1)[:, : rf.shape[1] // 2]
    envelope = np.square(analytic.real)
    envelope += np.square(analytic.imag)
    envelope *= 0.25 / geo.reference**2  # (envelope / ref)^2
    np.log10(np.maximum(envelope, 1e-12, out=envelope), out=envelope)
    envelope *= INTENSITY_MAX * 10 / DYNAMIC_RANGE_DB  # 254 * (1 + 20 log10(env / ref) / DR), clipped
    envelope += INTENSITY_MAX
    return np.clip(envelope, 0, INTENSITY_MAX, out=envelope)


def _textures(geo: ScanGeometry, rng: np.random.Generator, n_slices: int) -> dict[str, np.ndarray]:
    """Texture volumes on two grids: smooth log-normal tissue and gland textures (1.5 mm grid,
    correlated over 3 mm), fine tissue streaks (log-normal, 0.2 x 1 mm) and the field whose
    peaks are the gland's acini (0.3 mm grid, correlated over 0.6 mm across the sweep)."""
    out = {}
    for name, grid, sigma_mm, spread in (
        ("tissue", TEXTURE_GRID_MM, (3.0, 1.8, 1.8), 0.35),
        ("gland", TEXTURE_GRID_MM, (3.0, 1.8, 1.8), 0.25),
        ("streaks", FINE_GRID_MM, (0.6, 0.2, 1.0), 0.35),
        ("acini", FINE_GRID_MM, (0.6, 0.3, 0.3), None),
    ):
        shape = (n_slices, math.ceil(geo.shape[0] * geo.spacing / grid) + 3, math.ceil(geo.width_mm / grid) + 3)
        sigma = (sigma_mm[0] / slice_spacing(n_slices), sigma_mm[1] / grid, sigma_mm[2] / grid)
        field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
        field = (field - field.mean()) / field.std()
        out[name] = (field if spread is None else np.exp(spread * field)).astype(np.float32)
    return out


def simulate_case(
    geo: ScanGeometry, rng: np.random.Generator, n_slices: int, raters: tuple[str, ...], threads: int = 1
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One patient: image ``[Z, H, W]`` uint8 0..254 and masks ``{"expert", *raters}`` uint8 {0, 1}.

    The patient's anatomy, raters and textures come from `rng`; each slice's scatterers from its
    own stream (``rng.spawn``), so slices are imaged `threads` at a time (OpenCV, NumPy and
    scipy.fft release the GIL) with the same result whatever `threads` is.
    """
    anat = Anatomy(rng)
    shared = (rng.choice([-1.0, 1.0]), [_smooth_field(rng, range(1, 4)) for _ in range(2)])
    rater_models = {name: Rater(rng, RATER_ERRORS[name], shared) for name in raters}
    textures = _textures(geo, rng, n_slices)
    streams = rng.spawn(n_slices)
    grids = {"tissue": TEXTURE_GRID_MM, "gland": TEXTURE_GRID_MM, "streaks": FINE_GRID_MM, "acini": FINE_GRID_MM}
    image = np.zeros((n_slices, *geo.shape), dtype=np.uint8)
    masks = {name: np.zeros_like(image) for name in ("expert", *raters)}

    def simulate_slice(z: int) -> None:
        s = 2 * z / (n_slices - 1) - 1
        tex = {
            name: cv2.remap(t[z], *geo.texture_maps[grids[name]], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            for name, t in textures.items()
        }
        polar = _polar_image(geo, *_echogenicity(geo, anat, s, tex), streams[z])
        frame = cv2.remap(polar, geo.map_r, geo.map_t, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        np.rint(np.clip(frame, 0, INTENSITY_MAX, out=frame), out=frame)
        frame[geo.outside] = 0
        image[z] = frame
        (cx, cy), radii = anat.centre(s), [anat.radius(s)] + [r.radius(anat, s) for r in rater_models.values()]
        box = geo.box(cx, cy, max(float(r.max()) for r in radii))  # no contour reaches beyond it
        dx, dy = geo.xc[box] - cx, geo.yc[box] - cy
        rho, idx = np.hypot(dx, dy), _angle_index(dx, dy)
        for mask, radius in zip(masks.values(), radii, strict=True):
            mask[z][box] = (rho < radius[idx]) & geo.fov[box]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(simulate_slice, range(n_slices)))
    return image, masks


def _planned_files(out: Path, n_train: int, n_test: int) -> dict[tuple[str, str], list[tuple[str, Path]]]:
    """(split, case_id) -> [(mask name or "image", path)] in the real layout."""
    kinds = {"image": IMAGES, "expert": EXPERT, "non_expert": NON_EXPERT} | {r: rater_kind(r) for r in RATERS}
    plan = {}
    for split, count, names in (
        ("train", n_train, ("image", "expert", "non_expert")),
        ("test", n_test, ("image", "expert", "non_expert", *RATERS)),
    ):
        for i in range(1, count + 1):
            case_id = f"{i:02d}"
            plan[(split, case_id)] = [
                (name, out / split / kinds[name][0] / file_name(kinds[name], split, case_id)) for name in names
            ]
    return plan


def _check_out(out: Path) -> None:
    """Refuse an `out` that is a file, or a non-empty folder that an earlier `simulate` did not write."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"`out` {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OptionError(f"`out` {out} is not empty and was not written by 'microseg simulate'; choose a new folder")


def _simulate_one(job: tuple) -> None:
    """Simulate one case and write its files: job = (size, n_slices, seed, split, case_id, [(name, path)])."""
    size, n_slices, seed, split, case_id, files = job
    geo = ScanGeometry(*size)
    rng = np.random.default_rng([seed, ("train", "test").index(split), int(case_id)])
    image, masks = simulate_case(geo, rng, n_slices, tuple(name for name, _ in files[2:]), cv2.getNumThreads())
    spacing = (slice_spacing(n_slices), geo.spacing, geo.spacing)
    for name, path in files:
        write_volume(path, image if name == "image" else masks[name], spacing)


def simulate_dataset(
    out: str | Path,
    n_train: int = 10,
    n_test: int = 4,
    n_slices: int = 24,
    size: tuple[int, int] = NATIVE_SIZE,
    seed: int = 0,
    jobs: int | None = 1,
) -> Path:
    """Write a phantom dataset (real layout, two-digit ids from 01) under ``out``; returns ``out``.

    Case ``(split, i)`` draws from ``np.random.default_rng([seed, split_index, i])``, so a case's
    arrays depend only on the seed, its id and the size/slice settings, not on the order or the
    process (`jobs` patients at once, `microseg.core.parallel`) that simulates it.
    """
    out = Path(out)
    if n_train < 1 or n_test < 0:
        raise OptionError(f"`train` must be >= 1 and `test` >= 0 (got {n_train}, {n_test})")
    if seed < 0:
        raise OptionError(f"`seed` must be >= 0 (got {seed})")
    if n_slices < 3:
        raise OptionError(f"`slices` must be >= 3 (got {n_slices})")
    jobs = resolve_jobs(jobs, "simulate")
    if min(size) < 32:
        raise OptionError(f"`size` must be at least 32 x 32 (got {size[0]} x {size[1]})")
    _check_out(out)
    settings = dict(n_train=n_train, n_test=n_test, n_slices=n_slices, size=list(size), seed=seed)
    with atomic_folder(out) as folder:  # a killed run leaves no dataset; a rerun replaces the earlier one whole
        plan = _planned_files(folder, n_train, n_test)
        cases = [(tuple(size), n_slices, seed, split, case_id, files) for (split, case_id), files in plan.items()]
        run_jobs(_simulate_one, cases, jobs, desc="simulate")
        write_text(folder / MARKER, json.dumps({"settings": settings}, indent=1))
    return out

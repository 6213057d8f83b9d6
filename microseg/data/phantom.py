"""A micro-ultrasound prostate phantom written in the real dataset's exact layout.

Each patient is a sweep of pseudo-sagittal slices. A slice is imaged the way ultrasound
forms an image, on a polar grid of scan lines fanned from a virtual apex above the probe:

1. an echogenicity map E (mean backscatter power) and an attenuation map alpha (Np/mm) of the
   anatomy: periprostatic tissue with a smooth texture, the layered rectal wall under the
   probe, the iso/hypo-echoic gland (contrast varying around the contour, a brighter capsule
   in places), a dark fluid bladder beside it with an echogenic wall, bright calcifications;
2. scatterers ``n ~ N(0, 1)`` with amplitude ``sqrt(E)``, attenuated two-way along each scan
   line ``exp(-2 * cumsum(alpha) dr)`` and amplified by a time-gain compensation that corrects
   90 % of the tissue attenuation (calcifications and fluid thus cast shadows / enhancement
   behind them, away from the probe);
3. RF lines = scatterers convolved with the PSF: along depth a pulse ``cos(2 pi k / 4)
   exp(-k^2 / (2 sigma_a^2))`` (carrier at a quarter of the radial sampling rate), across lines a
   Gaussian beam; plus white electronic noise;
4. envelope = |analytic signal| (``scipy.signal.hilbert`` along depth), log compression
   ``254 * clip(1 + 20 log10(env / ref) / DR, 0, 1)`` with DR = 60 dB, tissue at 55 % grey;
5. scan conversion to the Cartesian image (bilinear), black outside the fan.

Geometry (fixed display convention): the probe face lies along the top edge, depth runs down,
and the bladder sits on the left of the gland (base side), slightly deeper, in the direction
``BLADDER_ANGLE_DEG`` +- 10 deg from the gland centre (image axes: x right, y down). The gland's
boundary is weak in the sector facing the bladder and more so in mid-sweep (the midline): there
the gland is iso-echoic with a blurred edge and no capsule. The expert mask is the true gland;
every other rater's contour radius is ``R (1 + eps_rater * weakness * n + 0.005 * m)`` with smooth
random fields n (with a systematic in/out bias) and m, and eps from ``RATER_ERRORS``, so their
disagreement with the expert concentrates in the weak sector.

Sizes: the pixel spacing is the real 0.033586 mm at 962 x 1372 and scales by 962 / H at other
sizes; anatomy is in mm, so a smaller phantom is the same anatomy at a coarser pixel. The PSF is
sized in pixels (speckle grain about two pixels, as at native size), i.e. a reduced phantom
images like a proportionally lower-frequency probe rather than averaging the speckle away.
The sweep spans ``SWEEP_MM`` = 48 mm at gland depth, so the slice spacing written to the header is
``48 / (S - 1)`` mm (0.19 mm for 250 slices, close to the real sweeps); slice ``z`` sits at sweep
position ``s = 2 z / (S - 1) - 1``; the gland spans ``|s| < 0.72..0.86``, so the first and last
slices are always empty.

An existing output folder is reused only if it is empty or was written by this simulator
(``.microseg_phantom.json`` lists its files): files of the same names are overwritten and the
previous run's files that the new set does not contain are removed; anything else is refused.
A progress bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import convolve1d, gaussian_filter, gaussian_filter1d
from scipy.signal import hilbert
from scipy.special import expit
from tqdm import tqdm

from microseg.atomic import write_text
from microseg.data.layout import EXPERT, IMAGES, NON_EXPERT, RATERS, file_name, rater_kind
from microseg.data.volumes import read_volume, write_volume
from microseg.errors import MicrosegError

NATIVE_SIZE = (962, 1372)
NATIVE_SPACING_MM = 0.033586
SWEEP_MM = 48.0
FACE_RADIUS_MM = 12.0  # probe face / fan apex distance
FACE_DEPTH_MM = 0.8  # depth at which the probe face arc crosses the centre line
FAN_HALF_ANGLE = math.radians(40.0)
BLADDER_ANGLE_DEG = 160.0
DYNAMIC_RANGE_DB = 60.0
TISSUE_ALPHA = 0.04  # Np/mm, amplitude attenuation of soft tissue (TGC corrects 90 % of it)
RATER_ERRORS = {"non_expert": 0.15, "clinician": 0.07, "master_student": 0.11, "medical_student": 0.18}
TEXTURE_GRID_MM = 1.5
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
        apex_y = FACE_DEPTH_MM - FACE_RADIUS_MM
        r0, r1 = FACE_RADIUS_MM, height * sp - apex_y
        n_r = 2 * height
        n_t = math.ceil(2 * FAN_HALF_ANGLE * r1 / sp)
        self.dr, dt = (r1 - r0) / n_r, 2 * FAN_HALF_ANGLE / n_t
        self.depth = ((np.arange(n_r) + 0.5) * self.dr).astype(np.float32)  # from the probe face
        r = r0 + self.depth
        theta = (-FAN_HALF_ANGLE + (np.arange(n_t) + 0.5) * dt).astype(np.float32)[:, None]
        self.x = (r * np.sin(theta)).astype(np.float32)  # [lines, depth] mm from the centre line
        self.y = (r * np.cos(theta) + apex_y).astype(np.float32)  # mm below the top edge
        xc = ((np.arange(width) + 0.5) * sp - self.width_mm / 2).astype(np.float32)[None, :]
        yc = ((np.arange(height) + 0.5) * sp).astype(np.float32)[:, None]
        rc, tc = np.hypot(xc, yc - apex_y), np.arctan2(xc, yc - apex_y)
        self.map_r = ((rc - r0) / self.dr - 0.5).astype(np.float32)
        self.map_t = ((tc + FAN_HALF_ANGLE) / dt - 0.5).astype(np.float32)
        self.fov = (rc >= r0) & (rc <= r1) & (np.abs(tc) <= FAN_HALF_ANGLE)
        self.xc, self.yc = np.broadcast_to(xc, self.shape), np.broadcast_to(yc, self.shape)
        # PSF in samples: axial sigma 2 samples (1 pixel), carrier period 4 samples; beam sigma 1.5 px.
        k = np.arange(-8, 9, dtype=np.float32)
        self.pulse = np.cos(2 * np.pi * k / 4) * np.exp(-0.5 * (k / 2.0) ** 2)
        self.beam_sigma = 1.5 * sp / (0.5 * (r0 + r1) * dt)
        beam = np.exp(-0.5 * (np.arange(-20, 21) / self.beam_sigma) ** 2)
        self.rf_rms = math.sqrt(float((self.pulse**2).sum() * ((beam / beam.sum()) ** 2).sum()))  # tissue, E = 1
        self.reference = math.sqrt(2.0) * self.rf_rms * 10 ** (0.45 * DYNAMIC_RANGE_DB / 20)  # tissue at 55 % grey
        d = self.depth
        wall = 1.8 * _bump(d, 0.3, 0.25) - 0.6 * _bump(d, 1.2, 0.5) + 0.8 * _bump(d, 2.1, 0.3)
        self.rectal_wall = (1 + wall).astype(np.float32)  # mucosa, muscularis, serosa under the probe
        # remap coordinates of the polar samples in the coarse texture grid (one cell of padding)
        self.texture_maps = ((self.x + self.width_mm / 2) / TEXTURE_GRID_MM + 1, self.y / TEXTURE_GRID_MM + 1)


class Anatomy:
    """One patient's random anatomy; all lengths in mm, ``s`` is the sweep position in [-1, 1]."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.a, self.b = u(13.0, 16.0), u(8.5, 10.5)  # semi-axes along the image width / depth
        self.cx, self.cy = u(1.0, 4.0), 3.5 + self.b + u(0.5, 2.0)
        self.extent = u(0.72, 0.86)  # gland half-extent along the sweep
        self.shape0 = 0.07 * _smooth_field(rng, range(2, 6))
        self.shape1 = 0.04 * _smooth_field(rng, range(2, 5))
        self.contrast = np.clip(0.72 + 0.15 * _smooth_field(rng, range(1, 5)), 0.4, 0.88)
        self.capsule = 1.8 * np.clip(_smooth_field(rng, range(1, 7)), 0.0, None)
        self.bladder_angle = math.radians(BLADDER_ANGLE_DEG + u(-10.0, 10.0))
        self.weak_width = u(0.4, 0.55)
        delta = np.angle(np.exp(1j * (PHI - self.bladder_angle))).astype(np.float32)
        self.weak_sector = np.exp(-0.5 * (delta / self.weak_width) ** 2).astype(np.float32)
        self.bladder_axes = (u(9.0, 13.0), u(6.0, 9.0))  # across / along the bladder direction
        self.bladder_extent = u(0.45, 0.65)
        gap = u(1.5, 3.0)
        r_mid = self.radius(0.0)[_angle_index(np.cos(self.bladder_angle), np.sin(self.bladder_angle))]
        dist = r_mid + gap + self.bladder_axes[1]
        self.bladder_centre = (self.cx + dist * math.cos(self.bladder_angle),
                               self.cy + dist * math.sin(self.bladder_angle))
        n_calc = int(rng.integers(1, 5))  # (s, radial fraction, angle, radius mm, sweep half-extent mm)
        self.calcs = np.stack(
            [u(-0.5, 0.5, n_calc) * self.extent, u(0.1, 0.6, n_calc), u(-np.pi, np.pi, n_calc),
             u(0.2, 0.6, n_calc), u(1.5, 3.0, n_calc)], axis=1)

    def centre(self, s: float) -> tuple[float, float]:
        return self.cx + 1.0 * s, self.cy + 1.5 * s * s

    def scale(self, s: float) -> float:
        """In-plane size factor of the gland at sweep position s (ellipsoid), 0 outside it."""
        return math.sqrt(max(0.0, 1.0 - (s / self.extent) ** 2))

    def radius(self, s: float) -> np.ndarray:
        """Contour radius R(phi) over PHI at sweep position s (all zeros where the gland is absent)."""
        ellipse = self.a * self.b / np.sqrt((self.b * np.cos(PHI)) ** 2 + (self.a * np.sin(PHI)) ** 2)
        return (self.scale(s) * ellipse * (1 + self.shape0 + s * self.shape1)).astype(np.float32)

    def weakness(self, s: float) -> np.ndarray:
        """Boundary weakness in [0, 1] over PHI: the bladder-facing sector, strongest mid-sweep."""
        midline = 0.4 + 0.6 * math.exp(-0.5 * (s / (0.4 * self.extent)) ** 2)
        return midline * self.weak_sector


class Rater:
    """A rater's contour: ``R (1 + eps * weakness * n + 0.005 * m)``, n = +-1 + 0.5 f (a systematic
    in/out bias at the weak boundary plus smooth variation), f and m smooth in angle and sweep."""

    def __init__(self, rng: np.random.Generator, error: float):
        self.error = error
        bias = rng.choice([-1.0, 1.0])
        self.n = [bias + 0.5 * _smooth_field(rng, range(1, 4)), 0.5 * _smooth_field(rng, range(1, 4))]
        self.m = [_smooth_field(rng, range(1, 6)) for _ in range(2)]

    def radius(self, anatomy: Anatomy, s: float) -> np.ndarray:
        n, m = self.n[0] + s * self.n[1], self.m[0] + s * self.m[1]
        return anatomy.radius(s) * (1 + self.error * anatomy.weakness(s) * n + 0.005 * m)


def _polar_slice(geo: ScanGeometry, anat: Anatomy, s: float, textures: tuple[np.ndarray, np.ndarray],
                 rng: np.random.Generator) -> np.ndarray:
    """Echogenicity and attenuation of one slice on the polar grid, imaged to a grey polar frame."""
    echo = textures[0] * geo.rectal_wall
    alpha = np.full(echo.shape, TISSUE_ALPHA, dtype=np.float32)
    cx, cy = anat.centre(s)
    dx, dy = geo.x - cx, geo.y - cy
    rho, idx = np.hypot(dx, dy), _angle_index(dx, dy)
    radius = anat.radius(s)
    if radius.max() > 0:
        contour, weak = radius[idx], anat.weakness(s)[idx]
        inside = expit((contour - rho) / (0.12 + 1.8 * weak))
        level = 1 - anat.contrast[idx] * (1 - 0.92 * weak)
        echo *= 1 + (level * textures[1] - 1) * inside
        echo *= 1 + anat.capsule[idx] * (1 - weak) * _bump(rho, contour, 0.2)
        for cs, frac, angle, rad, half in anat.calcs:
            ds = abs(s - cs) * SWEEP_MM / 2
            if ds < half:
                r_here = frac * radius[_angle_index(np.cos(angle), np.sin(angle))]
                distance = np.hypot(dx - r_here * math.cos(angle), dy - r_here * math.sin(angle))
                blob = distance < rad * math.sqrt(1 - (ds / half) ** 2)
                echo[blob], alpha[blob] = 40.0, 0.8
    size = math.sqrt(max(0.0, 1 - (s / anat.bladder_extent) ** 2))
    if size > 0:
        ca, sa = math.cos(anat.bladder_angle), math.sin(anat.bladder_angle)
        bx, by = geo.x - anat.bladder_centre[0], geo.y - anat.bladder_centre[1]
        across, along = (anat.bladder_axes[0] * size, anat.bladder_axes[1] * size)
        norm = np.hypot((bx * ca + by * sa) / along, (by * ca - bx * sa) / across)
        fluid = np.clip((1 - norm) * along / 0.25, 0, 1)
        echo = (echo * (1 - fluid) + 0.001 * fluid) * (1 + 0.8 * _bump(norm * along, along, 0.3))
        alpha -= 0.9 * TISSUE_ALPHA * fluid
    gain = np.exp(-2 * np.cumsum(alpha, axis=1) * geo.dr + 2 * 0.9 * TISSUE_ALPHA * geo.depth)
    rf = rng.standard_normal(echo.shape, dtype=np.float32) * np.sqrt(echo) * gain
    rf = gaussian_filter1d(convolve1d(rf, geo.pulse, axis=1), geo.beam_sigma, axis=0)
    rf += 0.01 * geo.rf_rms * rng.standard_normal(rf.shape, dtype=np.float32)
    envelope = np.abs(hilbert(rf, axis=1)).astype(np.float32)
    db = 20 * np.log10(np.maximum(envelope / geo.reference, 1e-6))
    return (254 * np.clip(1 + db / DYNAMIC_RANGE_DB, 0, 1)).astype(np.float32)


def _textures(geo: ScanGeometry, rng: np.random.Generator, n_slices: int) -> list[np.ndarray]:
    """Two smooth log-normal texture volumes (tissue, gland) on the coarse texture grid, correlated over 3 mm."""
    grid = TEXTURE_GRID_MM
    shape = (n_slices, math.ceil(geo.shape[0] * geo.spacing / grid) + 3, math.ceil(geo.width_mm / grid) + 3)
    sigma_z = 3.0 / slice_spacing(n_slices)
    out = []
    for spread in (0.45, 0.3):
        field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), (sigma_z, 1.2, 1.2), mode="wrap")
        out.append(np.exp(spread * (field - field.mean()) / field.std()).astype(np.float32))
    return out


def simulate_case(geo: ScanGeometry, rng: np.random.Generator, n_slices: int,
                  raters: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One patient: image ``[Z, H, W]`` uint8 0..254 and masks ``{"expert", *raters}`` uint8 {0, 1}."""
    anat = Anatomy(rng)
    rater_models = {name: Rater(rng, RATER_ERRORS[name]) for name in raters}
    textures = _textures(geo, rng, n_slices)
    map_x, map_y = geo.texture_maps
    image = np.zeros((n_slices, *geo.shape), dtype=np.uint8)
    masks = {name: np.zeros_like(image) for name in ("expert", *raters)}
    for z in range(n_slices):
        s = 2 * z / (n_slices - 1) - 1
        tex = tuple(cv2.remap(t[z], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT) for t in textures)
        polar = _polar_slice(geo, anat, s, tex, rng)
        frame = cv2.remap(polar, geo.map_r, geo.map_t, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        image[z] = np.where(geo.fov, np.rint(np.clip(frame, 0, 254)), 0)
        cx, cy = anat.centre(s)
        dx, dy = geo.xc - cx, geo.yc - cy
        rho, idx = np.hypot(dx, dy), _angle_index(dx, dy)
        radii = {"expert": anat.radius(s)} | {name: r.radius(anat, s) for name, r in rater_models.items()}
        for name, radius in radii.items():
            masks[name][z] = (rho < radius[idx]) & geo.fov
    return image, masks


def _planned_files(out: Path, n_train: int, n_test: int) -> dict[tuple[str, str], list[tuple[str, Path]]]:
    """(split, case_id) -> [(mask name or "image", path)] in the real layout."""
    kinds = {"image": IMAGES, "expert": EXPERT, "non_expert": NON_EXPERT} | {r: rater_kind(r) for r in RATERS}
    plan = {}
    for split, count, names in (("train", n_train, ("image", "expert", "non_expert")),
                                ("test", n_test, ("image", "expert", "non_expert", *RATERS))):
        for i in range(1, count + 1):
            case_id = f"{i:02d}"
            plan[(split, case_id)] = [(name, out / split / kinds[name][0] / file_name(kinds[name], split, case_id))
                                      for name in names]
    return plan


def _previous_files(out: Path) -> list[Path]:
    """Files of an earlier phantom run in ``out``; refuse a non-empty folder that is not one."""
    if out.exists() and not out.is_dir():
        raise MicrosegError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return []
    marker = out / MARKER
    if not marker.is_file():
        raise MicrosegError(f"--out {out} is not empty and was not written by 'microseg simulate'; choose a new folder")
    try:
        listed = [out / f for f in json.loads(marker.read_text())["files"]]
    except (ValueError, KeyError, TypeError):
        raise MicrosegError(f"{marker}: unreadable phantom marker; remove it or choose a new folder") from None
    inside = out.resolve()
    return [p for p in listed if p.name.endswith((".nii", ".nii.gz")) and p.resolve().is_relative_to(inside)]


def simulate_dataset(out: str | Path, n_train: int = 10, n_test: int = 4, n_slices: int = 24,
                     size: tuple[int, int] = NATIVE_SIZE, seed: int = 0, preview: bool = False) -> Path:
    """Write a phantom dataset (real layout, two-digit ids from 01) under ``out``; returns ``out``.

    Case ``(split, i)`` draws from ``np.random.default_rng([seed, split_index, i])``, so a case's
    arrays depend only on the seed, its id and the size/slice settings.
    """
    out = Path(out)
    if n_train < 1 or n_test < 0:
        raise MicrosegError(f"--train must be >= 1 and --test >= 0 (got {n_train}, {n_test})")
    if seed < 0:
        raise MicrosegError(f"--seed must be >= 0 (got {seed})")
    if n_slices < 3:
        raise MicrosegError(f"--slices must be >= 3 (got {n_slices})")
    if min(size) < 32:
        raise MicrosegError(f"--size must be at least 32 x 32 (got {size[0]} x {size[1]})")
    previous = _previous_files(out)
    plan = _planned_files(out, n_train, n_test)
    written = [p for files in plan.values() for _, p in files]
    settings = dict(n_train=n_train, n_test=n_test, n_slices=n_slices, size=list(size), seed=seed)

    def write_marker(files: list[Path]) -> None:
        listed = sorted({str(p.relative_to(out)) for p in files})
        write_text(out / MARKER, json.dumps({"settings": settings, "files": listed}, indent=1))

    out.mkdir(parents=True, exist_ok=True)
    write_marker(previous + written)  # covers both sets until this run completes
    geo = ScanGeometry(*size)
    spacing = (slice_spacing(n_slices), geo.spacing, geo.spacing)
    for (split, case_id), files in tqdm(plan.items(), desc="simulate", unit="case", disable=None):
        rng = np.random.default_rng([seed, ("train", "test").index(split), int(case_id)])
        raters = tuple(name for name, _ in files[2:])
        image, masks = simulate_case(geo, rng, n_slices, raters)
        for name, path in files:
            write_volume(path, image if name == "image" else masks[name], spacing)
    for stale in set(previous) - set(written):
        stale.unlink(missing_ok=True)
    write_marker(written)
    if preview:
        write_preview(out)
    return out


def write_preview(data_root: str | Path, split: str = "train", case_id: str = "01", n_panels: int = 8) -> Path:
    """PNG montage of one case: slices across the sweep, expert (green) and non-expert (red) contours."""
    from microseg.figures import pyplot, save_png

    plt = pyplot()
    root = Path(data_root) / split
    image = read_volume(root / IMAGES[0] / file_name(IMAGES, split, case_id)).array
    expert = read_volume(root / EXPERT[0] / file_name(EXPERT, split, case_id), "mask").array
    non_expert = read_volume(root / NON_EXPERT[0] / file_name(NON_EXPERT, split, case_id), "mask").array
    slices = np.unique(np.linspace(0, len(image) - 1, n_panels).round().astype(int))
    cols = min(4, len(slices))
    rows = math.ceil(len(slices) / cols)
    h, w = image.shape[1:]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * h / w + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, slices):
        ax.imshow(image[z], cmap="gray", vmin=0, vmax=254, interpolation="nearest")
        for mask, colour in ((expert[z], "lime"), (non_expert[z], "red")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"slice {z}", fontsize=8)
    fig.suptitle(f"{split} {case_id}: expert (green), non-expert (red)", fontsize=9)
    fig.tight_layout()
    target = Path(data_root) / "preview.png"
    save_png(fig, target, dpi=110)
    return target

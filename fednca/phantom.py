"""Phantom ultrasound images: abdominal cross-sections with a liver-like target to segment.

Pure numpy and deterministic: the same (seed, site, index) gives the same image and mask.

Each image is a B-mode frame from a curvilinear probe at the top: a fan-shaped field of view
(black outside), skin, fat and muscle layers under the probe, ribs that are bright and cast
acoustic shadows, a liver-like organ (the target) with a bright capsule and dark vessels, a dark
gallbladder with posterior enhancement, a kidney, and coarse heterogeneous bowel-like tissue
around them. Echogenicity times Rayleigh speckle, depth attenuation, then log compression.

The target is not brighter or darker than its surroundings on the whole (its echogenicity is
drawn around their median): it differs by texture (fine, homogeneous speckle against coarse, blotchy
tissue), by its capsule, and by shape and position. A global intensity threshold fails on it
(:func:`best_threshold_dice`), while a small local model learns it.

A :class:`SiteShift` is the look of one clinic's scanner and population: gain, dynamic range,
speckle, depth, attenuation, probe sector and tilt, target size. See docs/phantom.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .data import Dataset, from_arrays
from .errors import ConfigError
from .metrics import dice


@dataclass(frozen=True)
class SiteShift:
    """How one site's frames look: its scanner's settings and its patients' target sizes."""

    gain_db: float = 0.0  # overall receive gain; shifts every pixel's brightness
    dynamic_range_db: float = 50.0  # log-compression range: smaller = harsher contrast
    speckle: float = 1.0  # speckle strength: 1 = fully developed (Rayleigh), lower = smoother
    grain: float = 1.0  # speckle grain size (resolution of the probe); > 1 = coarser
    depth_cm: float = 16.0  # imaging depth: deeper = anatomy appears smaller
    attenuation: float = 0.5  # uncompensated attenuation, dB per cm of depth (round trip)
    sector_deg: float = 70.0  # full opening angle of the fan
    tilt_deg: float = 0.0  # probe angle: rotation of the fan (and the anatomy under it)
    target_scale: float = 1.0  # mean size of the target relative to a typical liver section
    target_scale_sd: float = 0.12  # spread of the target size between patients (relative)
    noise: float = 0.02  # electronic noise floor (fraction of full scale)

    def __post_init__(self) -> None:
        positive = ("dynamic_range_db", "grain", "depth_cm", "target_scale")
        non_negative = ("speckle", "attenuation", "target_scale_sd", "noise")
        for name in positive + non_negative:
            value = getattr(self, name)
            kind = "positive" if name in positive else "non-negative"
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0 or (kind == "positive" and value == 0):
                raise ConfigError(name, f"must be a {kind} number, got {value!r}")
        if not 0 < self.sector_deg < 180:
            raise ConfigError("sector_deg", f"must be in (0, 180), got {self.sector_deg!r}")
        if not abs(self.tilt_deg) < 45:
            raise ConfigError("tilt_deg", f"must be within +-45 degrees, got {self.tilt_deg!r}")


SITES: tuple[SiteShift, ...] = (
    SiteShift(),
    SiteShift(gain_db=4.0, dynamic_range_db=42.0, speckle=1.0, grain=1.3, depth_cm=14.0,
              attenuation=0.8, sector_deg=60.0, tilt_deg=6.0, target_scale=1.1, noise=0.03),
    SiteShift(gain_db=-4.0, dynamic_range_db=58.0, speckle=0.8, grain=0.85, depth_cm=18.0,
              attenuation=0.3, sector_deg=76.0, tilt_deg=-5.0, target_scale=0.9, target_scale_sd=0.18),
    SiteShift(gain_db=2.0, dynamic_range_db=46.0, speckle=0.9, grain=1.15, depth_cm=15.0,
              attenuation=1.0, sector_deg=66.0, tilt_deg=-8.0, target_scale=1.2, noise=0.04),
    SiteShift(gain_db=-2.0, dynamic_range_db=54.0, speckle=1.1, grain=1.0, depth_cm=17.0,
              attenuation=0.6, sector_deg=72.0, tilt_deg=9.0, target_scale=0.85, target_scale_sd=0.15),
)


def site_shift(site: int) -> SiteShift:
    """The domain shift of a site: sites 0..4 from a fixed table, any other site drawn from its number."""
    if 0 <= site < len(SITES):
        return SITES[site]
    rng = np.random.default_rng([0x5173, site % 2**64])
    return SiteShift(
        gain_db=float(rng.uniform(-5, 5)),
        dynamic_range_db=float(rng.uniform(40, 60)),
        speckle=float(rng.uniform(0.75, 1.15)),
        grain=float(rng.uniform(0.8, 1.35)),
        depth_cm=float(rng.uniform(13, 19)),
        attenuation=float(rng.uniform(0.2, 1.1)),
        sector_deg=float(rng.uniform(58, 78)),
        tilt_deg=float(rng.uniform(-10, 10)),
        target_scale=float(rng.uniform(0.8, 1.25)),
        target_scale_sd=float(rng.uniform(0.08, 0.2)),
        noise=float(rng.uniform(0.01, 0.05)),
    )


# ---------------------------------------------------------------------------------------------
# Building blocks on a grid of physical coordinates (cm; x to the right, y down from the probe)


@lru_cache(maxsize=64)
def _transfer(shape: tuple[int, int], sigma_rows: float, sigma_cols: float, half: bool) -> np.ndarray:
    """Frequency response of a Gaussian blur (rfft layout when ``half``), scaled to unit output variance."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = (np.fft.rfftfreq if half else np.fft.fftfreq)(shape[1])[None, :]
    t = np.exp(-2 * np.pi**2 * ((fy * sigma_rows) ** 2 + (fx * sigma_cols) ** 2))
    full = t if not half else np.concatenate([t, t[:, 1 : (shape[1] + 1) // 2][:, ::-1]], axis=1)
    return (t / np.sqrt(np.mean(full**2))).astype(np.float32)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float,
          wobble: np.ndarray) -> np.ndarray:
    """Normalised radius of a wobbly ellipse (< 1 inside); ``wobble`` rows are (amplitude, phase)
    of the boundary's Fourier terms of order 2, 3, ..."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    u = (dx * c + dy * s) / np.float32(rx)
    v = (dy * c - dx * s) / np.float32(ry)
    rho = np.hypot(u, v)
    cos1, sin1 = u / (rho + 1e-9), v / (rho + 1e-9)  # direction phi of each pixel
    cos_k, sin_k = cos1, sin1
    edge = np.ones_like(rho)
    for amplitude, phase in wobble:  # + a cos(k phi + phase), k = 2, 3, ... by angle addition
        cos_k, sin_k = cos_k * cos1 - sin_k * sin1, sin_k * cos1 + cos_k * sin1
        edge += np.float32(amplitude * np.cos(phase)) * cos_k - np.float32(amplitude * np.sin(phase)) * sin_k
    return rho / edge


def _wobble(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    """n Fourier terms: (amplitude, phase) rows, amplitudes falling with the order."""
    amps = amp * rng.uniform(0.3, 1.0, n) / np.arange(1, n + 1)
    return np.stack([amps, rng.uniform(0, 2 * np.pi, n)], axis=1)


@dataclass(frozen=True)
class _Grid:
    """Per-pixel geometry of one site's field of view (read-only, shared between frames)."""

    lat: np.ndarray  # (R, R) cm along the probe's arc from the fan's axis (anatomy rotates with the probe)
    dep: np.ndarray  # (R, R) cm below the probe face along the beam
    fan: np.ndarray  # (R, R) bool: inside the field of view
    beam_sin: np.ndarray  # direction of the beam through each pixel, in image axes
    beam_cos: np.ndarray
    px_cm: float  # side of one pixel, cm


@lru_cache(maxsize=32)
def _grid(shift: SiteShift, res: int) -> _Grid:
    d = shift.depth_cm
    apex = 0.28 * d  # virtual apex of the curvilinear probe, above the image's top edge
    px = d / res
    ys, xs = np.mgrid[0:res, 0:res]
    x = (xs + 0.5) * px - d / 2
    y = (ys + 0.5) * px + apex
    r, beam = np.hypot(x, y), np.arctan2(x, y)
    theta = beam - np.deg2rad(shift.tilt_deg)
    r_near = apex + 0.02 * d
    fan = (np.abs(theta) <= np.deg2rad(shift.sector_deg) / 2) & (r >= r_near) & (r <= apex + d)
    f32 = np.float32
    grid = _Grid(lat=(theta * (apex + 6.0)).astype(f32), dep=np.maximum(r - r_near, 0.0).astype(f32), fan=fan,
                 beam_sin=np.sin(beam).astype(f32), beam_cos=np.cos(beam).astype(f32), px_cm=px)
    for a in (grid.lat, grid.dep, grid.fan, grid.beam_sin, grid.beam_cos):
        a.flags.writeable = False
    return grid


# ---------------------------------------------------------------------------------------------
# One frame


@dataclass(frozen=True)
class _Patient:
    """One phantom patient's body: the same in every frame of that patient."""

    fat_cm: float  # subcutaneous fat thickness
    muscle_cm: float  # muscle layer thickness
    rx: float  # target half-axes, cm
    ry: float
    cx: float  # target centre: lateral offset from the fan's axis, cm
    gap: float  # target's top below the body wall, cm
    angle: float  # target orientation, radians
    wobble: np.ndarray  # target boundary Fourier terms
    level: float  # target echogenicity relative to the surrounding tissue
    gallbladder: bool
    kidney: bool


def _patient(shift: SiteShift, rng: np.random.Generator) -> _Patient:
    size = shift.target_scale * float(np.clip(1 + shift.target_scale_sd * rng.standard_normal(), 0.7, 1.35))
    return _Patient(
        fat_cm=rng.uniform(0.8, 1.8),
        muscle_cm=rng.uniform(0.6, 1.2),
        rx=4.4 * size * rng.uniform(0.85, 1.15),
        ry=3.2 * size * rng.uniform(0.85, 1.15),
        cx=rng.uniform(-3.0, 0.5),
        gap=rng.uniform(0.2, 1.5),
        angle=rng.uniform(-0.5, 0.2),
        wobble=_wobble(rng, 5, 0.18),
        level=float(np.exp(rng.normal(-0.25, 0.2))),
        gallbladder=bool(rng.random() < 0.7),
        kidney=bool(rng.random() < 0.6),
    )


def _render(
    shift: SiteShift, body: _Patient, rng: np.random.Generator, res: int
) -> tuple[np.ndarray, np.ndarray]:
    """One frame of ``body`` at ``res x res``: image in [0, 1] and the target mask."""
    g = _grid(shift, res)
    lat, dep = g.lat, g.dep
    shape = (res, res)
    px = g.px_cm

    # Bowel-like background: coarse and blotchy (log-normal echogenicity at ~1 cm and ~0.4 cm).
    white = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    blotch = np.fft.irfft2(white * _transfer(shape, 0.5 / px, 0.7 / px, True), s=shape)
    fine_blotch = np.fft.irfft2(white * _transfer(shape, 0.2 / px, 0.3 / px, True), s=shape)
    echo = np.exp(0.6 * blotch + 0.35 * fine_blotch - 0.5 * (0.6**2 + 0.35**2))

    # Body wall under the probe: skin (bright), fat (dark, with septa), muscle (striated).
    k = rng.uniform(0.2, 0.6, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    wall = dep + 0.2 * np.sin(k[0] * lat + phase[0]) + 0.1 * np.sin(3 * k[1] * lat + phase[1])
    fat_end = body.fat_cm
    muscle_end = fat_end + body.muscle_cm
    stripes = 1 + 0.5 * np.sin(2 * np.pi * wall / rng.uniform(0.25, 0.4) + 0.6 * fine_blotch)
    echo = np.where(wall < 0.25, 2.2, np.where(wall < fat_end, 0.45 * (1 + 0.8 * (fine_blotch > 1.3)),
                    np.where(wall < muscle_end, 0.8 * stripes, echo)))

    # Target organ: a large wobbly blob, mostly left of the axis, below the body wall. The probe
    # moves a little between frames of one patient: jitter of position, angle and section size.
    jitter = rng.uniform(0.92, 1.08)
    rx, ry = body.rx * jitter, body.ry * jitter
    cx = body.cx + rng.uniform(-0.8, 0.8)
    cy = muscle_end + 0.9 * ry + body.gap + rng.uniform(-0.4, 0.4)
    liver_rho = _blob(lat, dep, cx, cy, rx, ry, body.angle + rng.uniform(-0.12, 0.12), body.wobble)
    liver = (liver_rho < 1.0) & (wall > muscle_end)
    echo = np.where(liver, body.level * np.exp(0.12 * fine_blotch), echo)

    # Capsule: a thin bright rim, brightest where the beam meets it at right angles.
    rim = (np.abs(liver_rho - 1.0) * min(rx, ry) < 0.12) & (wall > muscle_end)
    gy, gx = np.gradient(liver_rho)
    facing = np.abs(gx * g.beam_sin + gy * g.beam_cos) / (np.hypot(gx, gy) + 1e-9)
    echo = np.where(rim, echo + 1.6 * rng.uniform(0.6, 1.2) * facing**2, echo)

    # Vessels in the target: anechoic round sections with bright walls; they remain target.
    for _ in range(rng.integers(1, 5)):
        vr = rng.uniform(0.2, 0.55)
        vx, vy = cx + rng.uniform(-0.6, 0.6) * rx, cy + rng.uniform(-0.6, 0.6) * ry
        d = np.hypot(lat - vx, dep - vy)
        echo = np.where(liver & (d < vr), 0.04, np.where(liver & (d < vr + 0.12), echo * 1.6, echo))

    # Bowel gas: small, very bright spots outside the target.
    for _ in range(rng.integers(0, 4)):
        bx, by = rng.uniform(-5, 5), rng.uniform(muscle_end + 1, shift.depth_cm)
        spot = (np.hypot(lat - bx, (dep - by) * 2.0) < rng.uniform(0.3, 0.6)) & ~liver
        echo = np.where(spot, 3.5, echo)

    # Gallbladder: anechoic, at the target's lower right edge; posterior acoustic enhancement.
    if body.gallbladder:
        ang = rng.uniform(0.0, 0.9)
        gx0, gy0 = cx + rx * np.cos(ang) * 0.95, cy + ry * np.sin(ang) * 0.95
        gb_rho = _blob(lat, dep, gx0, gy0, rng.uniform(1.0, 1.8), rng.uniform(0.7, 1.1), rng.uniform(-0.5, 0.5),
                       _wobble(rng, 3, 0.08))
        gb = gb_rho < 1.0
        behind = (np.abs(lat - gx0) < 1.2) & (dep > gy0)
        echo = np.where(gb, 0.03, np.where(behind & ~liver, echo * 1.6, echo))
        liver &= ~gb

    # Kidney: below and right of the target, dark cortex around a bright sinus.
    if body.kidney:
        kx, ky = cx + rx * rng.uniform(0.5, 1.1), cy + ry * rng.uniform(0.6, 1.0)
        k_rho = _blob(lat, dep, kx, ky, rng.uniform(2.0, 2.8), rng.uniform(1.2, 1.6), rng.uniform(-0.4, 0.4),
                      _wobble(rng, 3, 0.06))
        kid = (k_rho < 1.0) & ~liver
        echo = np.where(kid & (k_rho < 0.5), 1.9, np.where(kid, 0.55, echo))

    # Ribs: bright short arcs at the body wall; everything below them lies in their shadow.
    for _ in range(rng.choice(3, p=[0.4, 0.4, 0.2])):
        rib_lat = rng.uniform(-6, 4)
        on_rib = np.abs(lat - rib_lat) < rng.uniform(0.5, 0.9)
        rib_dep = muscle_end + rng.uniform(-0.4, 0.4)
        echo = np.where(on_rib & (np.abs(dep - rib_dep) < 0.18), 4.0, echo)
        echo = np.where(on_rib & (dep > rib_dep + 0.18), echo * rng.uniform(0.08, 0.25), echo)

    # Speckle: magnitude of blurred complex noise (Rayleigh); finer grain in the target.
    grain = shift.grain
    # The Fourier transform of white complex Gaussian noise is white complex Gaussian noise: draw it there.
    noise = res * (rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32))
    coarse = np.abs(np.fft.ifft2(noise * _transfer(shape, 0.045 * grain / px, 0.11 * grain / px, False)))
    fine = np.abs(np.fft.ifft2(noise * _transfer(shape, 0.025 * grain / px, 0.05 * grain / px, False)))
    speck = (np.where(liver, fine, coarse) * np.sqrt(0.5)) ** shift.speckle

    # Receive chain: depth attenuation, gain, electronic noise, log compression to the display.
    amp = echo * speck * (10 ** ((shift.gain_db - shift.attenuation * dep) / 20))
    amp = amp + shift.noise * np.abs(rng.standard_normal(shape))
    db = 20 * np.log10(amp + 1e-6)
    image = np.clip(1.0 + (db - 22.0) / shift.dynamic_range_db, 0.0, 1.0)
    return np.where(g.fan, image, 0.0), liver & g.fan


FRAMES_PER_PATIENT = 8


def generate(*, site: int, index: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``index`` of ``site``: (uint8 image (size, size), bool mask (size, size)).

    Frames ``8p .. 8p+7`` show the same patient ``p`` (same body, the probe moved a little).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ConfigError("size", f"must be an integer >= 8, got {size!r}")
    if index < 0:
        raise ConfigError("index", f"must be 0 or more, got {index}")
    shift = site_shift(site)
    key = [seed % 2**64, site % 2**64]
    body = _patient(shift, np.random.default_rng(key + [index // FRAMES_PER_PATIENT, 1]))
    image, mask = _render(shift, body, np.random.default_rng(key + [index % 2**64, 2]), 2 * size)
    image = image.reshape(size, 2, size, 2).mean(axis=(1, 3))
    mask = mask.reshape(size, 2, size, 2).mean(axis=(1, 3)) >= 0.5
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), mask


def frame_name(site: int, index: int) -> str:
    """File stem of a frame: ``s{site}p{patient:03d}_{frame:03d}`` (patient prefix before the ``_``)."""
    return f"s{site}p{index // FRAMES_PER_PATIENT:03d}_{index % FRAMES_PER_PATIENT:03d}"


def phantom_dataset(*, site: int, count: int, size: int = 64, seed: int = 0, start: int = 0) -> Dataset:
    """Frames ``start .. start+count-1`` of a site as a Dataset, named by :func:`frame_name`."""
    if count < 0:
        raise ConfigError("count", f"must be 0 or more, got {count}")
    frames = [generate(site=site, index=i, size=size, seed=seed) for i in range(start, start + count)]
    images = np.stack([f[0] for f in frames]) if frames else np.zeros((0, size, size), np.uint8)
    masks = np.stack([f[1] for f in frames]) if frames else np.zeros((0, size, size), bool)
    return from_arrays(images, masks, [frame_name(site, i) for i in range(start, start + count)])


def best_threshold_dice(train: Dataset, test: Dataset, *, levels: int = 256) -> dict[str, float | str]:
    """The single global intensity threshold that best segments ``train`` (mean Dice), scored on ``test``.

    Both directions are tried: foreground = brighter than the threshold, or darker.
    """
    grid = np.linspace(-1.0, 1.0, levels)

    def scores(ds: Dataset, t: np.ndarray, above: bool) -> np.ndarray:
        x = ds.images[:, 0][None]  # (1, N, S, S)
        pred = x > t[:, None, None, None] if above else x < t[:, None, None, None]
        truth = np.broadcast_to(ds.masks[:, 0][None] > 0.5, pred.shape)
        flat = (-1, *pred.shape[2:])
        return dice(pred.reshape(flat), truth.reshape(flat)).reshape(len(t), -1).mean(1)

    best = (-1.0, 0.0, True)
    for above in (True, False):
        for chunk in np.array_split(grid, 16):
            s = scores(train, chunk, above)
            i = int(np.argmax(s))
            if s[i] > best[0]:
                best = (float(s[i]), float(chunk[i]), above)
    train_dice, threshold, above = best
    test_dice = float(scores(test, np.array([threshold]), above)[0])
    return {"threshold": threshold, "direction": "above" if above else "below",
            "train_dice": train_dice, "test_dice": test_dice}

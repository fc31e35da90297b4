"""Procedural head phantom shared by the IXI-like and BraTS-like generators.

Anatomy is described in a template space with MNI-like millimetre coordinates
(x right, y anterior, z superior, origin near the anterior commissure), as
implicit shapes: ellipsoids, tubes along curves and folded shells.  Each
subject gets its own affine pose, a smooth random warp, random structure
sizes and (optionally) a tumour whose mass effect pushes tissue outward.
Every voxel of the output grid is mapped back into the template and
classified there, so the phantom has no resolution of its own: the same code
renders 64³ test volumes and 256×256×150 full volumes.

Smooth random fields (warp, bias, texture, cortical folding) are cubic
B-spline lattices evaluated separably with three small matrix products,
which is what keeps a full-size subject within a few seconds of CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

# Tissue classes: the phantom's ground truth.  Image intensities are looked up
# per tissue; label maps are derived from tissue and hemisphere.
(
    BG, FAT, MUSCLE, BONE, MARROW, CSF, VENT, VENT3, CHOROID, GM, WM, CGM, CWM, STEM,
    THAL, CAUD, PUT, HIPPO, AMYG, CORD, NECRO, NET, ENH, EDEMA,
) = range(24)
N_TISSUES = 24

# FreeSurfer aseg values (FreeSurferColorLUT.txt) for each tissue: (left, right).
ASEG_VALUES = {
    WM: (2, 41), GM: (3, 42), VENT: (4, 43), CWM: (7, 46), CGM: (8, 47), THAL: (10, 49),
    CAUD: (11, 50), PUT: (12, 51), VENT3: (14, 14), STEM: (16, 16), HIPPO: (17, 53),
    AMYG: (18, 54), CHOROID: (31, 63),
}

# Tissues a brain-extraction tool keeps (BraTS images are skull-stripped).
BRAIN_TISSUES = (CSF, VENT, VENT3, CHOROID, GM, WM, CGM, CWM, STEM, THAL, CAUD, PUT, HIPPO, AMYG,
                 NECRO, NET, ENH, EDEMA)


# --------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """An output grid: the storage shape and affine, plus its RAS-ordered twin.

    Rendering happens on the RAS twin (axis-aligned, positive spacing, so world
    coordinates are separable); ``to_storage`` reorders arrays for writing.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ras_shape: tuple[int, int, int]
    ras_affine: np.ndarray
    _ras_to_storage: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.diag(self.ras_affine)[:3].copy()

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World (RAS mm) coordinates of the voxel centres along each RAS axis."""
        return tuple(
            (self.ras_affine[i, 3] + self.ras_affine[i, i] * np.arange(n)).astype(np.float32)
            for i, n in enumerate(self.ras_shape)
        )

    def to_storage(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(arr, self._ras_to_storage))

    def index_box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Slices of the RAS array covering the world box [lo, hi] (clipped to the grid)."""
        spacing, origin = self.spacing, self.ras_affine[:3, 3]
        start = np.floor((np.asarray(lo) - origin) / spacing).astype(int)
        stop = np.ceil((np.asarray(hi) - origin) / spacing).astype(int) + 1
        start = np.clip(start, 0, self.ras_shape)
        stop = np.clip(stop, 0, self.ras_shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def make_grid(shape, zooms, axcodes: str, centre_world=(0.0, 0.0, 0.0), offset=None) -> Grid:
    """A grid stored with ``axcodes`` (e.g. ``"PIR"``, ``"LPS"``) and voxel size ``zooms``.

    ``offset`` fixes the affine's translation column (the world position of
    voxel 0); without it the volume centre lands on ``centre_world``.
    """
    ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, (axis, flip) in enumerate(ornt):
        affine[int(axis), i] = flip * zooms[i]
    if offset is None:
        centre_vox = (np.asarray(shape, dtype=float) - 1) / 2
        affine[:3, 3] = np.asarray(centre_world, dtype=float) - affine[:3, :3] @ centre_vox
    else:
        affine[:3, 3] = offset
    ras_ornt = nib.orientations.axcodes2ornt(("R", "A", "S"))
    store_to_ras = nib.orientations.ornt_transform(ornt, ras_ornt)
    ras_shape = tuple(int(n) for n in np.asarray(shape)[np.argsort(store_to_ras[:, 0])])
    ras_affine = affine @ nib.orientations.inv_ornt_aff(store_to_ras, shape)
    return Grid(
        shape=tuple(int(n) for n in shape),
        affine=affine,
        ras_shape=ras_shape,
        ras_affine=ras_affine,
        _ras_to_storage=nib.orientations.ornt_transform(ras_ornt, ornt),
    )


# --------------------------------------------------------------------------- smooth noise


def _bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.where(t < 1, 2.0 / 3.0 - t**2 + 0.5 * t**3, 0.0)
    return np.where((t >= 1) & (t < 2), (2 - t) ** 3 / 6.0, out)


class LatticeNoise:
    """Smooth Gaussian-like noise: a random lattice (knot spacing in mm) under a cubic B-spline.

    Rows of each axis' basis matrix are normalised to unit length, so the field
    has unit variance everywhere, whatever the sampling position.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, spacing: float, channels: int = 1):
        self.spacing = float(spacing)
        self.origin = np.asarray(lo, dtype=float) - 1.5 * self.spacing
        counts = np.ceil((np.asarray(hi, dtype=float) - self.origin) / self.spacing).astype(int) + 3
        self.values = rng.standard_normal((channels, *counts)).astype(np.float32)

    def _basis(self, axis: int, coords: np.ndarray) -> np.ndarray:
        u = (np.asarray(coords, dtype=np.float64) - self.origin[axis]) / self.spacing
        u = np.clip(u, 1.0, self.values.shape[axis + 1] - 2.0)
        w = _bspline(u[:, None] - np.arange(self.values.shape[axis + 1])[None, :])
        w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
        return w.astype(np.float32)

    def __call__(self, xs, ys, zs, channel: int = 0) -> np.ndarray:
        """The field on the separable grid ``xs × ys × zs`` (world mm), shape (len(xs), len(ys), len(zs))."""
        w0, w1, w2 = self._basis(0, xs), self._basis(1, ys), self._basis(2, zs)
        t = np.tensordot(w0, self.values[channel], axes=(1, 0))
        t = np.tensordot(t, w1, axes=(1, 1))
        return np.tensordot(t, w2, axes=(1, 1))

    def at_points(self, pts: np.ndarray, channel: int = 0) -> np.ndarray:
        """The same kind of field at scattered points (N, 3) (unnormalised basis, rescaled to unit variance)."""
        u = (pts - self.origin) / self.spacing
        return ndimage.map_coordinates(self.values[channel], u.T, order=3, mode="nearest", prefilter=False) * 3.0


# --------------------------------------------------------------------------- shapes


def ellipsoid_sdf(x, y, z, centre, axes):
    """Signed radial distance (mm, negative inside) to an ellipsoid surface."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    k = np.sqrt((dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2) + 1e-6
    return r * (1.0 - 1.0 / k)


def smooth_min(a, b, k: float):
    """Union of two SDFs with a fillet of radius ``k`` mm (polynomial smooth minimum)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


class Tube:
    """A tube of varying radius along a smooth curve through control points (mm)."""

    def __init__(self, points, radii, step: float = 0.5):
        points = np.asarray(points, dtype=float)
        seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
        s = np.concatenate([[0.0], np.cumsum(seg)])
        n = max(int(s[-1] / step), 2)
        ss = np.linspace(0, s[-1], n)
        self.samples = CubicSpline(s, points, bc_type="natural")(ss)
        self.radii = np.interp(ss, s, np.asarray(radii, dtype=float))
        self.tree = cKDTree(self.samples)
        self.max_radius = float(self.radii.max())
        self.lo = self.samples.min(axis=0) - self.max_radius
        self.hi = self.samples.max(axis=0) + self.max_radius

    def sdf(self, pts: np.ndarray, reach: float = 2.0) -> np.ndarray:
        """Signed distance for (N, 3) points; points farther than radius + reach get +reach."""
        dist, idx = self.tree.query(pts, distance_upper_bound=self.max_radius + reach)
        out = np.full(len(pts), reach, dtype=np.float32)
        hit = np.isfinite(dist)
        out[hit] = dist[hit] - self.radii[idx[hit]]
        return out


def mirror(points):
    """Left-hemisphere control points mirrored to the right."""
    return [(-x, y, z) for x, y, z in points]


# --------------------------------------------------------------------------- anatomy

# Template landmarks (MNI-like mm).  Only left-hemisphere curves are listed;
# the right ones are mirrored with independent jitter.
BRAIN_CENTRE = np.array([0.0, -17.0, 12.0])
CEREBRUM_AXES = np.array([68.0, 86.0, 66.0])
CEREBELLUM_CENTRE = np.array([0.0, -62.0, -34.0])
CEREBELLUM_AXES = np.array([50.0, 32.0, 24.0])
VENTRICLE = (  # frontal horn -> body -> atrium -> temporal horn
    [(-9, 28, 10), (-12, 14, 16), (-14, -5, 20), (-18, -28, 19), (-27, -42, 13),
     (-34, -38, 2), (-37, -28, -5), (-37, -18, -11), (-34, -8, -16)],
    [3.5, 4.5, 4.5, 5.0, 6.0, 4.0, 3.0, 2.5, 2.0],
)
OCCIPITAL_HORN = ([(-27, -42, 13), (-25, -58, 9), (-21, -72, 5)], [5.0, 3.0, 1.5])
HIPPOCAMPUS = (  # head (anterior, inferior) -> tail (posterior, superior), below the temporal horn
    [(-23, -8, -19), (-27, -17, -15), (-30, -26, -10), (-29, -34, -4), (-24, -40, 2), (-18, -42, 7)],
    [6.0, 5.5, 4.8, 4.0, 3.2, 2.4],
)
CAUDATE = ([(-17, 13, 9), (-17, 0, 17), (-19, -18, 21), (-24, -32, 18), (-28, -40, 12)], [6.0, 4.5, 3.2, 2.2, 1.5])
BRAINSTEM = (
    [(0, -18, -2), (0, -26, -20), (0, -35, -38), (0, -41, -55), (0, -45, -75), (0, -46, -130)],
    [10.0, 12.5, 10.0, 8.0, 6.0, 5.0],
)


def _jitter(rng, points, radii, sd_mm: float, radius_scale: float, radius_sd: float = 0.08):
    points = np.asarray(points, dtype=float) + rng.normal(0, sd_mm, (len(points), 3))
    radii = np.asarray(radii, dtype=float) * radius_scale * (1 + rng.normal(0, radius_sd, len(radii)))
    return points, np.clip(radii, 0.8, None)


@dataclass
class TumourSpec:
    """A glioblastoma-like lesion, in world millimetres of the subject."""

    centre: np.ndarray
    core_radius: float
    rim: float
    necrosis_radius: float
    necrosis_offset: np.ndarray
    edema_radius: float
    push_radius: float
    enhancing_fraction: float
    centre_left: bool


class HeadPhantom:
    """One subject: pose, warp, structure sizes and optional tumour, drawn from ``rng``.

    ``brain_centre_world`` is where the template's brain centre lands in world
    coordinates (before the random pose offset).
    """

    def __init__(self, rng: np.random.Generator, brain_centre_world, tumour: bool = False):
        self.rng = rng
        angles = np.deg2rad(rng.normal(0, 3.0, 3))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rot = (
            np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        )
        scale = (1 + rng.normal(0, 0.03)) * (1 + rng.normal(0, 0.035, 3))
        self.forward = rot @ np.diag(scale)  # template -> world (linear part)
        self.inverse = np.linalg.inv(self.forward)
        self.centre = np.asarray(brain_centre_world, dtype=float) + rng.normal(0, 3.0, 3)
        self.warp_amplitude = 2.0
        lo, hi = self.centre - 160, self.centre + 160
        self.warp = LatticeNoise(rng, lo, hi, 40.0, channels=3)
        # Cortical folding and cerebellar folia, sampled on the surfaces (template mm).
        self.folds = LatticeNoise(rng, BRAIN_CENTRE - 100, BRAIN_CENTRE + 100, 6.0)
        self.folia = LatticeNoise(rng, CEREBELLUM_CENTRE - 60, CEREBELLUM_CENTRE + 60, 4.0)
        self.fissure = LatticeNoise(rng, BRAIN_CENTRE - 110, BRAIN_CENTRE + 110, 20.0)

        self.brain_axes = CEREBRUM_AXES * (1 + rng.normal(0, 0.02, 3))
        self.cerebellum_axes = CEREBELLUM_AXES * (1 + rng.normal(0, 0.05, 3))
        self.csf_thickness = rng.uniform(1.5, 3.5)  # older heads: more CSF and larger ventricles
        self.cortex_thickness = rng.uniform(2.3, 3.0)
        self.sulcal_depth = rng.uniform(11.0, 17.0)
        self.ventricle_scale = rng.uniform(0.75, 1.5)
        self.hippocampus_scale = rng.uniform(0.9, 1.12)
        self.tubes: dict[str, list[Tube]] = {}
        for name, (pts, rad), scale, sd in (
            ("ventricle", VENTRICLE, self.ventricle_scale, 1.5),
            ("occipital_horn", OCCIPITAL_HORN, self.ventricle_scale, 2.0),
            ("hippocampus", HIPPOCAMPUS, self.hippocampus_scale, 1.3),
            ("caudate", CAUDATE, 1.0, 1.0),
        ):
            self.tubes[name] = [Tube(*_jitter(rng, p, rad, sd, scale)) for p in (pts, mirror(pts))]
        self.tubes["brainstem"] = [Tube(*_jitter(rng, *BRAINSTEM, 1.0, rng.uniform(0.9, 1.1)))]
        self.deep = {  # ellipsoids: (centre, semi-axes), left then right
            THAL: [((-11, -18, 7), (7.5, 15.0, 8.5)), ((11, -18, 7), (7.5, 15.0, 8.5))],
            PUT: [((-25, 2, 1), (6.0, 15.0, 10.0)), ((25, 2, 1), (6.0, 15.0, 10.0))],
            AMYG: [((-22, 1, -17), (6.5, 6.5, 6.0)), ((22, 1, -17), (6.5, 6.5, 6.0))],
            CHOROID: [((-27, -42, 12), (3.5, 5.0, 3.0)), ((27, -42, 12), (3.5, 5.0, 3.0))],
            VENT3: [((0, -11, 4), (1.6, 13.0, 10.0))],
        }
        for tissue, shapes in self.deep.items():
            grow = self.ventricle_scale if tissue in (VENT3, CHOROID) else 1.0
            self.deep[tissue] = [
                (np.asarray(c, float) + rng.normal(0, 1.0, 3),
                 np.asarray(a, float) * grow * (1 + rng.normal(0, 0.06, 3)))
                for c, a in shapes
            ]
        self.tumour = self._draw_tumour() if tumour else None

    # ----------------------------------------------------------- coordinates

    def to_world(self, t) -> np.ndarray:
        return self.forward @ (np.asarray(t, float) - BRAIN_CENTRE) + self.centre

    def _template(self, X, Y, Z, warp):
        """Template coordinates of world points (broadcastable arrays) given the warp there."""
        a, c = self.inverse, self.centre
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        return tuple(
            (a[i, 0] * dx + a[i, 1] * dy + a[i, 2] * dz + BRAIN_CENTRE[i] + warp[i]).astype(np.float32)
            for i in range(3)
        )

    def template_coords(self, grid: Grid):
        xs, ys, zs = grid.axes()
        warp = [self.warp_amplitude * self.warp(xs, ys, zs, channel=i) for i in range(3)]
        X, Y, Z = xs[:, None, None], ys[None, :, None], zs[None, None, :]
        t = list(self._template(X, Y, Z, warp))
        if self.tumour is not None:
            # Mass effect: an incompressible ball of radius R pushed in at the centre
            # moves tissue from radius (r³ - R³)^(1/3) out to r.
            tu = self.tumour
            reach = 4.5 * tu.push_radius
            box = grid.index_box(tu.centre - reach, tu.centre + reach)
            Xb, Yb, Zb = (ax[b] for ax, b in zip((xs, ys, zs), box))
            u = [Xb[:, None, None] - tu.centre[0], Yb[None, :, None] - tu.centre[1], Zb[None, None, :] - tu.centre[2]]
            r = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
            taper = np.clip((reach - r) / (0.3 * reach), 0, 1)  # fades the push out at the box edge
            r0 = np.cbrt(np.maximum(r**3 - taper * tu.push_radius**3, 0))
            f = r0 / r
            pushed = [tu.centre[i] + u[i] * f for i in range(3)]
            tb = self._template(*pushed, [w[box] for w in warp])
            for i in range(3):
                t[i][box] = tb[i]
        return t

    def _draw_tumour(self) -> TumourSpec:
        rng = self.rng
        rc = rng.uniform(9.0, 22.0)
        for _ in range(1000):
            side = rng.choice([-1, 1])
            t = np.array([side * rng.uniform(12, 48), rng.uniform(-75, 45), rng.uniform(-20, 45)])
            inside = ellipsoid_sdf(*t, BRAIN_CENTRE, self.brain_axes) < -(0.6 * rc + 8)
            clear = ellipsoid_sdf(*t, CEREBELLUM_CENTRE, self.cerebellum_axes) > rc
            if inside and clear and t[2] > -25 + 0.5 * rc:
                break
        rim = rng.uniform(1.5, 4.0)
        return TumourSpec(
            centre=self.to_world(t),
            core_radius=rc,
            rim=rim,
            necrosis_radius=rng.uniform(0.45, 0.85) * (rc - rim),
            necrosis_offset=rng.normal(0, 0.15 * rc, 3),
            edema_radius=rc + rng.uniform(6.0, 24.0),
            push_radius=rng.uniform(0.45, 0.65) * rc,
            enhancing_fraction=rng.uniform(0.55, 0.95),
            centre_left=bool(t[0] < 0),
        )

    # ----------------------------------------------------------- rendering

    def render(self, grid: Grid):
        """Tissue classes (uint8, RAS array of ``grid``), left-hemisphere mask, and ICV signed distance."""
        tx, ty, tz = self.template_coords(grid)
        tissue = np.zeros(grid.ras_shape, dtype=np.uint8)
        c, ba = BRAIN_CENTRE, self.brain_axes

        cerebrum_ell = ellipsoid_sdf(tx, ty, tz, c, ba)
        icv_floor = -46.0 + 20.0 / (1 + np.exp(-(ty - 18.0) / 6.0))
        cerebellum = ellipsoid_sdf(tx, ty, tz, CEREBELLUM_CENTRE, self.cerebellum_axes)
        icv = smooth_min(np.maximum(cerebrum_ell, icv_floor - tz), cerebellum, 8.0)
        del icv_floor
        icv = icv - self.csf_thickness
        neck = ellipsoid_sdf(tx, ty, tz, (0, -15, -125), (58, 62, 95))
        face = ellipsoid_sdf(tx, ty, tz, (0, 25, -50), (52, 62, 42))
        head = smooth_min(smooth_min(icv - 11.0, neck, 12.0), face, 12.0)
        del neck, face
        tissue[head < 0] = FAT
        tissue[head < -4] = MUSCLE
        del head
        tissue[icv < 7] = BONE
        tissue[(icv < 4.5) & (icv > 2.5)] = MARROW
        tissue[icv < 0] = CSF
        for eye in (-32, 32):  # vitreous: fluid, bright on T2, outside every label
            self._paint_ellipsoid(tissue, grid, tx, ty, tz, (eye, 60, -32), (11, 11, 11), CSF)

        # Cerebrum: the ellipsoid above the skull-base floor, minus the tentorial
        # gap over the cerebellum, the basal cisterns and the interhemispheric fissure.
        midline = np.exp(-((tx / 13.0) ** 2)) * np.clip((20.0 - ty) / 10.0, 0, 1) * np.clip((ty + 45.0) / 10.0, 0, 1)
        floor = -43.0 + 20.0 / (1 + np.exp(-(ty - 18.0) / 6.0)) + 30.0 * midline
        del midline
        cerebrum = np.maximum(cerebrum_ell, floor - tz)
        del floor
        cerebrum = np.maximum(cerebrum, 2.5 - cerebellum)
        xs, ys, zs = grid.axes()
        wiggle = 2.0 * self.fissure(xs, ys, zs)
        core = ellipsoid_sdf(tx, ty, tz, (0, -5, 2), (24, 38, 24))
        fissure = np.where(core > 0, 1.0 - np.abs(tx - wiggle), -np.inf)
        del wiggle, core
        cerebrum = np.maximum(cerebrum, fissure)
        del fissure
        self._cortex(tissue, tx, ty, tz, cerebrum, cerebrum_ell)
        del cerebrum_ell, cerebrum
        self._cerebellum(tissue, tx, ty, tz, cerebellum)
        del cerebellum

        # Deep grey matter, brainstem and ventricles, painted in this order.
        for tissue_class in (PUT, AMYG):
            for centre, axes in self.deep[tissue_class]:
                self._paint_ellipsoid(tissue, grid, tx, ty, tz, centre, axes, tissue_class)
        self._paint_tubes(tissue, grid, tx, ty, tz, "caudate", CAUD)
        for centre, axes in self.deep[THAL]:
            self._paint_ellipsoid(tissue, grid, tx, ty, tz, centre, axes, THAL)
        self._paint_tubes(tissue, grid, tx, ty, tz, "hippocampus", HIPPO)
        self._paint_tubes(tissue, grid, tx, ty, tz, "brainstem", STEM)
        cord = (tissue == STEM) & (tz < -62)
        tissue[cord] = CORD
        self._paint_tubes(tissue, grid, tx, ty, tz, "ventricle", VENT)
        self._paint_tubes(tissue, grid, tx, ty, tz, "occipital_horn", VENT)
        for tissue_class in (VENT3, CHOROID):
            for centre, axes in self.deep[tissue_class]:
                self._paint_ellipsoid(tissue, grid, tx, ty, tz, centre, axes, tissue_class)
        left = tx < 0
        if self.tumour is not None:
            self._paint_tumour(tissue, grid, left)
        return tissue, left, icv

    def _box(self, grid: Grid, lo, hi):
        """RAS-array slices that can contain template box [lo, hi] after pose, warp and mass effect."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        world = np.array([self.to_world(p) for p in corners])
        pad = 4 * self.warp_amplitude + 1 + (self.tumour.push_radius if self.tumour is not None else 0.0)
        return grid.index_box(world.min(axis=0) - pad, world.max(axis=0) + pad)

    def _paint_ellipsoid(self, tissue, grid, tx, ty, tz, centre, axes, value):
        axes = np.asarray(axes, float)
        box = self._box(grid, np.asarray(centre) - axes, np.asarray(centre) + axes)
        inside = ellipsoid_sdf(tx[box], ty[box], tz[box], centre, axes) < 0
        tissue[box][inside] = value

    def _paint_tubes(self, tissue, grid, tx, ty, tz, name, value):
        for tube in self.tubes[name]:
            box = self._box(grid, tube.lo, tube.hi)
            sub = tissue[box]
            pts = np.stack([tx[box].ravel(), ty[box].ravel(), tz[box].ravel()], axis=1)
            inside = (tube.sdf(pts) < 0).reshape(sub.shape)
            sub[inside] = value

    def _cortex(self, tissue, tx, ty, tz, cerebrum, ellipsoid):
        """Cortical ribbon with sulci: radial clefts where a surface noise field crosses zero."""
        inside = cerebrum < 0
        tissue[inside] = WM
        depth = -cerebrum
        band = inside & (depth < self.sulcal_depth + self.cortex_thickness + 1)
        idx = np.nonzero(band)
        p = np.stack([tx[idx], ty[idx], tz[idx]], axis=1) - BRAIN_CENTRE
        k = np.sqrt(((p / self.brain_axes) ** 2).sum(axis=1))[:, None] + 1e-6
        g = np.abs(self.folds.at_points(p / k + BRAIN_CENTRE))  # constant along each radius
        d = depth[idx]
        # The medial surface (fissure) is flat; its sulci come from the same field.
        th = self.cortex_thickness
        grey = (d < th) | ((g < 0.75) & (d < self.sulcal_depth + th))
        cleft = (g < 0.1) & (d < self.sulcal_depth)
        vals = np.where(cleft, CSF, np.where(grey, GM, WM)).astype(np.uint8)
        tissue[idx] = vals

    def _cerebellum(self, tissue, tx, ty, tz, cerebellum):
        inside = cerebellum < 0
        idx = np.nonzero(inside)
        p = np.stack([tx[idx], ty[idx], tz[idx]], axis=1) - CEREBELLUM_CENTRE
        k = np.sqrt(((p / self.cerebellum_axes) ** 2).sum(axis=1))[:, None] + 1e-6
        g = self.folia.at_points(p / k + CEREBELLUM_CENTRE)
        d = -cerebellum[idx]
        arbor = (d > 7.0 + 2.5 * g) & (np.abs(p[:, 0]) > 5.0)
        cleft = (np.abs(g) < 0.12) & (d < 6.0)
        tissue[idx] = np.where(cleft, CSF, np.where(arbor, CWM, CGM)).astype(np.uint8)

    def _paint_tumour(self, tissue, grid, left):
        tu, rng = self.tumour, self.rng
        reach = tu.edema_radius * 1.5
        box = grid.index_box(tu.centre - reach, tu.centre + reach)
        xs, ys, zs = (ax[b] for ax, b in zip(grid.axes(), box))
        shape_noise = LatticeNoise(rng, tu.centre - reach, tu.centre + reach, max(tu.core_radius * 0.6, 5.0), 4)
        X, Y, Z = xs[:, None, None], ys[None, :, None], zs[None, None, :]
        r = np.sqrt((X - tu.centre[0]) ** 2 + (Y - tu.centre[1]) ** 2 + (Z - tu.centre[2]) ** 2)
        n = [np.clip(shape_noise(xs, ys, zs, channel=i), -1.5, 1.5) for i in range(4)]
        core = r - tu.core_radius * (1 + 0.22 * n[0])
        nc = tu.centre + tu.necrosis_offset
        rn = np.sqrt((X - nc[0]) ** 2 + (Y - nc[1]) ** 2 + (Z - nc[2]) ** 2)
        necrosis = rn - tu.necrosis_radius * (1 + 0.25 * n[1])
        edema = r - tu.edema_radius * (1 + 0.3 * n[2])
        sub = tissue[box]
        # The falx stops the lesion at the midline.
        same_side = left[box] == bool(tu.centre_left)
        in_brain = np.isin(sub, (GM, WM, CGM, CWM, STEM, THAL, CAUD, PUT, HIPPO, AMYG, VENT, VENT3, CHOROID))
        white = np.isin(sub, (WM, CWM, STEM, THAL, CAUD, PUT))
        grey = np.isin(sub, (GM, HIPPO, AMYG, CGM))
        # Vasogenic edema tracks white matter and only reaches into grey matter near the core.
        sub[(edema < 0) & same_side & (white | (grey & (edema < -0.4 * tu.edema_radius)))] = EDEMA
        in_core = (core < 0) & same_side & (in_brain | (r < tu.core_radius))
        enhancing = (core > -tu.rim) & (n[3] > _quantile_normal(1 - tu.enhancing_fraction))
        sub[in_core] = np.where(enhancing[in_core], ENH, np.where(necrosis[in_core] < 0, NECRO, NET))


def _quantile_normal(p: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(np.clip(p, 1e-6, 1 - 1e-6)))


# --------------------------------------------------------------------------- images


def render_image(
    tissue: np.ndarray,
    means: np.ndarray,
    rng: np.random.Generator,
    grid: Grid,
    bias: LatticeNoise,
    bias_strength: float,
    noise_sd: float,
    texture_sd: float = 0.035,
) -> np.ndarray:
    """An MR-like magnitude image (float32, RAS) from tissue classes and per-tissue mean intensities.

    Steps: per-tissue means with a smooth texture, a point-spread blur (partial
    volume), a multiplicative bias field, then Rician noise (magnitude of a
    complex signal with Gaussian noise on both channels).
    """
    xs, ys, zs = grid.axes()
    img = means.astype(np.float32)[tissue]
    texture = LatticeNoise(rng, [xs[0], ys[0], zs[0]], [xs[-1], ys[-1], zs[-1]], 3.0)
    img *= 1 + texture_sd * texture(xs, ys, zs)
    img = ndimage.gaussian_filter(img, sigma=0.45, truncate=2.5)
    img *= np.exp(bias_strength * bias(xs, ys, zs)).astype(np.float32)
    real = img + rng.normal(0, noise_sd, img.shape).astype(np.float32)
    imag = rng.normal(0, noise_sd, img.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def tissue_to_aseg(tissue: np.ndarray, left: np.ndarray) -> np.ndarray:
    lut_left = np.zeros(N_TISSUES, dtype=np.uint8)
    lut_right = np.zeros(N_TISSUES, dtype=np.uint8)
    for t, (lv, rv) in ASEG_VALUES.items():
        lut_left[t], lut_right[t] = lv, rv
    return np.where(left, lut_left[tissue], lut_right[tissue])

"""The built-in head's surface: a closed skin mesh and the facial features drawn on it.

A generated asset, like head.py which assembles it into FLAME's format: a first read may skip it.

The skin is a star-shaped surface around the origin, r(θ, φ)·d(θ, φ) with
d = (sin θ sin φ, cos θ, sin θ cos φ): θ is the polar angle from +y (up), φ the azimuth from +z
(the face looks along +z, FLAME's axes; +x is the subject's left). r is a smooth maximum of an
ellipsoidal skull and a neck cylinder (log-sum-exp), plus Gaussian bumps in (θ, φ) for brows,
nose, cheekbones, lips, chin and ears. Sampled on a latitude-longitude grid (denser over the
face), it gives a closed, consistently oriented mesh (`latlong_faces`). The same mesh helpers
build the synthetic portraits' hair shell and torso (synthetic.py).

Angles are in degrees, lengths in metres. Letters: V vertices, F faces, R grid rows (θ),
C grid columns (φ).
"""
import functools

import numpy as np

# Skull ellipsoid semi-axes in metres (a 0.24 m tall, 0.15 m wide head, FLAME's scale).
SKULL_X, SKULL_Y_TOP, SKULL_Y_BOTTOM = 0.074, 0.115, 0.125
SKULL_Z_FRONT, SKULL_Z_BACK = 0.092, 0.105
JAW_TAPER = 0.22               # how much narrower the lower face is than the skull
NECK_RADIUS, NECK_Z, NECK_BOTTOM = 0.054, -0.015, -0.23
SMOOTH_MAX_SHARPNESS = 130.0   # 1/m; the skull-to-neck blend spans about 1 cm

# Feature positions in degrees (θ from the top, φ from the front).
EYE_THETA, EYE_PHI = 88.5, 21.0
EYE_HALF_WIDTH, EYE_HALF_HEIGHT = 9.5, 3.8
EYE_DIP = 0.012                # depth of the skin behind the eye opening
EYEBALL_RADIUS = 0.012
MOUTH_THETA, MOUTH_CORNER_PHI = 119.0, 16.0
MOUTH_GAP = 0.45               # angular half-gap between the lips' outer rows
MOUTH_DEPTH = 0.014            # depth of the mouth groove
NOSE_TOP, NOSE_TIP, NOSE_HEIGHT = 84.0, 103.0, 0.022
CHIN_THETA = 143.0

# Grid sampling: (start, stop, count) in degrees; finer over the face, symmetric in φ.
THETA_SPANS = ((0.0, 72.0, 12), (72.0, 152.0, 67), (152.0, 180.0, 7))
PHI_SPANS = ((-180.0, -66.0, 12), (-66.0, 66.0, 72), (66.0, 180.0, 12))
EYE_ROWS, EYE_COLS = 13, 16    # eyeball latitude-longitude grid


def spans(spans):
    """Concatenated evenly spaced pieces, each from start (inclusive) to stop (exclusive)."""
    return np.concatenate([np.linspace(a, b, n, endpoint=False) for a, b, n in spans])


def smoothstep(edge0, edge1, x):
    """0 below edge0, 1 above edge1 (or the reverse when edge1 < edge0), a cubic in between;
    x is a numpy array or a torch tensor."""
    t = ((x - edge0) / (edge1 - edge0)).clip(0.0, 1.0)
    return t * t * (3 - 2 * t)


def angular_bump(theta, phi, theta0, phi0, sigma_theta, sigma_phi):
    """Gaussian bump in angular coordinates (degrees)."""
    return np.exp(-0.5 * ((theta - theta0) / sigma_theta) ** 2
                  - 0.5 * ((phi - phi0) / sigma_phi) ** 2)


def angular_pair(theta, phi, theta0, phi0, sigma_theta, sigma_phi):
    """A left/right symmetric pair of bumps at ±phi0."""
    return (angular_bump(theta, phi, theta0, phi0, sigma_theta, sigma_phi)
            + angular_bump(theta, phi, theta0, -phi0, sigma_theta, sigma_phi))


def direction(theta, phi):
    """Unit vectors (..., 3) at polar angle θ from +y and azimuth φ from +z, in degrees."""
    t, p = np.radians(theta), np.radians(phi)
    return np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1)  # (..., 3)


def vec(fx, fy, fz):
    """Per-vertex vectors (V, 3) from their x, y, z components (arrays, or 0)."""
    return np.stack(np.broadcast_arrays(fx, fy, fz), 1)


def radial(D, f):
    """Per-vertex vectors (V, 3) of length f along the unit directions D (V, 3)."""
    return D * f[:, None]


def latlong_faces(n_rows, n_cols):
    """Faces and per-corner (row, col) grid coordinates of a closed latitude-longitude sphere.

    Row 0 and row n_rows-1 are single pole vertices; rows in between are rings of n_cols vertices.
    Vertex index: 0 for the first pole, 1 + (r-1)·n_cols + c for ring r, last for the other pole.
    Corner coordinates use column n_cols (not 0) where a face wraps around, so UVs have no seam.
    Faces are ordered so that for a sphere with the first pole at +y and φ increasing towards +x
    from +z, normals point outward (counter-clockwise seen from outside).
    """
    rings = n_rows - 2
    col = np.arange(n_cols, dtype=float)
    r, c = (a.ravel() for a in np.meshgrid(np.arange(1.0, rings), col, indexing="ij"))
    top, first, last = np.zeros(n_cols), np.ones(n_cols), np.full(n_cols, float(rings))
    bottom = top + n_rows - 1
    # (row, col) of the corners of the top fan, of two triangles per quad between rings r and
    # r + 1, and of the bottom fan; a pole's corner sits at its face's middle column
    triangles = (((top, col + 0.5), (first, col + 1), (first, col)),
                 ((r, c), (r, c + 1), (r + 1, c)), ((r, c + 1), (r + 1, c + 1), (r + 1, c)),
                 ((last, col), (last, col + 1), (bottom, col + 0.5)))
    corners = np.concatenate([np.stack([np.stack(corner, -1) for corner in triangle], 1)
                              for triangle in triangles])  # (F, 3, 2)
    row, column = corners[..., 0], corners[..., 1]
    faces = np.where(row == 0, 0, np.where(row == n_rows - 1, 1 + rings * n_cols,
                                           1 + (row - 1) * n_cols + column % n_cols))
    # the orders above wind clockwise seen from outside; swap two corners to make them CCW
    return faces[:, [0, 2, 1]].astype(np.int64), corners[:, [0, 2, 1]]


def grid_angles(rows, cols):
    """Per-vertex (θ, φ) for the latitude-longitude vertex order of `latlong_faces`."""
    theta = np.concatenate([[rows[0]], np.repeat(rows[1:-1], len(cols)), [rows[-1]]])
    phi = np.concatenate([[0.0], np.tile(cols, len(rows) - 2), [0.0]])
    return theta, phi


def theta_rows():
    """Polar angles of the head's rows, with the mouth groove's five rows inserted.

    Returns the angles and the row indices of the groove: [outer upper lip, inner upper wall,
    bottom, inner lower wall, outer lower lip].
    """
    base = np.append(spans(THETA_SPANS), 180.0)
    base = base[np.abs(base - MOUTH_THETA) > 1.5 * MOUTH_GAP]
    groove = MOUTH_THETA + MOUTH_GAP * np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    rows = np.sort(np.concatenate([base, groove]))
    return rows, np.searchsorted(rows, groove)


def skull_radius(d):
    """Radius of the ellipsoidal skull along unit directions d (..., 3), narrower at the jaw."""
    lower_front = np.clip(-d[..., 1], 0, 1) * np.clip(d[..., 2], 0, 1)
    ax = SKULL_X * (1 - JAW_TAPER * lower_front)
    ay = np.where(d[..., 1] > 0, SKULL_Y_TOP, SKULL_Y_BOTTOM)
    az = np.where(d[..., 2] > 0, SKULL_Z_FRONT, SKULL_Z_BACK)
    return 1 / np.sqrt((d[..., 0] / ax) ** 2 + (d[..., 1] / ay) ** 2 + (d[..., 2] / az) ** 2)


def capped_cylinder_radius(d, radius, axis_z, bottom):
    """Distance from the origin along unit directions d (..., 3) to the surface of a vertical
    cylinder (axis x = 0, z = axis_z) capped by the planes y = 0 and y = bottom < 0.

    Works for numpy arrays and torch tensors alike. The origin must lie inside the cylinder.
    """
    horizontal = (d[..., 0] ** 2 + d[..., 2] ** 2).clip(1e-12)
    # ray t·d meets x² + (z − axis_z)² = radius² at the positive root of a quadratic in t
    half_b = d[..., 2] * axis_z
    t_side = (half_b + (half_b ** 2 - horizontal * (axis_z ** 2 - radius ** 2)) ** 0.5)
    t_side = t_side / horizontal
    down = d[..., 1] < 0
    t_cap = (bottom / d[..., 1].clip(max=-1e-12)) * down  # the top plane y = 0 holds the origin
    return t_side.clip(max=t_cap)


def skull_and_neck(d):
    """Skin radius along unit directions d (..., 3) before the features: the smooth maximum of
    the skull's and the neck's; and how much of it is neck (0 to 1)."""
    skull = skull_radius(d)
    neck = capped_cylinder_radius(d, NECK_RADIUS, NECK_Z, NECK_BOTTOM)
    k, m = SMOOTH_MAX_SHARPNESS, np.maximum(skull, neck)
    neckness = 1 / (1 + np.exp(-k * (neck - skull)))
    return m + np.log(np.exp(k * (skull - m)) + np.exp(k * (neck - m))) / k, neckness


def eye_opening(theta, phi):
    """1 inside each almond-shaped eye opening, falling smoothly to 0 at its rim."""
    opening = np.zeros_like(theta)
    for side in (1.0, -1.0):
        a = (phi - side * EYE_PHI) / EYE_HALF_WIDTH
        # almond: the opening is tallest in its middle and pinches towards the corners
        b = (theta - EYE_THETA) / (EYE_HALF_HEIGHT * np.sqrt(np.clip(1 - 0.55 * a ** 2, 0.05, 1)))
        opening = opening + smoothstep(1.0, 0.55, np.sqrt(a ** 2 + b ** 2))
    return opening


def mouth_window(phi, inset=0.0):
    """1 between the mouth corners, 0 beyond them."""
    return smoothstep(MOUTH_CORNER_PHI - inset + 2.5, MOUTH_CORNER_PHI - inset - 2.5, np.abs(phi))


def lip_mask(theta, phi):
    """Upper and lower lip: bands along the mouth line that thin out towards the corners."""
    taper = np.sqrt(np.clip(1 - (phi / (MOUTH_CORNER_PHI + 1.5)) ** 2, 0.05, 1))
    bow = 0.6 * np.exp(-0.5 * (phi / 2.5) ** 2)  # the dip of the cupid's bow in the upper lip
    upper = np.exp(-0.5 * ((theta - MOUTH_THETA + 2.2) / (1.6 * taper)) ** 2)
    upper = upper * (1 - 0.35 * np.exp(-0.5 * ((theta - MOUTH_THETA + 3.6) / 0.7) ** 2) * bow)
    lower = np.exp(-0.5 * ((theta - MOUTH_THETA - 2.8) / (2.1 * taper)) ** 2)
    return np.clip(upper + lower, 0, 1) * mouth_window(phi, 0.5)


def nose(theta, phi):
    """Radial height of the nose: a ridge from the brows to the tip, with nostril wings."""
    t = np.clip((theta - NOSE_TOP) / (NOSE_TIP - NOSE_TOP), 0, 1)
    profile = 0.12 + 0.88 * t ** 1.6
    profile = profile * np.where(theta > NOSE_TIP, np.exp(-0.5 * ((theta - NOSE_TIP) / 2.0) ** 2),
                                 1.0)
    profile = profile * np.where(theta < NOSE_TOP, np.exp(-0.5 * ((theta - NOSE_TOP) / 3.0) ** 2),
                                 1.0)
    ridge = NOSE_HEIGHT * profile * np.exp(-0.5 * (phi / (3.2 + 4.0 * t)) ** 2)
    wings = angular_pair(theta, phi, NOSE_TIP - 1.0, 6.5, 2.2, 2.6)
    return ridge + 0.007 * wings


def features(theta, phi):
    """Radial displacement (metres) of all facial features except the eye and mouth openings."""
    bump = functools.partial(angular_bump, theta, phi)  # bump(θ0, φ0, σ_θ, σ_φ)
    pair = functools.partial(angular_pair, theta, phi)
    brow = 0.005 * pair(78.0, 18.0, 3.0, 10.0)
    socket = -0.005 * pair(EYE_THETA, EYE_PHI, 5.5, 8.5)
    cheekbones = 0.006 * pair(97.0, 40.0, 6.0, 10.0)
    lips = lip_mask(theta, phi) * 0.006
    philtrum = -0.002 * bump(MOUTH_THETA - 6.0, 0.0, 3.0, 2.0)
    chin = 0.008 * bump(CHIN_THETA, 0.0, 5.0, 14.0)
    ears = 0.014 * pair(96.0, 92.0, 7.0, 5.0)
    return nose(theta, phi) + brow + socket + cheekbones + lips + philtrum + chin + ears

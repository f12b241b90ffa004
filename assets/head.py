"""The built-in head: a procedural, deterministic face model in FLAME's format.

A generated asset: a first read may skip this file. `flame.py` explains the model it feeds, and
nothing here is needed to follow the method; it exists so that the project runs without a licensed
download.

FLAME (Li et al. 2017) is licensed and cannot ship with the project, so `builtin_head()` builds
arrays with exactly the keys and meaning of `flame_files.load_flame` — template, shape and
expression directions (shape first, expression after, like FLAME's `shapedirs`), pose correctives, a
joint regressor, skinning weights for the same 5 joints [global, neck, jaw, left eye, right eye] —
plus what DECA (Feng et al. 2021) adds on top of FLAME: per-corner UV coordinates and a linear
albedo (texture) space. Everything is numpy arithmetic on fixed constants: no randomness, no files.

The skin and its features are head_surface.py's. Two tricks make it a face rather than a blob:
- the mouth is a deep groove between the lips, its upper wall skinned to the head and its lower wall
  to the jaw, so a jaw rotation opens it and reveals the (painted) teeth and mouth interior;
- each eye opening is a dip of the skin behind a separate eyeball sphere driven by its eye joint;
  the eyelid line is where skin and eyeball meet, and "eyes closed" lifts the skin back over it.
UV coordinates are grid-index coordinates, so texture resolution follows mesh density.

Letters: V vertices, F faces, R grid rows (θ), C grid columns (φ), T texture size.
"""
import functools

import numpy as np

from assets.head_surface import (
    CHIN_THETA, EYEBALL_RADIUS, EYE_COLS, EYE_DIP, EYE_HALF_HEIGHT, EYE_PHI, EYE_ROWS,
    EYE_THETA, MOUTH_CORNER_PHI, MOUTH_DEPTH, MOUTH_THETA, NECK_Z, NOSE_HEIGHT, NOSE_TIP,
    PHI_SPANS, angular_bump, angular_pair, direction, eye_opening, features, grid_angles,
    latlong_faces, lip_mask, mouth_window, nose, radial, skull_and_neck, smoothstep, spans,
    theta_rows, vec)

TEXTURE_SIZE = 256  # DECA's UV texture size (Feng et al. 2021; `uv_size` in its public config)
EYE_UV_TOP = 0.08   # texture rows v < EYE_UV_TOP hold the eyeball; the head skin uses the rest

SMOOTH_SHAPE_RMS = 0.0015      # RMS radial displacement of a degree-2 smooth shape direction
ASYMMETRY = 0.25               # scale of the smooth shape directions that are odd in x

# Colours (linear albedo in [0, 1]).
SKIN = (0.80, 0.62, 0.52)
LIPS = (0.72, 0.40, 0.40)
BROWS = (0.30, 0.22, 0.17)
MOUTH_INSIDE = (0.25, 0.08, 0.08)
TEETH = (0.92, 0.90, 0.84)
SCLERA = (0.93, 0.91, 0.88)
IRIS = (0.36, 0.25, 0.15)
PUPIL = (0.03, 0.03, 0.03)
NOSTRIL = (0.28, 0.16, 0.14)
LASH_LINE = (0.22, 0.16, 0.14)

EXPRESSION_NAMES = (
    "smile", "frown", "brows_up", "brows_down", "brows_inner_up", "eyes_closed", "blink_left",
    "blink_right", "eyes_wide", "squint", "lips_pressed", "lips_pursed", "mouth_stretch",
    "cheek_puff", "sneer_left", "sneer_right", "smile_left", "smile_right", "lower_lip_down",
    "upper_lip_up", "mouth_left", "mouth_right", "nose_wrinkle")
ALBEDO_NAMES = ("skin_dark", "skin_warm", "lip_red", "brow_dark", "iris_blue", "blush",
                "stubble", "eye_shadow")


def _shape_fields(P, D, theta, phi, neckness):
    """Shape directions of the skin (S, V, 3), each scaled to about one standard deviation.

    First named proportions (width, jaw, nose, ...), then smooth radial deformations (spherical
    harmonics of degrees 2–5), as FLAME's PCA would find in a population.
    """
    bump = functools.partial(angular_bump, theta, phi)  # bump(θ0, φ0, σ_θ, σ_φ)
    pair = functools.partial(angular_pair, theta, phi)
    x, y, z = P[:, 0], P[:, 1], P[:, 2]
    head = 1 - neckness
    front = smoothstep(-0.2, 0.5, D[:, 2])
    lower_face = smoothstep(105, 130, theta) * smoothstep(165, 150, theta)
    eyes = pair(EYE_THETA, EYE_PHI, 7.0, 11.0)
    mouth = bump(MOUTH_THETA, 0.0, 6.0, 22.0)
    named = [
        vec(0.05 * x * head, 0, 0),                                  # head width
        vec(0, 0.06 * np.maximum(y, 0), 0),                          # cranium height
        vec(0, 0, 0.07 * np.minimum(z, 0) * head),                   # head depth
        vec(0, 0.05 * np.minimum(y, 0) * front * head, 0),           # face length
        vec(0.09 * x * lower_face * front, 0, 0),                    # jaw width
        radial(D, 0.006 * bump(CHIN_THETA, 0, 6, 16)),               # chin forward
        vec(0, -0.005 * bump(CHIN_THETA + 2, 0, 8, 20), 0),          # chin length
        radial(D, 0.005 * nose(theta, phi) / NOSE_HEIGHT),          # nose length
        vec(0.25 * x * bump(100, 0, 6, 8), 0, 0),                    # nose width
        radial(D, 0.003 * bump(91, 0, 4, 4)),                        # nose bridge
        vec(0, 0.003 * bump(NOSE_TIP, 0, 3, 5), 0),                  # nose tip up
        radial(D, 0.003 * pair(78, 18, 3.5, 12)),                    # brow ridge
        radial(D, 0.004 * pair(97, 40, 6, 10)),                      # cheekbones
        vec(0.003 * np.sign(x) * eyes, 0, 0),                        # eye spacing
        vec(0, 0.003 * eyes, 0),                                     # eye height
        radial(D, -0.003 * eyes),                                    # deep-set eyes
        radial(D, 0.0025 * bump(MOUTH_THETA - 2.4, 0, 2, 12)),       # upper lip
        radial(D, 0.0025 * bump(MOUTH_THETA + 3, 0, 2.5, 12)),       # lower lip
        vec(0.15 * x * mouth, 0, 0),                                 # mouth width
        vec(0, 0.004 * mouth, 0),                                    # mouth height
        vec(0, 0, -0.008 * bump(62, 0, 12, 28)),                     # forehead slope
        vec(0.12 * x * neckness, 0, 0.12 * (z - NECK_Z) * neckness),  # neck thickness
        radial(D, 0.005 * pair(96, 92, 8, 6)),                       # ear size
        radial(D, 0.004 * pair(118, 35, 8, 10)),                     # cheek fullness
        vec(0.06 * x * pair(70, 70, 15, 15), 0, 0),                  # temple width
        vec(0, 0, 0.006 * bump(105, 0, 25, 30)),                     # face protrusion
        radial(D, 0.005 * pair(135, 62, 8, 10)),                     # jaw angle
    ]
    coefficients = _harmonic_coefficients()  # (M, H)
    smooth = _monomials(D) @ coefficients  # (V, H): harmonics of degrees 2-5
    degree = np.repeat([2, 3, 4, 5], [5, 7, 9, 11])  # 2n + 1 harmonics of degree n
    scale = SMOOTH_SHAPE_RMS * 2.0 / degree  # finer deformations vary less, as in a population
    # faces are nearly mirror-symmetric: the harmonics odd in x (left-right) vary much less
    x_odd = np.array([a % 2 == 1 for a, _, _ in MONOMIAL_POWERS])  # (M,) monomials odd in x
    odd_in_x = np.abs(coefficients[x_odd]).sum(0) > np.abs(coefficients[~x_odd]).sum(0)  # (H,)
    scale = np.where(odd_in_x, scale * ASYMMETRY, scale)
    smooth = D[None] * (scale[:, None] * smooth.T * head)[..., None]  # (H, V, 3)
    return np.concatenate([np.stack(named), smooth])


# the powers (a, b, c) of the monomials x^a y^b z^c of degree at most 5, ordered by degree
MONOMIAL_POWERS = [(a, b, n - a - b) for n in range(6)
                   for a in range(n, -1, -1) for b in range(n - a, -1, -1)]


def _monomials(d):
    """All monomials x^a y^b z^c of the direction (MONOMIAL_POWERS). (..., M)"""
    return np.stack([d[..., 0] ** a * d[..., 1] ** b * d[..., 2] ** c
                     for a, b, c in MONOMIAL_POWERS], -1)


def _harmonic_coefficients(n_samples=4096):
    """Monomial coefficients (M, H) of an orthonormal basis of spherical harmonics of degrees
    2..5 on the unit sphere (mean square 1).

    Gram-Schmidt of the monomials in degree order, with inner products averaged over evenly spread
    (Fibonacci) directions: what remains of each degree-n monomial after removing all lower degrees
    is a harmonic of degree n; monomials that add nothing new (x² + y² + z² = 1) drop out.
    """
    i = np.arange(n_samples) + 0.5
    y = 1 - 2 * i / n_samples
    azimuth = np.pi * (1 + 5 ** 0.5) * i
    samples = np.stack([np.sqrt(1 - y ** 2) * np.cos(azimuth), y,
                        np.sqrt(1 - y ** 2) * np.sin(azimuth)], 1)
    values = _monomials(samples)  # (N, M)
    basis, coefficients = [], []
    for m in range(values.shape[1]):
        f, c = values[:, m], np.eye(values.shape[1])[m]
        for b, bc in zip(basis, coefficients):
            overlap = np.mean(f * b)
            f, c = f - overlap * b, c - overlap * bc
        norm = np.sqrt(np.mean(f ** 2))
        if norm > 1e-6 * np.sqrt(np.mean(values[:, m] ** 2)):
            basis.append(f / norm)
            coefficients.append(c / norm)
    # the 4 harmonics of degree 0 and 1 (a scale and a shift of the head) come first: left out
    return np.stack(coefficients[4:], 1)


def _expression_fields(P, D, theta, phi, opening):
    """Expression directions (E, V, 3) in the order of EXPRESSION_NAMES; 1 = a clear expression."""
    bump = functools.partial(angular_bump, theta, phi)  # bump(θ0, φ0, σ_θ, σ_φ)
    pair = functools.partial(angular_pair, theta, phi)
    x = P[:, 0]
    left, right = (x > 0).astype(float), (x < 0).astype(float)  # +x is the subject's left
    corners = pair(MOUTH_THETA, MOUTH_CORNER_PHI, 4.0, 6.0)
    corner_l = bump(MOUTH_THETA, MOUTH_CORNER_PHI, 4.0, 6.0)
    corner_r = bump(MOUTH_THETA, -MOUTH_CORNER_PHI, 4.0, 6.0)
    cheeks = pair(112, 30, 6, 8)
    brows = pair(76, 18, 5, 14)
    inner_brows = pair(77, 9, 4, 6)
    lips = mouth_window(phi) * (bump(MOUTH_THETA - 2.4, 0, 2.5, 40)
                                 + bump(MOUTH_THETA + 3, 0, 3, 40))
    upper_lip = bump(MOUTH_THETA - 2.5, 0, 3, 14)
    lower_lip = bump(MOUTH_THETA + 3.5, 0, 3.5, 14)
    mouth = bump(MOUTH_THETA, 0, 6, 20)
    upper_lid = pair(EYE_THETA - EYE_HALF_HEIGHT, EYE_PHI, 1.5, 6)
    lower_lid = pair(EYE_THETA + EYE_HALF_HEIGHT * 0.8, EYE_PHI, 1.4, 6)
    sneer_l = bump(MOUTH_THETA - 4, 10, 4, 7) + bump(NOSE_TIP, 6, 3, 3)
    sneer_r = bump(MOUTH_THETA - 4, -10, 4, 7) + bump(NOSE_TIP, -6, 3, 3)
    fields = {
        "smile": vec(0.004 * np.sign(x) * corners, 0.006 * corners, -0.004 * corners)
        + vec(0, 0.003 * cheeks, 0.002 * cheeks),
        "frown": vec(0, -0.005 * corners, -0.001 * corners),
        "brows_up": vec(0, 0.006 * brows, 0),
        "brows_down": vec(-0.003 * np.sign(x) * inner_brows, -0.004 * inner_brows, 0),
        "brows_inner_up": vec(0, 0.005 * inner_brows, 0),
        "eyes_closed": radial(D, EYE_DIP * opening),
        "blink_left": radial(D, EYE_DIP * opening * left),
        "blink_right": radial(D, EYE_DIP * opening * right),
        "eyes_wide": radial(D, -0.005 * upper_lid),
        "squint": radial(D, 0.006 * lower_lid),
        "lips_pressed": radial(D, -0.004 * lips),
        "lips_pursed": radial(D, 0.007 * lips) + vec(-0.25 * x * mouth, 0, 0),
        "mouth_stretch": vec(0.006 * np.sign(x) * corners, -0.001 * corners, -0.002 * corners),
        "cheek_puff": radial(D, 0.008 * pair(120, 40, 8, 12)),
        "sneer_left": vec(0, 0.005 * sneer_l, 0),
        "sneer_right": vec(0, 0.005 * sneer_r, 0),
        "smile_left": vec(0.004 * corner_l, 0.006 * corner_l, -0.004 * corner_l),
        "smile_right": vec(-0.004 * corner_r, 0.006 * corner_r, -0.004 * corner_r),
        "lower_lip_down": vec(0, -0.004 * lower_lip, 0.001 * lower_lip),
        "upper_lip_up": vec(0, 0.003 * upper_lip, 0.001 * upper_lip),
        "mouth_left": vec(0.006 * mouth, 0, 0),
        "mouth_right": vec(-0.006 * mouth, 0, 0),
        "nose_wrinkle": vec(0, 0.004 * bump(92, 0, 4, 5), 0),
    }
    return np.stack([fields[name] for name in EXPRESSION_NAMES])


def _paint_albedo(rows, cols, groove_rows, row_positions):
    """Mean albedo texture (3, T, T) and directions (A, 3, T, T) in ALBEDO_NAMES' order."""
    size = TEXTURE_SIZE
    u = (np.arange(size) + 0.5) / size
    v = 1 - (np.arange(size) + 0.5) / size  # texture row 0 is the top (v = 1)
    u, v = np.meshgrid(u, v)  # (T, T)
    row = np.interp((1 - v) / (1 - EYE_UV_TOP), row_positions, np.arange(len(rows)))
    theta = np.interp(row, np.arange(len(rows)), rows)
    phi = np.interp(u * len(cols), np.arange(len(cols) + 1), np.append(cols, 180.0))
    bump = functools.partial(angular_bump, theta, phi)  # bump(θ0, φ0, σ_θ, σ_φ)
    pair = functools.partial(angular_pair, theta, phi)
    is_eye = v < EYE_UV_TOP
    alpha = 180.0 * (1 - v / EYE_UV_TOP)  # angle from the eyeball's gaze axis

    def colour(c):
        return np.asarray(c, float)[:, None, None]

    def over(base, c, weight):
        return base + (colour(c) - base) * np.clip(weight, 0, 1)[None]

    # mouth groove rows: outer walls lip-coloured, back wall dark with upper and lower teeth
    g = groove_rows
    window = mouth_window(phi, 1.0)
    inside = window * ((row > g[0]) & (row < g[4]))
    upper_teeth = (row > g[1] - 0.1) & (row < g[1] + 0.6)
    lower_teeth = (row > g[3] - 0.35) & (row < g[3])
    teeth = window * (upper_teeth | lower_teeth)
    lips = np.clip(1.4 * lip_mask(theta, phi), 0, 1)
    lips = np.maximum(lips, inside * ((row < g[1]) | (row > g[3])))
    arch = 75.5 - 2.2 * np.sin(np.pi * np.clip((np.abs(phi) - 6) / 26, 0, 1))
    brows = (np.exp(-0.5 * ((theta - arch) / 1.4) ** 2) * smoothstep(4, 8, np.abs(phi))
             * smoothstep(34, 28, np.abs(phi)))
    opening = eye_opening(theta, phi)
    lash = 4 * opening * (1 - opening) * np.where(theta < EYE_THETA, 1.0, 0.5)
    iris = smoothstep(25, 23, alpha) * is_eye
    texture = colour(SKIN)
    for c, weight in ((LIPS, lips), (BROWS, 0.85 * brows), (LASH_LINE, lash),
                      (NOSTRIL, pair(NOSE_TIP + 1.8, 3.4, 1.0, 1.6)),
                      (MOUTH_INSIDE, inside * (1 - teeth) * ((row > g[1]) & (row < g[3]))),
                      (TEETH, teeth * inside)):
        texture = over(texture, c, weight)
    eye = over(over(colour(SCLERA), IRIS, iris), PUPIL, smoothstep(10, 8, alpha))
    eye = eye * (1 - 0.35 * smoothstep(20, 24, alpha) * smoothstep(26, 24, alpha))  # limbus
    texture = np.where(is_eye[None], eye, texture)

    skin = (1 - is_eye) * (1 - inside)
    beard = (smoothstep(112, 122, theta) * smoothstep(160, 150, theta)
             * smoothstep(65, 50, np.abs(phi)) + bump(MOUTH_THETA - 5, 0, 2.5, 14))
    beard = np.clip(beard, 0, 1) * (1 - lips) * skin
    shadow = pair(EYE_THETA - 4.5, EYE_PHI, 2.2, 8) * (1 - opening)
    directions = [
        -0.17 * texture * skin[None],                       # skin_dark
        colour((0.04, 0.0, -0.05)) * skin[None],            # skin_warm
        colour((0.08, -0.05, -0.03)) * (lips * skin)[None],  # lip_red
        colour((-0.1, -0.1, -0.1)) * brows[None],           # brow_dark
        colour((-0.1, 0.0, 0.14)) * iris[None],             # iris_blue
        colour((0.06, -0.03, -0.02)) * pair(108, 32, 6, 9)[None],  # blush
        colour((-0.12, -0.11, -0.10)) * beard[None],        # stubble
        colour((-0.06, -0.09, -0.03)) * shadow[None],       # eye_shadow
    ]
    return texture, np.stack(directions)


@functools.lru_cache(maxsize=1)
def _build():
    rows, groove = theta_rows()
    cols = spans(PHI_SPANS)
    n_rows, n_cols = len(rows), len(cols)
    faces, corners = latlong_faces(n_rows, n_cols)
    theta, phi = grid_angles(rows, cols)
    D = direction(theta, phi)  # (Vh, 3)
    row_index = np.concatenate([[0], np.repeat(np.arange(1, n_rows - 1), n_cols), [n_rows - 1]])

    # the skin: features on the skull and neck, the eye openings and the mouth groove cut in
    skin, neckness = skull_and_neck(D)
    opening = eye_opening(theta, phi)
    depth = np.zeros(n_rows)  # of each row's groove, in MOUTH_DEPTH: lips, walls, bottom
    depth[groove] = [0.0, 0.8, 1.0, 0.8, 0.0]
    groove_depth = MOUTH_DEPTH * depth[row_index] * mouth_window(phi, 1.5)
    P = D * (skin + features(theta, phi) - EYE_DIP * opening - groove_depth)[:, None]

    # eyeballs: spheres in the sockets, front 1 mm behind the skin the opening was cut from
    eye_faces, eye_corners = latlong_faces(EYE_ROWS, EYE_COLS)
    a, b = np.radians(grid_angles(np.linspace(0, 180, EYE_ROWS),
                                  np.linspace(0, 360, EYE_COLS, endpoint=False)))
    sphere = np.stack([np.sin(a) * np.sin(b), -np.sin(a) * np.cos(b), np.cos(a)], 1)  # pole +z
    eyeballs, anchors = [], []
    for side in (1.0, -1.0):  # left eye (+x) first, as FLAME's joint order
        d = direction(EYE_THETA, side * EYE_PHI)
        front = d * (skull_and_neck(d)[0] + features(EYE_THETA, side * EYE_PHI))
        front = front - np.array([0.0, 0.0, 0.001])
        eyeballs.append(front - np.array([0.0, 0.0, EYEBALL_RADIUS]) + EYEBALL_RADIUS * sphere)
        anchors.append(np.argmin(np.abs(theta - EYE_THETA) + np.abs(phi - side * EYE_PHI)))
    n_head, n_eye = len(P), len(sphere)
    v_template = np.concatenate([P] + eyeballs)
    head, left, right = slice(0, n_head), slice(n_head, n_head + n_eye), slice(n_head + n_eye, None)

    # UVs per face corner: the skin's u along φ and v from 1 (top pole) down to EYE_UV_TOP, with
    # extra texture rows for the mouth groove; the eyeballs share the strip v < EYE_UV_TOP
    spacing = np.ones(n_rows - 1)
    spacing[groove[0]:groove[-1]] = 5.0
    row_positions = np.concatenate([[0.0], np.cumsum(spacing)])
    row_positions = row_positions / row_positions[-1]  # (R,) texture position of each row
    head_uv = np.stack([corners[..., 1] / n_cols, 1 - (1 - EYE_UV_TOP) * np.interp(
        corners[..., 0], np.arange(n_rows), row_positions)], -1)
    eye_uv = np.stack([eye_corners[..., 1] / EYE_COLS,
                       EYE_UV_TOP * (1 - eye_corners[..., 0] / (EYE_ROWS - 1))], -1)

    # skinning weights (V, 5): global, neck (the head), jaw, left eye, right eye; below the groove's
    # bottom row the mouth is skinned to the jaw, its bottom row half and half
    y = P[:, 1]
    w_global = neckness * smoothstep(-0.08, -0.15, y)
    jaw_side = (np.arange(n_rows) > groove[2]).astype(float)
    jaw_side[groove[2]] = 0.5
    mouth = mouth_window(phi)
    jaw = (mouth * jaw_side[row_index]
           + (1 - mouth) * smoothstep(MOUTH_THETA - 2, MOUTH_THETA + 8, theta))
    jaw = jaw * smoothstep(88, 55, np.abs(phi)) * smoothstep(162, 148, theta) * (1 - w_global)
    weights = np.zeros((len(v_template), 5))
    weights[head, :3] = np.stack([w_global, 1 - w_global - jaw, jaw], 1)
    weights[left, 3] = weights[right, 4] = 1

    # joint regressor (5, V): each joint a fixed average of template vertices
    regressor = np.zeros((5, len(v_template)))
    column_width = np.gradient(np.append(cols, 180.0))[:n_cols]
    band = (neckness > 0.99) & (np.abs(y + 0.17) < 0.012) & (row_index > 0)
    column = np.clip(np.arange(n_head) - 1, 0, None) % n_cols
    ring = band * column_width[column]  # weight by angular width: the mean is the ring's centre
    regressor[0, head] = ring / ring.sum()
    for j, theta0, phi0 in ((1, 118.0, 90.0), (2, 100.0, 78.0)):  # neck and jaw: the mean of
        # two mirror patches of skin, which lies on the midplane
        patch = (np.abs(theta - theta0) < 4.0) & (np.abs(np.abs(phi) - phi0) < 6.0)
        regressor[j, head] = patch / patch.sum()
    regressor[3, left] = regressor[4, right] = 1 / n_eye

    # blendshapes: shape then expression; under shape changes the eyeballs ride rigidly on their
    # socket's skin, under expressions they stay
    shape = _shape_fields(P, D, theta, phi, neckness)
    expression = _expression_fields(P, D, theta, phi, opening)
    dirs = np.zeros((len(shape) + len(expression), len(v_template), 3))
    dirs[:, head] = np.concatenate([shape, expression])
    dirs[:len(shape), left] = shape[:, anchors[0], None]
    dirs[:len(shape), right] = shape[:, anchors[1], None]

    # pose corrective: opening the jaw ((R − I)[2, 1] = sin of the jaw angle, pose feature 16)
    # pulls the cheeks beside the mouth down and back
    posedirs = np.zeros((len(v_template), 3, 36))
    cheeks = angular_pair(theta, phi, 126, 28, 7, 9) * jaw  # only skin the jaw moves
    posedirs[head, 1, 16] = -0.008 * cheeks
    posedirs[head, 2, 16] = -0.003 * cheeks

    albedo_mean, albedo_dirs = _paint_albedo(rows, cols, groove, row_positions)
    return {
        "v_template": v_template, "shapedirs": dirs.transpose(1, 2, 0), "posedirs": posedirs,
        "J_regressor": regressor, "weights": weights,
        "parents": np.array([-1, 0, 1, 1, 1], dtype=np.int64),
        "faces": np.concatenate([faces, eye_faces + n_head, eye_faces + n_head + n_eye]),
        "n_shape_basis": np.array(len(shape)),
        "face_uvs": np.concatenate([head_uv, eye_uv, eye_uv]),
        "albedo_mean": albedo_mean, "albedo_dirs": albedo_dirs,
    }


def skin_grid():
    """The latitude-longitude grid of the skin: row angles θ (R,) and column angles φ (C,) in
    degrees. Skin vertex 0 is the top pole, 1 + (r − 1)·C + c the grid point (r, c), and the
    last skin vertex the bottom pole; the eyeballs follow the skin's vertices."""
    return theta_rows()[0], spans(PHI_SPANS)


def builtin_head():
    """The procedural head as a dict in `flame_files.load_flame`'s format (plus face_uvs (F,3,2),
    albedo_mean (3,T,T), albedo_dirs (A,3,T,T) and n_shape_basis). Fresh copies on every call."""
    return {key: value.copy() for key, value in _build().items()}

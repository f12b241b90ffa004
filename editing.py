"""The coefficients of an edit: what DiffFAE (Wang et al., ECCV 2024, arXiv 2403.17664, §4.1,
Eq. 3) takes from the source and what from the query, and editing by numbers (not in the paper):
explicit head angles, jaw opening, light direction or expression values written over them.

Coefficients are dicts as estimator.CoefficientEstimator returns them: shape β (B, S), albedo α
(B, A), expression ψ (B, E), pose θ (B, 6: global rotation vector, then jaw), light l (B, 9, 3:
SH bands × colours), cam c (B, 3: scale, tx, ty).
Eq. 3: β, α always from I_S; ψ, θ, l, c from I_Q for the attributes edited, from I_S otherwise.
"""
import math

import torch
from scipy.spatial.transform import Rotation

import metrics
from head import EXPRESSION_NAMES

EDIT_ATTRIBUTES = ("pose", "expression", "lighting")
# The estimator coefficients (key, columns) each attribute takes from the query. The jaw
# (pose6[3:]) is part of the expression; the camera moves with the head pose (DiffFAE Eq. 3 takes
# both from I_Q).
ATTRIBUTE_KEYS = {"pose": (("pose", slice(0, 3)), ("cam", slice(None))),
                  "expression": (("expression", slice(None)), ("pose", slice(3, None))),
                  "lighting": (("light", slice(None)),)}


def combine_coefficients(source, query, edit=EDIT_ATTRIBUTES):
    """Eq. 3: shape and albedo always from the source; each attribute in `edit` from the query,
    the others from the source. Coefficient dicts as CoefficientEstimator returns them."""
    assert not isinstance(edit, str) and set(edit) <= set(EDIT_ATTRIBUTES), edit
    out = {key: value.clone() for key, value in source.items()}
    for attribute in edit:
        for key, columns in ATTRIBUTE_KEYS[attribute]:
            out[key][:, columns] = query[key][:, columns]
    return out


NUMBERS = ("yaw", "pitch", "roll", "jaw", "light")  # and the built-in head's expression names


def set_numbers(coefficients, numbers, expression_names=EXPRESSION_NAMES):
    """Edit by numbers: overwrite coefficients with explicit values.

    numbers: {name: value}; yaw/pitch/roll/jaw in degrees (head rotation as intrinsic Y-X-Z
    Euler angles, the convention of metrics.head_pose_degrees; jaw opening about the x axis);
    light: a non-zero 3-vector direction — the first-order SH band is set to that direction with
    its current strength per colour; any name in expression_names sets that expression
    coefficient.
    """
    assert set(numbers) <= {*NUMBERS, *expression_names}, numbers
    out = {key: value.clone() for key, value in coefficients.items()}
    euler = {}
    for name, value in numbers.items():
        if name in ("yaw", "pitch", "roll"):
            euler[name] = float(value)
        elif name == "jaw":
            out["pose"][:, 3:] = 0
            out["pose"][:, 3] = math.radians(float(value))
        elif name == "light":
            direction = torch.as_tensor(value, dtype=out["light"].dtype,
                                        device=out["light"].device).flatten()
            assert direction.numel() == 3 and direction.norm() > 0, value
            strength = out["light"][:, 1:4].norm(dim=1, keepdim=True)  # (B, 1, 3) per colour
            out["light"][:, 1:4] = strength * (direction / direction.norm())[None, :, None]
        else:
            out["expression"][:, list(expression_names).index(name)] = float(value)
    if euler:
        angles = metrics.head_pose_degrees(out["pose"])  # (B, 3) yaw, pitch, roll
        for index, name in enumerate(("yaw", "pitch", "roll")):
            if name in euler:
                angles[:, index] = euler[name]
        rotvec = Rotation.from_euler("YXZ", angles.numpy(), degrees=True).as_rotvec()
        out["pose"][:, :3] = torch.as_tensor(rotvec, dtype=out["pose"].dtype)
    return out


def edit_coefficients(source, query, edit, numbers):
    """The coefficients of an edit: Eq. 3's mix of the source's and the query's (the source's
    alone without a query), then the numbers set over them (set_numbers)."""
    coefficients = source if query is None else combine_coefficients(source, query, edit)
    return set_numbers(coefficients, numbers) if numbers else coefficients

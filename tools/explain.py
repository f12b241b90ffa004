"""See inside an edit: one labelled figure of what each part of DiffFAE (Wang et al., ECCV 2024,
arXiv 2403.17664, §4) did to one image, drawn from the edit's own tensors (DiffFAE.edit with a
trace, filled by the sampler's callback: nothing runs twice, and the output is the same to the
bit). The slot masks and maps are painted by training/pictures.py.

Rows of `figure`, top to bottom:
1. Physical, SPC (§4.1, Eq. 2-3): source | query | I_R, FLAME with the source's shape and albedo
   and the edit's pose, expression, light and camera (difffae.render_face) | f_r decoded: the VQ
   latent of I_R that the UNet is given (DiffFAE.encode_latent), read back through the decoder |
   the coefficients estimated on the source and on the query, and those the edit used.
   When the edit refined its coefficients (`--refine N`, fitting.fit.refine), a second line shows
   I_R as the estimator alone drew it, beside the photometric loss before and after the fit's
   photometric steps (after its landmark steps, when the estimator has a detector).
2. Regions, RSC (§4.2, Eq. 6): the source's slot masks M_k (slots.RegionSlots), each over the
   source in its region's colour | their argmax | the query's masks M_Q | the image each token
   came from (a region swap, App. G, takes a token from another image).
3. Attention, ACR (Eq. 7): A_cross per token, the UNet's cross-attention averaged over heads and
   layers (unet.average_cross_attention), at the first, middle and last sampling step; below
   them M_Q, which Eq. 7 pulls A_cross towards in training: L_attn = mean (A_cross − M_Q)².
4. Trajectory of the sampler: x̂_0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (DDIM Eq. 12's prediction,
   whatever the sampler; samplers.predict_x0), decoded at six steps, then the output.
The numbers are set_numbers' (difffae.py): head yaw, pitch, roll as intrinsic Y-X-Z Euler angles
(head_pose_degrees) and jaw opening, in degrees; the light's direction (x right, y up,
z towards the camera) and strength, the first SH band being direction ⊗ strength per colour.
Panels are enlarged nearest-neighbour, so a 64 px model's figure stays readable and a map's
pixels show as blocks. Labels use Pillow's default font, which has no Greek: x0 stands for x̂_0.

Letters: B batch, K slots (tokens), H/W image size, h/w mask size.
"""
import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from runtime.images import to_pil
from flame import head_pose_degrees
from difffae import EDIT_ATTRIBUTES
from layers import REGION_NAMES
from training.pictures import (argmax_map, enlarge, mask_rows, overlay, paint, paint_one,
                            slot_colour)
from unet import average_cross_attention

PANEL = 128           # least side of a panel in px: images are enlarged by a whole factor
COLUMNS = 7           # panels in a row
GAP = 6               # px between panels
CAPTION = 14          # px of a caption line above a panel
TITLE = 20            # px of a row's title bar
TRAJECTORY = 6        # x̂_0 panels in row 4
INK, PAPER, BAR, NOTE = (20, 20, 20), (255, 255, 255), (60, 60, 60), (232, 232, 232)
# Where each coefficient of the table comes from: source, query, or set by number.
ORIGIN_INK = {"source": (110, 110, 110), "query": (200, 90, 0), "set": (150, 40, 170)}
# Beside row 3, one panel wide.
ATTENTION_NOTE = """A_cross (Eq. 7): at
each pixel a softmax
over the 4 tokens,
averaged over heads,
resized to the masks'
size, averaged over
the layers (unet.
average_cross_
attention).

Lines: the first,
middle and last of
the {steps} steps, then
M_Q of the query.

L = mean (A - M_Q)^2:
the term Eq. 7 adds
in training (step 5
of DiffFAE.loss). At
inference nothing
pulls on A_cross."""
# The edit attribute each number belongs to (editing.ATTRIBUTE_KEYS): the jaw is expression.
ATTRIBUTE = {"yaw": "pose", "pitch": "pose", "roll": "pose", "jaw": "expression",
             "light": "lighting", "strength": "lighting"}


def numbers_of(coefficients):
    """set_numbers read backwards: for coefficients in the estimator's keys, {"yaw", "pitch",
    "roll", "jaw": degrees (B,), "light": unit direction (B, 3), "strength": (B,)}, the strength
    being the first SH band's norm averaged over colours."""
    angles = head_pose_degrees(coefficients["pose"]).float()  # (B, 3) yaw, pitch, roll
    band = coefficients["light"][:, 1:4].detach().float().cpu()  # (B, 3 directions, 3 colours)
    direction = band.sum(dim=2)  # (B, 3): direction · Σ strength, whatever the colours
    return {"yaw": angles[:, 0], "pitch": angles[:, 1], "roll": angles[:, 2],
            "jaw": coefficients["pose"][:, 3].detach().float().cpu().rad2deg(),
            "light": direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12),
            "strength": band.norm(dim=1).mean(dim=1)}


# -- The tensors of one edit -----------------------------------------------------------------------

def attention_steps(count):
    """Indices of the first, middle and last of `count` sampling steps (fewer if count < 3)."""
    return sorted({0, count // 2, count - 1})


def trajectory_steps(count):
    """TRAJECTORY indices spread evenly over `count` steps, first and last included."""
    return sorted({round(i * (count - 1) / (TRAJECTORY - 1)) for i in range(TRAJECTORY)})


@torch.no_grad()
def explanation(model, trace, query=None):
    """The maps and images the figure draws, from a trace that DiffFAE.edit filled: {"masks"
    (B, K, h, w) the source's, "query_masks" M_Q or None, "attention" {step: A_cross (B, K, h,
    w)}, "timesteps", "x0" {step: decoded x̂_0 (B, 3, H, W)} at the steps of the trajectory and
    the attention, "f_r" decoded (B, 3, H, W), "detector": whether a fit starts from landmarks}.
    Masks and maps are softmaxes over the K tokens: each sums to 1 at every pixel."""
    cond, steps = trace["cond"], trace["steps"]  # steps: the sampler's dict of each step
    size = cond["masks"].shape[-2:]  # Eq. 7 compares A_cross and M_Q at the masks' size
    attended = attention_steps(len(steps))
    shown = set(trajectory_steps(len(steps))) | set(attended)
    return {"masks": cond["masks"],
            # M_Q: the query's slot masks, the target of Eq. 7 (not used by an edit itself)
            "query_masks": None if query is None else model.slots(query)["masks"],
            "attention": {i: average_cross_attention(steps[i]["attn"], size) for i in attended},
            "timesteps": [step["t"] for step in steps],
            "x0": {i: model.decode_latent(step["x0"]) for i, step in enumerate(steps)
                   if i in shown},
            "f_r": model.decode_latent(cond["f_r"]),
            "detector": model.estimator.landmarks is not None}


# -- Drawing ---------------------------------------------------------------------------------------

class _Sheet:
    """A white page of rows of square panels, each row under a title bar."""

    def __init__(self, side):
        self.side, self.rows, self.font = side, [], ImageFont.load_default()
        self.width = COLUMNS * side + (COLUMNS + 1) * GAP

    def row(self, title, cells, lines=1):
        """cells: ((column, line), caption, picture); a picture is a (3, h, w) tensor in [-1, 1],
        enlarged to the panel, or a callable draw(draw, x, y) that writes into the panel."""
        page = Image.new("RGB", (self.width, TITLE + lines * (CAPTION + self.side + GAP)), PAPER)
        draw = ImageDraw.Draw(page)
        draw.rectangle((0, 0, self.width, TITLE - 4), fill=BAR)
        draw.text((GAP, 3), title, font=self.font, fill=PAPER)
        for (column, line), caption, picture in cells:
            x = GAP + column * (self.side + GAP)
            y = TITLE + line * (CAPTION + self.side + GAP)
            draw.text((x, y), caption, font=self.font, fill=INK)
            if callable(picture):
                picture(draw, x, y + CAPTION)
            else:
                page.paste(to_pil(enlarge(picture[None].float().cpu(), self.side)[0]),
                           (x, y + CAPTION))
        self.rows.append(page)

    def text(self, lines, box=False):
        """A text cell: lines of (x offset, text, ink) segments; with box, on a grey panel."""
        def write(draw, x, y):
            if box:
                draw.rectangle((x, y, x + self.side - 1, y + self.side - 1), fill=NOTE)
            for number, segments in enumerate(lines):
                for offset, text, ink in segments:
                    draw.text((x + 4 + offset, y + 4 + number * CAPTION), text, font=self.font,
                              fill=ink)
        return write

    def note(self, *lines):
        return self.text([[(0, line, INK)] for line in lines], box=True)

    def image(self):
        page = Image.new("RGB", (self.width, sum(row.height for row in self.rows)), PAPER)
        top = 0
        for row in self.rows:
            page.paste(row, (0, top))
            top += row.height
        return page


def _origin(name, query, edit, numbers):
    """Where the edit took coefficient `name` from: "set" by number, the query or the source."""
    if name in numbers:  # "strength" is never a number: set_numbers keeps it
        return "set"
    return "query" if query is not None and ATTRIBUTE[name] in edit else "source"


def _physical_row(sheet, seen, trace, result, source, query, edit, numbers, item):
    """Row 1 (SPC): the images of Eq. 2-3 and the table of numbers behind I_R."""
    estimated = [None if c is None else numbers_of(c) for c in trace["estimates"]]
    used = numbers_of(result["coefficients"])

    def show(values, name):
        if values is None:
            return "-"
        value = values[name][item]
        if name == "light":
            return " ".join(f"{v:+.2f}" for v in value.tolist())
        return f"{float(value):.2f}" if name == "strength" else f"{float(value):+.1f}°"

    columns = (0, 62, 148, 234, 330)  # px: name, source, query, edit, from
    lines = [list(zip(columns, ("", "source", "query", "edit", "from"), [INK] * 5))]
    for name in ATTRIBUTE:
        origin = _origin(name, query, edit, numbers)
        ink = ORIGIN_INK[origin]
        texts = ("light dir" if name == "light" else name, *(show(v, name) for v in estimated),
                 show(used, name), origin)
        lines.append(list(zip(columns, texts, (INK, INK, INK, ink, ink))))
    taken = ", ".join(edit) if query is not None else "nothing, no query"
    lines += [[(0, f"taken from the query: {taken}", INK)],
              [(0, "light dir: x right, y up, z to the camera; strength: |SH band 1|", INK)]]
    no_query = sheet.note("no query:", "numbers only")
    cells = [((0, 0), "source I_S", source[item]),
             ((1, 0), "query I_Q", no_query if query is None else query[item]),
             ((2, 0), "I_R, FLAME rendered", result["render"][item]),
             ((3, 0), "f_r, decoded", seen["f_r"][item]),
             ((4, 0), "coefficients (explain.numbers_of)", sheet.text(lines))]
    unrefined, losses = trace.get("unrefined_render"), trace.get("fit_losses")
    if unrefined is not None:  # the refinement through the renderer (fitting.fit.refine)
        cells += [((2, 1), "I_R, estimator alone", unrefined[item]),
                  ((3, 1), "the fit", sheet.note(
                      *(["landmarks, then"] if seen["detector"] else []),
                      "photometric loss", "on the face slot", "(fitting.fit.refine),",
                      f"{len(losses) - 1} Adam steps:", f"{losses[0]:.4f} before",
                      f"{losses[-1]:.4f} after", "(the batch's mean)"))]
    sheet.row("1  Physical, SPC (Eq. 2-3): coefficients -> difffae.render_face -> I_R; "
              "DiffFAE.encode_latent -> f_r, given to the UNet beside z_t", cells,
              lines=1 if unrefined is None else 2)


def _token_images(source, swap, item):
    """A 2×2 mosaic of the image each token came from (face, hair / clothes, background), each
    framed in its slot's colour: (3, H, W)."""
    quarters = []
    for k, region in enumerate(REGION_NAMES):
        image = swap.get(region, source)[item:item + 1]
        framed = (slot_colour(k).to(image)[None, :, None, None] * 2 - 1).expand(
            1, 3, image.shape[-2] // 2, image.shape[-1] // 2).clone()  # (1, 3, H/2, W/2)
        border = max(1, framed.shape[-1] // 16)
        inner = (..., slice(border, -border), slice(border, -border))
        framed[inner] = F.avg_pool2d(image, 2)[inner]
        quarters.append(framed[0])
    return torch.cat([torch.cat(quarters[:2], dim=2), torch.cat(quarters[2:], dim=2)], dim=1)


def _regions_row(sheet, seen, source, query, swap, item):
    """Row 2 (RSC): the source's slot masks, their argmax, M_Q, and where the tokens came from."""
    pick = slice(item, item + 1)
    pictures = [row[0] for row in mask_rows(source[pick], seen["masks"][pick])]
    cells = [((k, 0), f"slot {k}: {name}", pictures[k]) for k, name in enumerate(REGION_NAMES)]
    cells.append(((4, 0), "argmax of the 4 masks", pictures[-1]))
    cells.append(((5, 0), "M_Q, the query's masks", sheet.note("no query") if query is None
                  else argmax_map(query[pick], seen["query_masks"][pick])[0]))
    swapped = sum(region in swap for region in REGION_NAMES)
    cells.append(((6, 0), f"token images: {swapped} swapped",
                  _token_images(source, swap, item)))
    sheet.row("2  Regions, RSC (Eq. 6): slots.RegionSlots, slot attention over I_S -> 4 tokens F "
              "and their masks M; F is the UNet's cross-attention context", cells)


def _attention_row(sheet, seen, query, item):
    """Row 3 (ACR): each token's A_cross at three steps over x̂_0 of the step, then M_Q."""
    pick = slice(item, item + 1)
    timesteps, target = seen["timesteps"], seen["query_masks"]
    maps = [(f"t={timesteps[step]}", attention[pick], seen["x0"][step][pick], "x0")
            for step, attention in seen["attention"].items()]
    maps.append(("M_Q", None if query is None else target[pick], query, "I_Q"))
    cells = []
    for line, (when, attention, image, under) in enumerate(maps):
        if attention is None:
            cells += [((k, line), f"M_Q {name}", sheet.note("no query"))
                      for k, name in enumerate(REGION_NAMES + ("all", f"all over {under}"))]
            continue
        cells += [((k, line), f"{when} {name}", paint_one(attention, k)[0])
                  for k, name in enumerate(REGION_NAMES)]
        loss = "" if query is None or when == "M_Q" else \
            f"  L={float((attention - target[pick]).pow(2).mean()):.3f}"
        cells.append(((4, line), f"{when} all{loss}", paint(attention)[0]))
        cells.append(((5, line), f"{when} all over {under}", overlay(image, attention)[0]))
    note = ATTENTION_NOTE.format(steps=len(timesteps)).splitlines()
    cells.append(((6, 0), "", sheet.text([[(0, line, INK)] for line in note])))
    sheet.row("3  Attention, ACR (Eq. 7): the UNet's cross-attention to each token while "
              "sampling, and M_Q, its training target", cells, lines=len(maps))


def _trajectory_row(sheet, seen, sampler, result, item):
    """Row 4: x̂_0 decoded along the sampler's steps, then the output."""
    timesteps = seen["timesteps"]
    cells = [((column, 0), f"x0 at t={timesteps[step]}", seen["x0"][step][item])
             for column, step in enumerate(trajectory_steps(len(timesteps)))]
    cells.append(((COLUMNS - 1, 0), "output I_O", result["image"][item]))
    sheet.row(f"4  Trajectory of {sampler}: samplers.predict_x0 (DDIM Eq. 12), x0 = (z_t "
              f"- sqrt(1 - abar_t) eps) / sqrt(abar_t), decoded at {len(cells) - 1} of "
              f"{len(timesteps)} steps", cells)


@torch.no_grad()
def figure(model, trace, result, source, query=None, edit=EDIT_ATTRIBUTES, swap=None,
           numbers=None, item=0):
    """The labelled figure (a PIL image) of image `item` of an edit: DiffFAE.edit's arguments
    (source, query, edit, swap, numbers), the trace it filled and the result it returned."""
    size = model.image_size
    sheet = _Sheet(size * math.ceil(PANEL / size))
    seen = explanation(model, trace, query)
    _physical_row(sheet, seen, trace, result, source, query, edit, numbers or {}, item)
    _regions_row(sheet, seen, source, query, swap or {}, item)
    _attention_row(sheet, seen, query, item)
    _trajectory_row(sheet, seen, trace["sampler"] or model.diffusion.sampler, result, item)
    return sheet.image()

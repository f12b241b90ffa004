"""Tests of render.py against analytic results and brute-force references written here."""
import math

import pytest
import torch

import render

PI = math.pi


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def brute_coverage(tri, H, W, inclusive=False):
    """Pixel centres inside a triangle (3, 2), by the sign of the three cross products in float64;
    also the smallest |cross product| so tests can check no centre lies on an edge."""
    tri = tri.double()
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5,
                            torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    cross = []
    for k in range(3):
        a, b = tri[k], tri[(k + 1) % 3]
        cross.append((b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0]))
    cross = torch.stack(cross)  # (3, H, W)
    if inclusive:
        inside = (cross >= 0).all(0) | (cross <= 0).all(0)
    else:
        inside = (cross > 0).all(0) | (cross < 0).all(0)
    return inside, cross.abs().min()


def screen_mesh(*triangles, z=None):
    """Unshared triangles (each (3, 2) pixel coords) as verts (1, 3T, 3) and faces (T, 3)."""
    xy = torch.tensor(triangles, dtype=torch.float64).reshape(-1, 2)
    depth = torch.zeros(len(xy), 1, dtype=torch.float64) if z is None else \
        torch.tensor(z, dtype=torch.float64).repeat_interleave(3)[:, None]
    faces = torch.arange(len(xy)).view(-1, 3)
    return torch.cat([xy, depth], -1)[None], faces


def icosphere(subdivisions):
    """Unit icosphere: 12 icosahedron vertices, each subdivision splits a face into 4 and pushes the
    new midpoints to the sphere. Faces counter-clockwise seen from outside.
    Returns verts (V, 3) float64, faces (20·4^s, 3) long."""
    t = (1 + math.sqrt(5)) / 2
    verts = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                          [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
                         dtype=torch.float64)
    faces = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9],
                          [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2],
                          [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
                          [8, 6, 7], [9, 8, 1]])
    for _ in range(subdivisions):
        edges = torch.cat([faces[:, (0, 1)], faces[:, (1, 2)], faces[:, (2, 0)]]).sort(-1)[0]
        unique, inverse = torch.unique(edges, dim=0, return_inverse=True)  # (E, 2), (3F,)
        verts = torch.cat([verts, (verts[unique[:, 0]] + verts[unique[:, 1]]) / 2])
        mid = (inverse + len(verts) - len(unique)).view(3, -1).T  # (F, 3) mids of 01, 12, 20
        v0, v1, v2 = faces.unbind(-1)
        m01, m12, m20 = mid.unbind(-1)
        faces = torch.cat([torch.stack(s, -1) for s in ((v0, m01, m20), (v1, m12, m01),
                                                        (v2, m20, m12), (m01, m12, m20))])
    return torch.nn.functional.normalize(verts, dim=-1), faces


def test_project_matches_hand_computed_pixels():
    verts = torch.tensor([[[0.1, 0.2, 0.3], [-1.0, 1.0, -2.0]]])
    cam = torch.tensor([[2.0, 0.05, -0.1]])
    screen = render.project(verts, cam, (40, 60))
    # ndc = 2·(0.15, 0.1) = (0.3, 0.2): x = 1.3·30, y = 0.8·20;  ndc = 2·(−0.95, 0.9) = (−1.9, 1.8)
    expected = torch.tensor([[[39.0, 16.0, -0.3], [-0.9 * 30, -0.8 * 20, 2.0]]])
    torch.testing.assert_close(screen, expected)
    torch.testing.assert_close(render.project(verts, cam, 40)[..., 1], screen[..., 1])


@pytest.mark.parametrize("tri", [[[2.3, 1.7], [17.2, 5.1], [6.6, 14.9]],
                                 [[6.6, 14.9], [17.2, 5.1], [2.3, 1.7]],  # other winding
                                 [[-7.3, 3.1], [25.4, -4.2], [11.1, 30.6]]])  # clipped
def test_single_triangle_covers_exactly_the_centres_inside(tri):
    H, W = 16, 20
    verts, faces = screen_mesh(tri)
    reference, margin = brute_coverage(verts[0, :, :2], H, W)
    assert margin > 1e-3  # no centre on an edge: the reference needs no tie rule
    fragments = render.rasterize(verts.float(), faces, (H, W))
    assert torch.equal(fragments.pix_to_face[0] == 0, reference)
    assert torch.equal(fragments.pix_to_face[0] < 0, ~reference)


def test_nearer_triangle_wins_where_they_overlap():
    a = [[1.2, 1.3], [14.1, 2.2], [3.4, 13.7]]
    b = [[4.6, 3.9], [15.3, 9.8], [8.2, 15.1]]
    H = W = 16
    cover_a, _ = brute_coverage(torch.tensor(a), H, W)
    cover_b, _ = brute_coverage(torch.tensor(b), H, W)
    assert (cover_a & cover_b).sum() > 10
    for depths, near in (([1.0, 2.0], 0), ([2.0, 1.0], 1), ([-3.0, -1.0], 0), ([1.5, 1.5], 0)):
        verts, faces = screen_mesh(a, b, z=depths)
        fragments = render.rasterize(verts, faces, H)
        p2f = fragments.pix_to_face[0]
        assert (p2f[cover_a & cover_b] == near).all()
        assert (p2f[cover_a & ~cover_b] == 0).all() and (p2f[cover_b & ~cover_a] == 1).all()
        overlap_depth = fragments.depth[0][cover_a & cover_b]
        torch.testing.assert_close(overlap_depth, torch.full_like(overlap_depth, min(depths)))
    assert torch.isinf(fragments.depth[0][~(cover_a | cover_b)]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quad_split_along_a_diagonal_through_centres_has_no_gap_and_no_double_cover(dtype):
    # corners and diagonal on pixel centres; top-left rule: the half-open pixel block [1, 11)²
    corners = [[1.5, 1.5], [11.5, 1.5], [11.5, 11.5], [1.5, 11.5]]
    upper = [corners[0], corners[1], corners[2]]
    lower = [corners[0], corners[2], corners[3]]
    reference = torch.zeros(14, 14, dtype=torch.bool)
    reference[1:11, 1:11] = True
    alone = []
    for tri in (upper, lower):
        verts, faces = screen_mesh(tri)
        alone.append(render.rasterize(verts.to(dtype), faces, 14).pix_to_face[0] >= 0)
    assert not (alone[0] & alone[1]).any()
    assert torch.equal(alone[0] | alone[1], reference)
    verts, faces = screen_mesh(upper, lower)
    assert torch.equal(render.rasterize(verts.to(dtype), faces, 14).pix_to_face[0] >= 0, reference)


def test_sloped_shared_edge_through_centres_is_covered_once():
    a, b = [2.1, 3.3], [12.9, 8.7]  # slope ½ through the centres (4.5, 4.5), (6.5, 5.5), ...
    left, right = [3.7, 12.2], [11.3, 1.1]
    tris = ([a, b, left], [a, right, b])
    H = W = 14
    alone = [render.rasterize(*screen_mesh(t), H).pix_to_face[0] >= 0 for t in tris]
    assert not (alone[0] & alone[1]).any()
    strict = [brute_coverage(torch.tensor(t), H, W)[0] for t in tris]
    reference = brute_coverage(torch.tensor(tris[0]), H, W, inclusive=True)[0] | \
        brute_coverage(torch.tensor(tris[1]), H, W, inclusive=True)[0]
    assert (reference & ~strict[0] & ~strict[1]).sum() == 6  # centres on the shared edge only
    assert torch.equal(alone[0] | alone[1], reference)
    on_edge = torch.tensor([[3, 2], [4, 4], [5, 6], [6, 8], [7, 10], [8, 12]])  # (row, col)
    assert (alone[0] | alone[1])[on_edge[:, 0], on_edge[:, 1]].all()


def test_fan_around_a_centre_vertex_covers_it_once():
    centre = [8.5, 8.5]
    ring = [[8.5 + 6 * math.cos(t), 8.5 + 6 * math.sin(t)] for t in
            torch.linspace(0, 2 * PI, 7)[:-1].tolist()]
    tris = [[centre, ring[k], ring[(k + 1) % 6]] for k in range(6)]
    counts = sum((render.rasterize(*screen_mesh(t), 17).pix_to_face[0] >= 0).long() for t in tris)
    assert counts.max() == 1 and counts[8, 8] == 1


def test_small_chunks_and_float32_give_the_same_fragments(monkeypatch):
    verts, faces = icosphere(2)
    world = torch.stack([verts, 0.7 * verts + 0.1])
    screen = render.project(world, torch.tensor([[0.8, 0.0, 0.0], [0.9, 0.1, -0.1]]).double(), 40)
    expected = render.rasterize(screen, faces, 40)
    monkeypatch.setattr(render, "CANDIDATE_BUDGET", 64)  # many chunks, one face per chunk at times
    chunked = render.rasterize(screen, faces, 40)
    assert torch.equal(chunked.pix_to_face, expected.pix_to_face)
    torch.testing.assert_close(chunked.bary, expected.bary)
    single = render.rasterize(screen.float(), faces, 40)
    assert (single.pix_to_face == expected.pix_to_face).float().mean() > 0.999


def test_closed_meshes_match_the_brute_force_reference():
    # the reference tests every face against every centre of its box, then keeps the nearest
    # (lowest index on equal depths); front and back of each ellipsoid overlap
    from reference_raster import reference_rasterize
    verts, faces = icosphere(3)
    world = verts * (0.5 + torch.rand(3, 1, 3, dtype=torch.float64)) + 0.2 * torch.randn(3, 1, 3)
    cam = torch.tensor([[0.9, 0.0, 0.0], [0.7, 0.1, -0.05], [1.1, -0.1, 0.1]])
    screen = render.project(world.float(), cam, 48)
    expected = reference_rasterize(screen, faces, 48)
    assert (expected >= 0).float().mean() > 0.3
    assert torch.equal(render.rasterize(screen, faces, 48).pix_to_face, expected)


def test_barycentrics_sum_to_one_and_reproduce_the_pixel_centre():
    verts, faces = screen_mesh([[1.2, 1.3], [14.1, 2.2], [3.4, 13.7]],
                               [[4.6, 3.9], [15.3, 9.8], [8.2, 15.1]], z=[1.0, 2.0])
    fragments = render.rasterize(verts, faces, 16)
    covered = fragments.pix_to_face[0] >= 0
    bary = fragments.bary[0][covered]  # (P, 3)
    torch.testing.assert_close(bary.sum(-1), torch.ones(len(bary), dtype=torch.float64))
    assert (bary > -1e-12).all()
    corners = verts[0, faces[fragments.pix_to_face[0][covered]], :2]  # (P, 3, 2)
    rows, cols = covered.nonzero().T
    centres = torch.stack([cols, rows], -1).double() + 0.5
    torch.testing.assert_close((bary[..., None] * corners).sum(1), centres)
    interpolated_xy = render.interpolate(verts[..., :2], faces, fragments)[0][covered]
    torch.testing.assert_close(interpolated_xy, centres)
    assert (fragments.bary[0][~covered] == 0).all()


def test_gradcheck_barycentrics_and_depth_wrt_vertices():
    verts, faces = screen_mesh([[0.7, 0.9], [7.2, 2.1], [2.3, 7.4]],
                               [[3.1, 1.8], [7.8, 6.7], [1.2, 6.6]], z=[0.3, 0.9])
    verts = verts + 0.1 * torch.rand_like(verts)  # generic positions and corner depths
    verts.requires_grad_(True)
    covered = render.rasterize(verts, faces, 8).pix_to_face >= 0

    def bary_and_depth(v):
        fragments = render.rasterize(v, faces, 8)
        assert torch.equal(fragments.pix_to_face >= 0, covered)  # coverage fixed under eps
        return fragments.bary, torch.where(covered, fragments.depth, 0.0)

    assert torch.autograd.gradcheck(bary_and_depth, (verts,), eps=1e-6, atol=1e-6)


def test_degenerate_triangles_cover_nothing_and_give_no_nan():
    verts, faces = screen_mesh([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]],  # collinear
                               [[3.5, 2.5], [3.5, 2.5], [8.0, 6.0]],  # repeated vertex
                               [[1.5, 1.5], [1.5, 1.5], [1.5, 1.5]],  # a point on a centre
                               [[2.0, 9.0], [math.nan, 9.0], [5.0, 14.0]],  # not finite
                               [[8.2, 8.1], [15.3, 9.2], [10.1, 15.4]])  # a good one
    verts = verts.requires_grad_(True)
    fragments = render.rasterize(verts, faces, 16)
    assert set(fragments.pix_to_face.unique().tolist()) == {-1, 4}
    assert fragments.bary.isfinite().all()
    (fragments.bary.sum() + fragments.depth[fragments.pix_to_face >= 0].sum()).backward()
    assert verts.grad[:, :9].isfinite().all() and (verts.grad[:, :9] == 0).all()


def test_backface_culling_keeps_faces_counter_clockwise_in_world():
    ccw = [[-0.9, -0.5, 0.0], [-0.1, -0.5, 0.0], [-0.5, 0.5, 0.0]]  # normal +z: toward viewer
    cw = [[0.1, -0.5, 0.0], [0.5, 0.5, 0.0], [0.9, -0.5, 0.0]]  # normal −z: seen from behind
    world = torch.tensor([ccw + cw])
    faces = torch.arange(6).view(2, 3)
    assert render.face_normals(world, faces)[0, :, 2].tolist() == pytest.approx([0.8, -0.8])
    screen = render.project(world, torch.tensor([[1.0, 0.0, 0.0]]), 32)
    both = render.rasterize(screen, faces, 32).pix_to_face
    culled = render.rasterize(screen, faces, 32, cull_backfaces=True).pix_to_face
    assert set(both.unique().tolist()) == {-1, 0, 1}
    assert set(culled.unique().tolist()) == {-1, 0}
    assert torch.equal(culled == 0, both == 0)


def test_interpolate_per_vertex_and_per_corner_agree():
    verts, faces = icosphere(1)
    world = torch.stack([verts, 0.8 * verts + 0.1])  # (2, V, 3)
    screen = render.project(world, torch.tensor([[0.8, 0, 0], [0.9, 0.05, 0]]).double(), 24)
    fragments = render.rasterize(screen, faces, 24)
    attrs = torch.randn(2, verts.shape[0], 4, dtype=torch.float64)
    per_vertex = render.interpolate(attrs, faces, fragments)
    torch.testing.assert_close(render.interpolate(attrs[:, faces], faces, fragments), per_vertex)
    one = render.interpolate(attrs[:1, faces][0], faces, fragments)  # (F, 3, C) for both items
    single = render.interpolate(attrs[:1], faces, render.Fragments(*(t[:1] for t in fragments)))
    torch.testing.assert_close(one[:1], single)
    assert (per_vertex[fragments.pix_to_face < 0] == 0).all()
    with pytest.raises(ValueError, match="attrs"):
        render.interpolate(torch.zeros(3, 5, 2), faces, fragments)


def test_vertex_normals_of_an_icosphere_point_radially_outward():
    verts, faces = icosphere(2)
    normals = render.vertex_normals(2.0 * verts[None] + 1.0, faces)[0]
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(len(verts), dtype=torch.float64))
    assert ((normals * verts).sum(-1) > 0.995).all()


def test_sample_texture_reads_known_texels_with_v_up():
    texture = torch.arange(16.0).view(1, 1, 4, 4)  # texel (row r, col c) = 4r + c; row 0 on top
    uv = torch.tensor([[[[2.5 / 4, 1 - 0.5 / 4], [1.5 / 4, 0.5 / 4], [2 / 4, 1 - 0.5 / 4]]]])
    values = render.sample_texture(texture, uv)[0, 0, 0]
    # (r 0, c 2) = 2; (r 3, c 1) = 13; halfway between (0, 1) and (0, 2) = 1.5
    torch.testing.assert_close(values, torch.tensor([2.0, 13.0, 1.5]))


def test_sh_constants_match_the_reference_numbers():
    c = [1 / math.sqrt(4 * PI), (2 * PI / 3) * math.sqrt(3 / (4 * PI)),
         (PI / 4) * 3 * math.sqrt(5 / (12 * PI)), (PI / 4) * 1.5 * math.sqrt(5 / (12 * PI)),
         (PI / 4) * 0.5 * math.sqrt(5 / (4 * PI))]
    assert c[0] == pytest.approx(0.2820948, abs=1e-7) and c[1] == pytest.approx(1.0233267, abs=1e-7)
    n = torch.tensor([0.36, -0.48, 0.8], dtype=torch.float64)
    x, y, z = n.tolist()
    expected = torch.tensor([c[0], c[1] * x, c[1] * y, c[1] * z, c[2] * x * y, c[2] * x * z,
                             c[2] * y * z, c[3] * (x * x - y * y), c[4] * (3 * z * z - 1)],
                            dtype=torch.float64)
    torch.testing.assert_close(render.sh_basis(n), expected)


def test_dc_light_gives_uniform_shading_c0_l0():
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 5, 6), dim=1)
    light = torch.zeros(2, 9, 3)
    light[:, 0] = torch.tensor([[0.5, 1.0, 2.0], [3.0, 0.1, 0.7]])
    shading = render.sh_shading(normals, light)
    expected = (light[:, 0] / math.sqrt(4 * PI))[:, :, None, None].expand(2, 3, 5, 6)
    torch.testing.assert_close(shading, expected)


def test_first_order_light_orders_shading_by_n_dot_d():
    direction = torch.nn.functional.normalize(torch.tensor([0.3, 0.5, 0.8]), dim=0)
    normals = torch.nn.functional.normalize(torch.randn(1, 3, 4, 8), dim=1)
    light = torch.zeros(1, 9, 3)
    light[0, 1:4] = direction[:, None]  # same direction in every channel
    shading = render.sh_shading(normals, light)[0, 0].flatten()
    cosine = (normals[0] * direction[:, None, None]).sum(0).flatten()
    torch.testing.assert_close(shading, (2 * PI / 3) * math.sqrt(3 / (4 * PI)) * cosine)
    assert torch.equal(shading.argsort(), cosine.argsort())


def dc_light(batch, level=1.0):
    light = torch.zeros(batch, 9, 3, dtype=torch.float64)
    light[:, 0] = level * math.sqrt(4 * PI)  # shading = level everywhere
    return light


def test_renderer_on_a_sphere_with_dc_light():
    verts, faces = icosphere(3)
    size, scale = 64, 0.7
    renderer = render.Renderer(faces, None, size)
    colour = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    out = renderer(verts[None], colour.expand(1, len(verts), 3), dc_light(1),
                   torch.tensor([[scale, 0.0, 0.0]], dtype=torch.float64))
    mask = out["mask"][0, 0]
    radius = scale * size / 2
    assert mask.sum().item() == pytest.approx(PI * radius ** 2, rel=0.03)
    assert (out["image"][0][:, mask == 0] == 0).all()
    inside = out["image"][0][:, mask == 1]
    torch.testing.assert_close(inside, colour[:, None].expand_as(inside))
    normals = out["normal_image"][0][:, mask == 1]
    torch.testing.assert_close(normals.norm(dim=0), torch.ones(normals.shape[1]).double())
    assert (normals[2] > -0.05).all()  # the visible half faces the viewer (+z)
    assert (out["normal_image"][0][:, mask == 0] == 0).all()
    assert out["screen_vertices"].shape == (1, len(verts), 3)


def test_renderer_texture_path_and_input_checks():
    verts, faces = icosphere(2)
    uv = torch.rand(len(faces), 3, 2, dtype=torch.float64)
    renderer = render.Renderer(faces, uv, 32)
    texture = torch.full((1, 3, 8, 8), 0.4, dtype=torch.float64)
    cam = torch.tensor([[0.8, 0.0, 0.0]], dtype=torch.float64)
    out = renderer(verts[None], texture, dc_light(1, 2.0), cam)
    mask = out["mask"][0, 0] == 1
    torch.testing.assert_close(out["albedo_image"][0][:, mask], torch.full((3, int(mask.sum())),
                                                                           0.4).double())
    torch.testing.assert_close(out["image"][0][:, mask], torch.full((3, int(mask.sum())),
                                                                    0.8).double())
    with pytest.raises(ValueError, match="face_uvs"):
        render.Renderer(faces, None, 32)(verts[None], texture, dc_light(1), cam)
    with pytest.raises(ValueError, match="light"):
        renderer(verts[None], texture, torch.zeros(1, 4, 3).double(), cam)
    with pytest.raises(ValueError, match="cam"):
        renderer(verts[None], texture, dc_light(1), torch.zeros(1, 2).double())
    with pytest.raises(ValueError, match="faces"):
        render.rasterize(verts[None], faces.float(), 8)
    with pytest.raises(ValueError, match="image_size"):
        render.rasterize(verts[None], faces, (8, 0))


def test_batch_items_render_as_if_alone():
    verts, faces = icosphere(2)
    world = torch.stack([verts, verts * torch.tensor([0.6, 1.1, 0.9]).double() + 0.2])
    colours = torch.rand(2, len(verts), 3, dtype=torch.float64)
    light = torch.randn(2, 9, 3, dtype=torch.float64)
    cam = torch.tensor([[0.8, 0.0, 0.1], [0.7, -0.1, 0.0]], dtype=torch.float64)
    renderer = render.Renderer(faces, None, 32)
    batched = renderer(world, colours, light, cam)
    for b in range(2):
        alone = renderer(world[b:b + 1], colours[b:b + 1], light[b:b + 1], cam[b:b + 1])
        for key in ("image", "mask", "normal_image", "shading"):
            torch.testing.assert_close(batched[key][b:b + 1], alone[key])
        assert torch.equal(batched["fragments"].pix_to_face[b:b + 1],
                           alone["fragments"].pix_to_face)
    assert not torch.equal(batched["mask"][0], batched["mask"][1])

"""Procedurally rendered multi-modal humans: the embedded default dataset.

Every item is a person built from 24 labelled ellipsoids (plus a neck, labelled head) on an articulated skeleton,
posed, seen by a randomly placed camera and ray cast per pixel, so RGB, depth, 2D/3D joints, part labels and
surface coordinates are exact and mutually consistent. Then the nuisances that make the tasks honest are added:
clothing spanning several parts with random colours and textures, Lambertian shading, cluttered backgrounds,
Kinect-like depth noise and holes, detector-like keypoint jitter and misses.

    python synthetic.py --out sheet.png          # a contact sheet: RGB + keypoints, depth, parts, iuv

Coordinates. Body frame: X = the person's left, Y = up, Z = the person's forward, floor at Y = 0.
Camera frame (joints3d): x right, y down, z forward, metres. Pixels: (x, y) = (column, row), pixel centres at
integers. The intrinsics are those of a person-centred crop of a Kinect-v2 depth frame (70.6 deg horizontal
field of view at 512 px): the crop follows the person's projected size, so fx, fy, cx, cy differ per item.

Only numpy, torch and the schema (schema.py: the skeleton and the part names) are imported, so the file can be
copied with schema.py alone.
"""
import argparse
import math
import os
import sys
from typing import NamedTuple

import numpy as np
import torch

from schema import IGNORE, JOINT_NAMES, PARENTS, PART_INDEX, PART_NAMES

POSES = ["standing", "walking", "sitting", "reaching", "arms_raised", "bending", "turning"]
KINECT_FX, KINECT_WIDTH = 365.0, 512  # Kinect v2 depth camera

# Which garment covers each part: shirt, trousers, skin, shoes, hair-on-skin (head). Sleeves and trouser legs
# are decided per person (short sleeves leave elbows/forearms as skin; shorts leave knees/calves as skin).
GARMENT = {"upper_spine": "shirt", "lower_spine": "shirt", "left_shoulder": "shirt", "right_shoulder": "shirt",
           "left_arm": "shirt", "right_arm": "shirt", "left_elbow": "sleeve", "right_elbow": "sleeve",
           "left_forearm": "sleeve", "right_forearm": "sleeve", "left_hand": "skin", "right_hand": "skin",
           "head": "head", "crotch": "trousers", "left_hip": "trousers", "right_hip": "trousers",
           "left_thigh": "trousers", "right_thigh": "trousers", "left_knee": "leg", "right_knee": "leg",
           "left_calf": "leg", "right_calf": "leg", "left_foot": "shoes", "right_foot": "shoes"}


# ------------------------------------------------------------------------------------------------ body and pose
class Primitive(NamedTuple):
    """A labelled ellipsoid: the points x with |diag(1 / radii) rotation^T (x - centre)| <= 1."""
    part: int  # index into PART_NAMES
    centre: np.ndarray  # [3] metres
    rotation: np.ndarray  # [3, 3] the ellipsoid's axes as columns, column 1 the long axis
    radii: np.ndarray  # [3] along those axes


def limb_dir(flex, abd, side):
    """Unit vector of a limb hanging down, swung forward by `flex` and outward (side = -1 right, +1 left) by `abd`."""
    return np.array([side * math.sin(abd), -math.cos(abd) * math.cos(flex), math.cos(abd) * math.sin(flex)])


def rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def sample_pose(rng, pose):
    """Joint angles (radians) of one of POSES, with person-to-person variation."""
    d = math.radians
    u = lambda lo, hi: d(rng.uniform(lo, hi))  # noqa: E731
    a = dict(hip_flex=[u(-8, 8), u(-8, 8)], knee=[u(0, 10), u(0, 10)], hip_abd=[u(0, 10), u(0, 10)],
             sh_flex=[u(-15, 15), u(-15, 15)], sh_abd=[u(5, 25), u(5, 25)], elbow=[u(0, 30), u(0, 30)],
             bend=u(-5, 8), lean=u(-5, 5), twist=u(-10, 10), head_yaw=u(-20, 20), head_pitch=u(-10, 15))
    i = rng.integers(2)  # which side leads
    if pose == "walking":
        s = u(15, 32)
        a["hip_flex"] = [s, -s] if i else [-s, s]
        a["knee"] = [u(5, 40), u(5, 40)]
        a["sh_flex"] = [-s * 1.2, s * 1.2] if i else [s * 1.2, -s * 1.2]
    elif pose == "sitting":
        a["hip_flex"] = [u(70, 100), u(70, 100)]
        a["knee"] = [u(70, 100), u(70, 100)]
        a["hip_abd"] = [u(5, 20), u(5, 20)]
        a["elbow"] = [u(30, 90), u(30, 90)]
    elif pose == "reaching":
        a["sh_flex"][i] = u(60, 120)
        a["sh_abd"][i] = u(0, 40)
        a["elbow"][i] = u(0, 20)
        a["twist"] = u(-25, 25)
    elif pose == "arms_raised":
        a["sh_flex"] = [u(130, 175), u(130, 175)]
        a["sh_abd"] = [u(0, 30), u(0, 30)]
        a["elbow"] = [u(0, 40), u(0, 40)]
    elif pose == "bending":
        a["bend"] = u(25, 75)
        a["sh_flex"] = [u(20, 90), u(20, 90)]
        a["knee"] = [u(0, 25), u(0, 25)]
    elif pose == "turning":
        a["twist"] = u(-45, 45)
        a["head_yaw"] = u(-60, 60)
        a["sh_abd"] = [u(10, 60), u(10, 60)]
    return a


def proportions(rng):
    """Height H, build (girth, 1 = average) and the bone lengths and half-widths of one person, in metres."""
    H = rng.uniform(1.5, 1.95)
    build = rng.uniform(0.85, 1.25)
    return dict(H=H, build=build, thigh=0.245 * H, calf=0.245 * H, spine=0.29 * H, neck=0.05 * H, head=0.12 * H,
                upper_arm=0.17 * H, forearm=0.145 * H, hip_w=0.055 * H * build, sh_w=0.11 * H * min(build, 1.1))


def skeleton(dims, a):
    """Joints [16, 3] (body frame, pelvis at the origin) of a person of proportions `dims` in the joint angles `a`
    of sample_pose, and the torso's rotation T [3, 3]. The legs hang from the hips; the upper body is built upright
    in a torso frame, then bent forward, leaned sideways and twisted about the pelvis by T."""
    H = dims["H"]
    pelvis = np.zeros(3)
    at = {"pelvis": pelvis}
    for side, (hip, knee, ankle), k in [(-1, ("r_hip", "r_knee", "r_ankle"), 0), (1, ("l_hip", "l_knee", "l_ankle"), 1)]:
        at[hip] = pelvis + [side * dims["hip_w"], -0.04 * H, 0]
        at[knee] = at[hip] + dims["thigh"] * limb_dir(a["hip_flex"][k], a["hip_abd"][k], side)
        at[ankle] = at[knee] + dims["calf"] * limb_dir(a["hip_flex"][k] - a["knee"][k], a["hip_abd"][k] * 0.5, side)

    T = rot_y(a["twist"]) @ rot_x(-a["bend"]) @ rot_z(a["lean"])
    up = {"thorax": np.array([0, dims["spine"], 0])}
    up["upper_neck"] = up["thorax"] + [0, dims["neck"], 0]
    Hd = rot_y(a["head_yaw"]) @ rot_x(-a["head_pitch"])
    up["head_top"] = up["upper_neck"] + Hd @ [0, dims["head"], 0]
    for side, (sh, el, wr), k in [(-1, ("r_shoulder", "r_elbow", "r_wrist"), 0),
                                   (1, ("l_shoulder", "l_elbow", "l_wrist"), 1)]:
        up[sh] = up["thorax"] + [side * dims["sh_w"], -0.01 * H, 0]
        up[el] = up[sh] + dims["upper_arm"] * limb_dir(a["sh_flex"][k], a["sh_abd"][k], side)
        up[wr] = up[el] + dims["forearm"] * limb_dir(a["sh_flex"][k] + a["elbow"][k], a["sh_abd"][k], side)
    at.update({name: pelvis + T @ p for name, p in up.items()})
    return np.stack([at[name] for name in JOINT_NAMES]), T


def body(joints, T, dims):
    """The primitives on a skeleton, in a fixed order: per side (right, left) thigh, calf, hip, knee, foot, upper
    arm, forearm, shoulder, elbow, hand; then the spine's two halves, crotch, neck (labelled head) and head."""
    H, build, spine = dims["H"], dims["build"], dims["spine"]
    r = 0.01 * H * build  # radius unit
    at = dict(zip(JOINT_NAMES, joints))

    def ellipsoid(part, centre, axis, radii):
        # column 2 faces the torso's forward, so flattened parts (torso, hands, feet) lie flat to the body
        return Primitive(PART_INDEX[part], np.array(centre, float), frame(np.asarray(axis, float), T[:, 2]),
                         np.array(radii, float))

    def along(p0, p1):
        """Centre and unit direction of the segment p0 -> p1."""
        axis = p1 - p0
        return (p0 + p1) / 2, axis / np.linalg.norm(axis)

    def bone(part, p0, p1, radius, extend):
        """Round across, reaching `extend` radii past p0 and p1."""
        return ellipsoid(part, *along(p0, p1), [radius, np.linalg.norm(p1 - p0) / 2 + extend * radius, radius])

    def ball(part, centre, radius):
        return ellipsoid(part, centre, (0, 1, 0), [radius, radius, radius])

    prims = []
    foot_dir = np.array([0.0, -0.25, 1.0]) / math.hypot(0.25, 1.0)
    for s, side in (("r", "right"), ("l", "left")):
        hip, knee, ankle = at[f"{s}_hip"], at[f"{s}_knee"], at[f"{s}_ankle"]
        sh, el, wr = at[f"{s}_shoulder"], at[f"{s}_elbow"], at[f"{s}_wrist"]
        hand_dir = (wr - el) / np.linalg.norm(wr - el)
        prims += [bone(f"{side}_thigh", hip, knee, 6.5 * r, 0.1),
                  bone(f"{side}_calf", knee, ankle, 4.8 * r, 0.1),
                  ball(f"{side}_hip", hip, 8.2 * r),
                  ball(f"{side}_knee", knee, 5.8 * r),
                  ellipsoid(f"{side}_foot", ankle + 0.05 * H * foot_dir + [0, -0.015 * H, 0], foot_dir,
                            [0.045 * H, 0.045 * H, 0.045 * H * (0.45 * build)]),
                  bone(f"{side}_arm", sh, el, 4.4 * r, 0.1),
                  bone(f"{side}_forearm", el, wr, 3.6 * r, 0.1),
                  ball(f"{side}_shoulder", sh, 5.6 * r),
                  ball(f"{side}_elbow", el, 4.3 * r),
                  ellipsoid(f"{side}_hand", wr + 0.045 * H * hand_dir, hand_dir, [0.025 * H, 0.05 * H, 0.012 * H])]
    pelvis, thorax, neck, head_top = at["pelvis"], at["thorax"], at["upper_neck"], at["head_top"]
    mid = pelvis + T @ [0, 0.45 * spine, 0]
    crotch = 0.7 * dims["hip_w"] + 3 * r
    head_c = (neck + head_top) / 2
    head = 0.052 * H
    prims += [ellipsoid("lower_spine", *along(pelvis + T @ [0, 0.05 * spine, 0], mid),
                        [dims["hip_w"] + 6 * r, 0.26 * spine, 8.5 * r]),
              ellipsoid("upper_spine", *along(mid, thorax), [dims["sh_w"] * 0.95, 0.33 * spine, 9.5 * r]),
              ellipsoid("crotch", pelvis + [0, -0.06 * H, 0], (0, 1, 0), [crotch, crotch, crotch * 0.9]),
              bone("head", thorax, neck, 3.8 * r, 0.6),  # the neck, labelled head
              ellipsoid("head", head_c + 0.01 * H * (head_c - neck) / np.linalg.norm(head_c - neck), head_top - neck,
                        [head, head * 1.3, head * 1.05])]
    return prims


def build_body(rng, pose):
    """A person of random proportions in a random variant of `pose`, standing on the floor: joints [16, 3] (body
    frame, metres) and its primitives."""
    dims = proportions(rng)
    joints, T = skeleton(dims, sample_pose(rng, pose))
    prims = body(joints, T, dims)
    # stand on the floor: the lowest foot touches Y = 0
    feet = (PART_INDEX["left_foot"], PART_INDEX["right_foot"])
    lowest = min(p.centre[1] - p.radii[1] * 0.6 for p in prims if p.part in feet)
    shift = np.array([0, -lowest, 0])
    return joints + shift, [p._replace(centre=p.centre + shift) for p in prims]


def frame(axis, forward):
    """Rotation whose column 1 is `axis` and column 2 is as close to `forward` as possible."""
    y = axis / np.linalg.norm(axis)
    z = forward - y * (forward @ y)
    if np.linalg.norm(z) < 1e-6:
        z = np.cross(y, [1.0, 0, 0]) if abs(y[0]) < 0.9 else np.cross(y, [0, 0, 1.0])
    z /= np.linalg.norm(z)
    return np.stack([np.cross(y, z), y, z], axis=1)


# ------------------------------------------------------------------------------------------------------ rendering
def camera(rng, joints, image_size, yaw=None):
    """A camera 2–4.5 m away at a random height and yaw around the person, looking at the person's centre, with
    the intrinsics of a person-centred crop. Returns origin [3], R [3,3] (rows: right, down, forward), K [3,3]."""
    yaw = rng.uniform(-150, 150) if yaw is None else yaw
    dist, height = rng.uniform(2.0, 4.5), rng.uniform(0.7, 1.9)
    target = joints.mean(0) + [0, 0.05, 0]
    y = math.radians(yaw)
    origin = target + dist * np.array([math.sin(y), 0, math.cos(y)])
    origin[1] = height
    f = target - origin
    f /= np.linalg.norm(f)
    right = np.cross(f, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    R = np.stack([right, np.cross(f, right), f])
    # project with unit focal length, then choose the crop that fits the person
    cam = (joints - origin) @ R.T
    xy = cam[:, :2] / cam[:, 2:]
    margin = 0.16 / cam[:, 2].min()  # limb radii and the head above head-top
    lo, hi = xy.min(0) - margin, xy.max(0) + margin
    fill = rng.uniform(0.72, 0.92)
    focal = fill * image_size / (hi - lo).max()
    centre = (lo + hi) / 2 + rng.uniform(-0.04, 0.04, 2) * (hi - lo).max()
    c = (image_size - 1) / 2 - focal * centre
    K = np.array([[focal, 0, c[0]], [0, focal, c[1]], [0, 0, 1.0]])
    return origin, R, K


def pixel_rays(R, K, image_size):
    """World direction of the ray through every pixel centre, row by row, scaled to a unit forward component so
    that a hit's ray parameter t is its depth along the optical axis: [N, 3], N = image_size^2."""
    s = image_size
    v, u = np.mgrid[0:s, 0:s]
    rays = np.stack([(u.ravel() - K[0, 2]) / K[0, 0], (v.ravel() - K[1, 2]) / K[1, 1], np.ones(s * s)], 1)
    return rays @ R


def unit_sphere_maps(prims):
    """A_q = diag(1 / radii) R_q^T of every primitive, [Q, 3, 3]: maps an offset from its centre onto its unit
    sphere, |A_q (x - c_q)| = 1 on the surface."""
    return np.stack([(p.rotation / p.radii).T for p in prims])


def ray_cast(prims, origin, dirs):
    """Nearest hit of every ray with the ellipsoids |A_q (o + t d - c_q)| = 1, A_q = diag(1/radii) R_q^T:
        a t^2 + 2 b t + c = 0,  a = d^T G_q d,  b = (A_q^T o'_q) . d,  c = |o'_q|^2 - 1,  G_q = A_q^T A_q,
    with o'_q = A_q (o - c_q); a and b for all rays and ellipsoids are two matrix products.
    dirs [N, 3] -> t [N] (inf = miss), primitive index [N], local hit coordinates on the unit sphere [N, 3]."""
    centres = np.stack([p.centre for p in prims])  # [Q, 3]
    A = unit_sphere_maps(prims)  # [Q, 3, 3]
    o = np.einsum("qij,qj->qi", A, origin - centres)  # [Q, 3]
    G = np.einsum("qki,qkj->qij", A, A)  # [Q, 3, 3]
    iu = ([0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2])
    G6 = G[:, iu[0], iu[1]] * [1, 1, 1, 2, 2, 2]  # [Q, 6]
    dd = dirs[:, iu[0]] * dirs[:, iu[1]]  # [N, 6]
    a = (G6 @ dd.T).astype(np.float32)  # [Q, N]; float32 halves the memory traffic of what follows
    b = (np.einsum("qki,qk->qi", A, o) @ dirs.T).astype(np.float32)  # [Q, N]
    c = ((o * o).sum(-1)[:, None] - 1.0).astype(np.float32)
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    t = np.where((disc > 0) & (t > 0), t, np.inf)
    q = t.argmin(0)  # [N]
    t_hit = t[q, np.arange(len(dirs))].astype(np.float64)
    local = o[q] + np.where(np.isfinite(t_hit), t_hit, 0)[:, None] * np.einsum("nij,nj->ni", A[q], dirs)
    return t_hit, q, local


def cast_person(prims, origin, R, K, dirs, image_size):
    """The person seen along the rays of pixel_rays: t [N] (optical-axis depth, inf = not the person), part label
    [N] (0 off the person), surface coordinates uv [N, 2] in [0, 1], the hit on its ellipsoid's unit sphere local
    [N, 3] and the unit surface normal [N, 3]."""
    s = image_size
    v, u = np.divmod(np.arange(s * s), s)  # the pixel of each ray
    # only rays inside the person's projected bounding box can hit it
    cam = (np.stack([p.centre for p in prims]) - origin) @ R.T  # [Q, 3] centres in the camera frame
    reach = np.array([p.radii.max() for p in prims]) / cam[:, 2] * K[0, 0]  # [Q] projected bounding radius
    centre_px = cam[:, :2] / cam[:, 2:] * K[0, 0] + K[:2, 2]
    lo, hi = (centre_px - reach[:, None]).min(0), (centre_px + reach[:, None]).max(0)
    box = np.flatnonzero((u >= lo[0]) & (u <= hi[0]) & (v >= lo[1]) & (v <= hi[1]))
    t = np.full(s * s, np.inf)
    q = np.zeros(s * s, dtype=int)
    local = np.zeros((s * s, 3))
    t[box], q[box], local[box] = ray_cast(prims, origin, dirs[box])
    person = np.isfinite(t)
    parts = np.where(person, np.array([p.part for p in prims])[q], 0)
    uv = np.stack([np.arctan2(local[:, 0], local[:, 2]) / (2 * math.pi) + 0.5, (local[:, 1] + 1) / 2], 1)
    uv = np.where(person[:, None], np.clip(uv, 0, 1), 0.0)
    # normal: gradient of |A(x - c)|^2, i.e. A^T A (x - c), expressed back in the world
    normal = np.einsum("nji,nj->ni", unit_sphere_maps(prims)[q], local)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    return t, parts, uv, local, normal


def background_indoor(rng, origin, R, dirs):
    """Floor (Y = 0) and a back wall behind the person, a few boxes, seen along the unit directions dirs [N, 3]:
    depth along the optical axis [N] (0 = nothing), colours [N, 3] and normals [N, 3]."""
    n = len(dirs)
    t = np.full(n, np.inf)
    colour = np.zeros((n, 3))
    normal = np.zeros((n, 3))
    wall_yaw = math.atan2(R[2, 0], R[2, 2]) + rng.uniform(-0.5, 0.5)
    wall_n = -np.array([math.sin(wall_yaw), 0, math.cos(wall_yaw)])  # facing the camera
    wall_d = rng.uniform(2.0, 4.0) + 4.0
    planes = [(np.array([0, 1.0, 0]), 0.0, "floor"), (wall_n, -(wall_n @ origin) + wall_d, "wall")]
    base = {"floor": rng.uniform(0.2, 0.8, 3), "wall": rng.uniform(0.3, 0.95, 3)}
    for nrm, off, name in planes:
        denom = dirs @ nrm
        with np.errstate(divide="ignore", invalid="ignore"):
            tp = -(origin @ nrm + off) / denom
        hit = (tp > 0) & (tp < t)
        t = np.where(hit, tp, t)
        p = origin + tp[:, None] * dirs
        if name == "floor":
            tile = rng.uniform(0.3, 0.8)
            pattern = ((np.floor(p[:, 0] / tile) + np.floor(p[:, 2] / tile)) % 2) * rng.uniform(0.05, 0.3)
        else:
            pattern = 0.08 * np.sin(p @ np.cross(nrm, [0, 1.0, 0]) * rng.uniform(2, 12))
        colour[hit] = np.clip(base[name] * (1 - pattern[hit, None]), 0, 1)
        normal[hit] = nrm
    for _ in range(rng.integers(0, 4)):  # furniture: axis-aligned boxes beside the person
        size = rng.uniform([0.3, 0.3, 0.3], [1.2, 1.6, 1.0])
        side = rng.choice([-1, 1])
        centre = origin + R[2] * rng.uniform(3.5, 6.0) + R[0] * side * rng.uniform(0.9, 2.0)
        lo = np.array([centre[0] - size[0] / 2, 0, centre[2] - size[2] / 2])
        hi = lo + size
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (lo - origin) / dirs, (hi - origin) / dirs
        tn, tf = np.minimum(t0, t1).max(1), np.maximum(t0, t1).min(1)
        hit = (tn <= tf) & (tn > 0) & (tn < t)
        t = np.where(hit, tn, t)
        colour[hit] = rng.uniform(0.1, 0.9, 3)
        face = np.argmax(np.minimum(t0, t1)[hit], axis=1)
        nb = np.zeros((hit.sum(), 3))
        nb[np.arange(len(nb)), face] = -np.sign(dirs[hit][np.arange(len(nb)), face])
        normal[hit] = nb
    z = t * (dirs @ R[2])
    return np.where(np.isfinite(z), z, 0.0), colour, normal


def background_wild(rng, image_size):
    """A 2D cluttered scene: a blurred gradient, noise texture and random rectangles and blobs; it has no depth (0)
    and no normals (it is left unshaded). Depth [N], colours [N, 3] and normals [N, 3], as background_indoor."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    img = rng.uniform(0, 1, 3) * (1 - yy[..., None]) + rng.uniform(0, 1, 3) * yy[..., None]
    coarse = rng.uniform(-0.25, 0.25, (8, 8, 3))
    img += np.kron(coarse, np.ones((s // 8 + 1, s // 8 + 1, 1)))[:s, :s]
    for _ in range(rng.integers(4, 12)):
        x0, y0 = rng.uniform(-0.2, 1, 2)
        w, h = rng.uniform(0.05, 0.5, 2)
        col = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            m = (xx > x0) & (xx < x0 + w) & (yy > y0) & (yy < y0 + h)
        else:
            m = ((xx - x0) / w) ** 2 + ((yy - y0) / h) ** 2 < 1
        img[m] = col * rng.uniform(0.7, 1.0)
    return np.zeros(s * s), np.clip(img, 0, 1).reshape(-1, 3), np.zeros((s * s, 3))


def garment_colours(rng):
    """Per-person colours of shirt, trousers, skin, hair and shoes, and which parts are skin."""
    skin = np.array([0.95, 0.78, 0.65]) * rng.uniform(0.35, 1.0) + rng.uniform(-0.03, 0.03, 3)
    shirt, trousers = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.8, 3)
    if rng.random() < 0.3:  # similar colours on top and bottom happen
        trousers = np.clip(shirt + rng.uniform(-0.1, 0.1, 3), 0, 1)
    return dict(shirt=shirt, trousers=trousers, skin=skin, hair=rng.uniform(0.02, 0.5) * np.array([1, 0.8, 0.6]),
                shoes=rng.uniform(0.0, 0.6, 3), long_sleeves=rng.random() < 0.5, shorts=rng.random() < 0.25,
                shirt_pattern=rng.integers(3), trousers_pattern=rng.integers(2), freq=rng.uniform(4, 14))


def albedo(parts, uv, local, g):
    """Per-pixel colour of the person from the garment covering each part and a procedural texture."""
    table = np.zeros((25, 3))
    tex = np.zeros(25, dtype=int)  # 0 plain, 1 stripes, 2 checks
    for name, garment in GARMENT.items():
        if garment == "sleeve":
            garment = "shirt" if g["long_sleeves"] else "skin"
        if garment == "leg":
            garment = "skin" if g["shorts"] else "trousers"
        p = PART_INDEX[name]
        table[p] = g[garment] if garment in g else g["skin"]
        tex[p] = g["shirt_pattern"] if garment == "shirt" else g["trousers_pattern"] if garment == "trousers" else 0
    col = table[parts]
    stripes = 0.5 + 0.5 * np.sign(np.sin(uv[:, 1] * g["freq"] * 2 * math.pi))
    checks = 0.5 + 0.5 * np.sign(np.sin(uv[:, 1] * g["freq"] * 6) * np.sin(uv[:, 0] * 24))
    pattern = np.select([tex[parts] == 1, tex[parts] == 2], [stripes, checks], 1.0)
    col = col * (0.65 + 0.35 * pattern[:, None])
    head = parts == PART_INDEX["head"]
    hair = head & (local[:, 1] > 0.25) | head & (local[:, 2] < -0.3) & (local[:, 1] > -0.3)
    col[hair] = g["hair"]
    return col


def lighting(rng):
    """A directional light from above (unit vector [3]) and the ambient share of the shading."""
    light = np.array([rng.uniform(-1, 1), rng.uniform(0.3, 1.5), rng.uniform(-1, 1)])
    return light / np.linalg.norm(light), rng.uniform(0.3, 0.55)


def lambert(normal, light, ambient):
    """Lambertian shading of unit normals [N, 3]: ambient + (1 - ambient) max(0, n . light), [N]."""
    return ambient + (1 - ambient) * np.clip(normal @ light, 0, 1)


def render(params, image_size):
    """Ray cast a person (and an indoor room) without sensor noise: the body and the camera, the pixels' rays, the
    person they hit, the background, then both shaded by one light and composited.

    params: dict from `sample_params`. Returns a dict of numpy arrays: rgb [H,W,3] in [0,1], depth [H,W] metres
    (0 = nothing), parts [H,W], uv [H,W,2], normal_dot [H,W] (cos of the angle between surface and view ray),
    keypoints [16,2] exact pixel positions, joints3d [16,3] camera frame, K [3,3]."""
    rng = np.random.default_rng(params["seed"])
    joints, prims = build_body(rng, params["pose"])
    origin, R, K = camera(rng, joints, image_size, params.get("yaw"))
    dirs = pixel_rays(R, K, image_size)  # [N, 3]
    view = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)  # [N, 3] unit
    t, parts, uv, local, normal = cast_person(prims, origin, R, K, dirs, image_size)
    if params["domain"] == "indoor":
        bg_depth, bg_colour, bg_normal = background_indoor(rng, origin, R, view)
    else:
        bg_depth, bg_colour, bg_normal = background_wild(rng, image_size)

    colour = albedo(parts, uv, local, garment_colours(rng))
    light, ambient = lighting(rng)
    bg_shade = np.where(np.abs(bg_normal).sum(1) > 0, lambert(bg_normal, light, ambient), 1.0)  # no normal: unlit
    person = np.isfinite(t)
    rgb = np.where(person[:, None], colour * lambert(normal, light, ambient)[:, None], bg_colour * bg_shade[:, None])
    depth = np.where(person, t, bg_depth)
    normal_dot = np.abs((np.where(person[:, None], normal, bg_normal) * view).sum(1))

    cam_joints = (joints - origin) @ R.T
    keypoints = cam_joints[:, :2] / cam_joints[:, 2:] * [K[0, 0], K[1, 1]] + K[:2, 2]
    s = image_size
    return dict(rgb=rgb.reshape(s, s, 3), depth=depth.reshape(s, s), parts=parts.reshape(s, s),
                uv=uv.reshape(s, s, 2), normal_dot=normal_dot.reshape(s, s), keypoints=keypoints,
                joints3d=cam_joints, K=K)


def sample_params(seed, index, domain):
    """The scene of item `index`: pose class, the per-item random seed, domain."""
    rng = np.random.default_rng([seed, index])
    return dict(seed=[seed, index, 1], pose=POSES[rng.integers(len(POSES))], domain=domain)


# ------------------------------------------------------------------------------------------------ sensor models
def kinect_depth(rng, depth, normal_dot):
    """Kinect-like depth: noise sigma(z) = 1.2 mm + 1.9 mm (z - 0.4)^2 (Nguyen et al., 2012), no return at
    grazing angles, at half the pixels on depth discontinuities (silhouettes) and at 0.5 % of random pixels."""
    z = depth + rng.standard_normal(depth.shape) * (0.0012 + 0.0019 * (depth - 0.4) ** 2)
    pad = np.pad(depth, 1, mode="edge")
    jump = np.max(np.abs(np.stack([pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]) - depth), axis=0)
    hole = (normal_dot < 0.15) | ((jump > 0.1) & (rng.random(depth.shape) < 0.5)) | (rng.random(depth.shape) < 0.005)
    return np.where(hole | (depth <= 0), 0.0, z)


def camera_rgb(rng, rgb):
    """Sensor noise and a random exposure."""
    out = rgb * rng.uniform(0.8, 1.2) + rng.standard_normal(rgb.shape) * 0.02
    return np.clip(out, 0, 1)


def detector_keypoints(rng, keypoints, image_size):
    """Like an off-the-shelf 2D detector: jitter of about 1 % of the image, 4 % misses. Self-occluded joints stay
    visible, as MPII annotates them; every keypoint is clamped into the frame."""
    kp = keypoints + rng.standard_normal(keypoints.shape) * 0.01 * image_size
    kp = np.clip(kp, 0, image_size - 1)
    visible = rng.random(len(kp)) >= 0.04
    return kp, visible


# -------------------------------------------------------------------------------------------------------- dataset
MIN_SIZE = 32  # pixels: below, a limb is narrower than a pixel


class SyntheticHumans(torch.utils.data.Dataset):
    """Procedural multi-modal humans. Item i is a deterministic function of (seed, i), rendered on the fly.

    domain='indoor': a room with floor, wall and furniture at depth (like NTU RGB+D). domain='wild': 2D cluttered
    backgrounds; with with_depth=False the item has no 'depth' key and present['depth'] is False (like MPII).
    Items follow the sample dict of docs/conventions.md (rgb in [0, 1]) plus mask and intrinsics."""

    def __init__(self, num_samples, image_size=128, seed=0, domain="indoor", with_depth=True):
        if domain not in ("indoor", "wild"):
            raise ValueError(f"domain must be 'indoor' or 'wild', got {domain!r}")
        if image_size < MIN_SIZE:
            raise ValueError(f"image_size must be at least {MIN_SIZE}, got {image_size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.domain, self.with_depth = domain, with_depth

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for SyntheticHumans of {self.num_samples} samples")
        s = self.image_size
        params = sample_params(self.seed, i, self.domain)
        r = render(params, s)
        rng = np.random.default_rng([self.seed, i, 2])
        keypoints, visible = detector_keypoints(rng, r["keypoints"], s)
        parts = torch.from_numpy(r["parts"].astype(np.int64))
        iuv = np.concatenate([r["parts"][None].astype(np.float32), r["uv"].transpose(2, 0, 1)])
        sample = dict(
            rgb=torch.from_numpy(camera_rgb(rng, r["rgb"]).transpose(2, 0, 1).astype(np.float32)),
            keypoints=torch.from_numpy(keypoints.astype(np.float32)),
            keypoints_visible=torch.from_numpy(visible),
            parts=parts, mask=parts > 0,
            joints3d=torch.from_numpy(r["joints3d"].astype(np.float32)),
            iuv=torch.from_numpy(iuv.astype(np.float32)),
            intrinsics=torch.from_numpy(r["K"].astype(np.float32)),
            present={"rgb": True, "depth": self.with_depth, "keypoints": True},
            index=i)
        if self.with_depth:
            sample["depth"] = torch.from_numpy(kinect_depth(rng, r["depth"], r["normal_dot"]).astype(np.float32))[None]
        return sample


# ------------------------------------------------------------------------------------------------- contact sheet
PART_COLOURS = np.concatenate([[[0, 0, 0]], np.random.default_rng(3).uniform(0.15, 1, (24, 3))])


def parts_image(parts):
    """Part labels [H, W] (tensor) -> colours [H, W, 3]; the IGNORE label (outside the image after a transform,
    ignored by the losses) in white."""
    p = parts.numpy()
    return np.where((p == IGNORE)[..., None], 1.0, PART_COLOURS[p.clip(0, 24)])


def draw_skeleton(ax, keypoints, visible):
    """Keypoints [16, 2] and their bones (PARENTS) on a matplotlib axis, where both ends are visible [16]: left limbs
    green, the rest red."""
    kp, vis = keypoints.numpy(), visible.numpy()
    for j, parent in enumerate(PARENTS):
        if parent >= 0 and vis[j] and vis[parent]:
            ax.plot(*kp[[j, parent]].T, color="lime" if JOINT_NAMES[j].startswith("l_") else "red", lw=1.5)
    ax.scatter(*kp[vis].T, s=10, c="yellow", zorder=3)


def contact_sheet(dataset, n, path):
    """Rows of the first n samples: RGB with keypoints and skeleton, depth ('no depth' where a sample has none),
    parts, iuv (part colour shaded by u, v); below, the depth colour bar in metres (one scale for the sheet) and
    the legend of the part colours. Drawn on a standalone Figure (no pyplot), so a notebook's backend and open
    figures are left alone. Returns the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    samples = [dataset[i] for i in range(n)]
    measured = [s["depth"][s["depth"] > 0] for s in samples if "depth" in s]
    lo, hi = (torch.cat(measured).min().item(), torch.cat(measured).max().item()) if measured else (0.0, 1.0)
    fig = Figure(figsize=(8, 2 * n + 2), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 4))
    depth_image = None
    for s, ax in zip(samples, axes):
        ax[0].imshow(s["rgb"].permute(1, 2, 0).numpy())
        draw_skeleton(ax[0], s["keypoints"], s["keypoints_visible"])
        if "depth" in s:
            depth_image = ax[1].imshow(np.ma.masked_equal(s["depth"][0].numpy(), 0), cmap="turbo", vmin=lo, vmax=hi)
        else:
            ax[1].text(0.5, 0.5, "no depth", ha="center", va="center", transform=ax[1].transAxes, color="grey")
        ax[2].imshow(parts_image(s["parts"]))
        iuv = s["iuv"].numpy()
        ax[3].imshow(PART_COLOURS[iuv[0].astype(int)] * (0.4 + 0.6 * np.stack([iuv[1], iuv[2], iuv[1]], -1)))
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    for a, title in zip(axes[0], ["RGB + keypoints", "depth", "parts", "iuv (part shaded by u, v)"]):
        a.set_title(title, fontsize=9)
    if depth_image is not None:
        bar = fig.colorbar(depth_image, ax=axes[:, 1], location="bottom", fraction=0.5 / n, aspect=15)
        bar.set_label("depth (m); white: no measurement", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    parts = [Patch(facecolor=PART_COLOURS[i], label=name.replace("_", " ")) for i, name in enumerate(PART_NAMES)]
    fig.legend(handles=parts, loc="outside lower center", ncol=5, fontsize=7, title="part colours", title_fontsize=8)
    fig.savefig(path, dpi=80)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(prog="synthetic.py", description="Write a contact sheet of synthetic multi-modal "
                                     "humans.")
    parser.add_argument("--out", default="synthetic_sheet.png",
                        help="the image; its type from its suffix (png, pdf, svg, jpg, ...), its folder made (default: "
                             "%(default)s)")
    parser.add_argument("--n", type=int, default=6,
                        help="people, one row each (--domain both: the last third wild) (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128,
                        help=f"image side in pixels, at least {MIN_SIZE} (default: %(default)s)")
    parser.add_argument("--domain", default="both", choices=["both", "indoor", "wild"],
                        help="indoor: a room, with depth; wild: cluttered 2D backgrounds, without depth; both: as "
                             "pre-training mixes them (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="of the people drawn (default: %(default)s)")
    args = parser.parse_args(argv)
    from matplotlib.backend_bases import FigureCanvasBase
    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(args.out)[1][1:].lower()
    if args.n < 1:
        parser.error(f"--n must be positive, got {args.n}")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE}, got {args.size}")
    if suffix not in kinds:
        what = f".{suffix} is not an image type matplotlib writes" if suffix else "no suffix to tell the image type"
        parser.error(f"--out {args.out}: {what} ({', '.join(sorted(kinds))})")
    folder = os.path.dirname(os.path.abspath(args.out))
    try:  # the folder made and written now, not after the rendering
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot make or write {folder} ({e.strerror or e})")
    counts = {"indoor": args.n - args.n // 3, "wild": args.n // 3} if args.domain == "both" else {args.domain: args.n}
    people = []
    for domain, k in counts.items():
        if k:  # the wild people from seed + 1, as in the pre-training set
            part = SyntheticHumans(k, args.size, args.seed + (domain == "wild"), domain, with_depth=domain == "indoor")
            people += [part[i] for i in range(k)]
    contact_sheet(people, len(people), args.out)
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main(sys.argv[1:])

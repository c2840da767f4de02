"""The data schema every module shares (docs/conventions.md): the modalities, the MPII-16 skeleton, the 24 body parts
and the label that marks a pixel to ignore. Plain lists and numbers, so the model, the readers and the renderer
agree without importing each other, and a module copied into another project takes this file along.
"""

MODALITIES = ("rgb", "depth", "keypoints")

# MPII-16 joint order. PARENTS[j] is the joint that j hangs from in the skeleton (-1 for the root, the pelvis): its
# bones are the edges of the keypoint encoder's graph and the lines drawn. FLIP_JOINTS[j] is the joint that j
# becomes in a mirrored image.
JOINT_NAMES = ["r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
               "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist"]
PARENTS = [1, 2, 6, 6, 3, 4, -1, 6, 7, 8, 11, 12, 7, 7, 13, 14]
FLIP_JOINTS = [5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 15, 14, 13, 12, 11, 10]
JOINT_INDEX = {name: i for i, name in enumerate(JOINT_NAMES)}
NUM_JOINTS = len(JOINT_NAMES)

# 0 background + the 24 parts in the paper's table order. FLIP_PARTS[p] is the label p becomes when mirrored.
PART_NAMES = ["background", "right_hip", "right_knee", "right_foot", "left_hip", "left_knee", "left_foot",
              "left_shoulder", "left_elbow", "left_hand", "right_shoulder", "right_elbow", "right_hand", "crotch",
              "right_thigh", "right_calf", "left_thigh", "left_calf", "lower_spine", "upper_spine", "head",
              "left_arm", "left_forearm", "right_arm", "right_forearm"]
FLIP_PARTS = [0, 4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9, 13, 16, 17, 14, 15, 18, 19, 20, 23, 24, 21, 22]
PART_INDEX = {name: i for i, name in enumerate(PART_NAMES)}
NUM_CLASSES = len(PART_NAMES)  # the parsing classes: background + 24 parts
IGNORE = 255  # a part label to leave out of losses and metrics (pixels a transform brought in from outside the image)

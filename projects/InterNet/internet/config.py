"""``add_internet_config``: the ``MODEL.INTERNET`` node (Feature Intertwiner, Li et al., ICLR 2019)."""
from d2_refine.config import node_class
from d2_refine.config.renamed import register_renamed_keys

#: old key -> new key (see d2_refine/config/renamed.py): merging an old one raises one line naming the new one
RENAMED_KEYS = {
    "MODEL.INTERNET.WARMUP_FRACTION": ("MODEL.INTERNET.WARMUP_ITERS",
                                       "the warm-up is in iterations now, not a fraction of the first epoch"),
}


def add_internet_config(cfg):
    """Add ``MODEL.INTERNET`` (defaults of the released "meta_105" setting) to ``cfg`` in place; no-op if present."""
    if "INTERNET" in cfg.MODEL:
        return cfg
    node = node_class(cfg)
    _C = cfg.MODEL
    _C.INTERNET = node()
    # Off: InterNetROIHeads behaves as StandardROIHeads with InterNet's level assignment (no make-up, no loss).
    _C.INTERNET.ENABLED = True
    # Level of each RoI: "fpn" (k = round(4 + log2(sqrt(wh)/224)), clamped to the pyramid) or "roi_size"
    # (finest level whose FEAT_POOL_SIZE x FEAT_POOL_SIZE cells cover the box: sqrt(wh) <= FEAT_POOL_SIZE*stride).
    _C.INTERNET.ASSIGNMENT = "fpn"
    # Make-up layer applied to every FPN map the box/mask heads pool from (training and inference).
    _C.INTERNET.MAKEUP = node()
    # Number of conv (+norm+ReLU) blocks; the first one upsamples when UPSAMPLE_FACTOR is 2.
    _C.INTERNET.MAKEUP.NUM_CONV = 1
    # 1: conv 3x3 stride 1 (released); 2: transposed conv k3 s2 doubling the resolution.
    _C.INTERNET.MAKEUP.UPSAMPLE_FACTOR = 1
    # Norm after each conv: "Affine" (the original's effective BN: frozen 0/1 statistics, trainable scale/shift),
    # "BN" (batch statistics), "" (none), or any detectron2 get_norm name ("GN", "SyncBN", "FrozenBN", ...); see
    # d2_refine/layers/norm.py.
    _C.INTERNET.MAKEUP.NORM = "Affine"
    # One make-up block per level sharing the conv, differing in their norm (original MULTI_MAKEUP).
    _C.INTERNET.MAKEUP.MULTI = False
    # Side of the RoI features fed to the critic (both sets).
    _C.INTERNET.FEAT_POOL_SIZE = 14
    # Output channels of the critic (the dimension of the class buffer).
    _C.INTERNET.CRITIC_DIM = 1024
    # Norm of the critic's three convs (same names as MAKEUP.NORM; "BN" falls back to running stats on one RoI).
    # Across GPUs: "SyncBN" or "naiveSyncBN_N" (a rank without RoIs joins their collective call); "naiveSyncBN",
    # which asserts a non-empty batch, is refused.
    _C.INTERNET.CRITIC_NORM = "Affine"
    # Distance between the small-object critic outputs and the class centroids: "l2" | "l1" | "kl" | "ot".
    _C.INTERNET.LOSS = "l2"
    # Weight of loss_intertwiner (released: 10 with l2; the paper's ot setting used 1000).
    _C.INTERNET.LOSS_WEIGHT = 10.0
    # Levels whose RoIs are the less reliable set (the reliable set of a level: RoIs of every higher level).
    _C.INTERNET.LEVELS = ["p2", "p3", "p4"]
    # Class buffer: 1 = running mean over all history; K > 1 = count-weighted FIFO of the last K updates per class.
    _C.INTERNET.BUFFER_SIZE = 1
    # Instance-level loss (each RoI vs its class centroid) instead of the class-level one (class mean vs centroid).
    _C.INTERNET.INSTANCE_LEVEL = False
    # Iterations at the start of training during which the buffer fills but loss_intertwiner is 0 (the released
    # code counted a fraction of the first epoch: that many iterations = fraction x images / SOLVER.IMS_PER_BATCH).
    _C.INTERNET.WARMUP_ITERS = 0
    # Optimal-transport distance (LOSS "ot").
    _C.INTERNET.OT = node()
    # Entropic regularisation of the Sinkhorn solves.
    _C.INTERNET.OT.EPSILON = 1.0
    # Sinkhorn iterations (exactly that many).
    _C.INTERNET.OT.ITERS = 5
    # Ground cost between the OT critic's 1-d samples: "sqeuclidean" (carries gradient) or "cosine" (released;
    # gradient-free almost everywhere with the plan detached).
    _C.INTERNET.OT.COST = "sqeuclidean"
    # Channels of the OT critic (= number of 1-d samples per distribution).
    _C.INTERNET.OT.DIM = 256
    register_renamed_keys(cfg, RENAMED_KEYS)
    return cfg

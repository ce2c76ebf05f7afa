"""``add_ifr_config``: the ``MODEL.IFR`` node (implicit feature refinement in the mask head).

Solver keys use torchdeq's words (``f_max_iter``, ``b_tol``, Anderson's ``tau``), test-time values end in
``_TEST`` as in detectron2. Configs written with the earlier names fail with a one-line error naming the new key.
"""
from d2_refine.config import node_class
from d2_refine.config.renamed import register_renamed_keys

#: earlier key -> current key
RENAMED_KEYS = {
    "MODEL.IFR.F_THRES": "MODEL.IFR.F_MAX_ITER",
    "MODEL.IFR.B_THRES": "MODEL.IFR.B_MAX_ITER",
    "MODEL.IFR.TEST_F_THRES": "MODEL.IFR.F_MAX_ITER_TEST",
    "MODEL.IFR.F_EPS": "MODEL.IFR.F_TOL",
    "MODEL.IFR.B_EPS": "MODEL.IFR.B_TOL",
    "MODEL.IFR.ANDERSON.BETA": "MODEL.IFR.ANDERSON.TAU",
}


def add_ifr_config(cfg):
    """Add ``MODEL.IFR`` (defaults of the paper's implicit model) to ``cfg`` in place; no-op if present."""
    if "IFR" in cfg.MODEL:
        return cfg
    node = node_class(cfg)
    register_renamed_keys(cfg, RENAMED_KEYS)  # merging a file or option with an old name: one line naming the new
    _C = cfg.MODEL
    _C.IFR = node()
    # "implicit": fixed point z* = f(z*, x) by a root solver + implicit differentiation;
    # "explicit": weight sharing, the same block unrolled NUM_UNROLL times with plain autograd.
    _C.IFR.MODE = "implicit"
    # Unroll depth K of the explicit model, of the implicit model's warm-up, and of its fallback.
    _C.IFR.NUM_UNROLL = 4
    # Implicit model: training iterations (EventStorage.iter) run as the explicit K-unroll before switching.
    _C.IFR.PRETRAIN_STEPS = 50000
    # Forward solver: "broyden" | "anderson" | "fixed_point".
    _C.IFR.F_SOLVER = "broyden"
    # Forward solver at test time ("": F_SOLVER). The test-time solve needs no gradient, so it may differ.
    _C.IFR.F_SOLVER_TEST = ""
    # Solver of the adjoint fixed point in the backward pass (same choices).
    _C.IFR.B_SOLVER = "broyden"
    # Maximum f evaluations of the forward solve in training, the one at z = 0 included (torchdeq's and the
    # original's Broyden spend one more: one at z = 0, then one per step).
    _C.IFR.F_MAX_ITER = 15
    # Maximum evaluations of the backward (adjoint) solve; also the number of Neumann terms.
    _C.IFR.B_MAX_ITER = 15
    # Maximum f evaluations of the forward solve at test time.
    _C.IFR.F_MAX_ITER_TEST = 15
    # Forward stop tolerance: per RoI ||f(z) - z|| < F_TOL * sqrt(D) ("abs") or < F_TOL ("rel").
    _C.IFR.F_TOL = 1e-5
    # Backward stop tolerance, same convention.
    _C.IFR.B_TOL = 2e-10
    # "abs" or "rel" residual for the stop test.
    _C.IFR.STOP_MODE = "abs"
    # Maximum number of low-rank pairs kept by Broyden's inverse-Jacobian estimate.
    _C.IFR.BROYDEN_MEMORY = 27
    # Anderson acceleration: window M, ridge LAM, mixing TAU (torchdeq's names; beta in the DEQ papers).
    _C.IFR.ANDERSON = node()
    _C.IFR.ANDERSON.M = 6
    _C.IFR.ANDERSON.LAM = 1e-4
    _C.IFR.ANDERSON.TAU = 1.0
    # Gradient of the implicit model: "implicit" (adjoint solve), "jfb" (last f only) or "neumann".
    _C.IFR.BACKWARD = "implicit"
    # Weight normalisation (torch parametrizations) on the block's two convs.
    _C.IFR.WEIGHT_NORM = True
    # GroupNorm groups of the block's three GNs.
    _C.IFR.NUM_GROUPS = 4
    # Weight of the Jacobian-regularisation loss ||J_f||_F^2/numel (Hutchinson, 1 probe); 0 = not computed.
    _C.IFR.JAC_LOSS_WEIGHT = 0.0
    # RoIs whose solve did not converge: "explicit" (substitute the K-unroll, no grad) or "none" (best iterate).
    _C.IFR.FALLBACK = "explicit"
    return cfg

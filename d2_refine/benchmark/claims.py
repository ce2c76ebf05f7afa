"""What each paper claims its method gains, as a measurable statement (a metric, a comparison, a sign), and whether
a results record reproduces it in direction: the paired Δ of that metric against that comparison over seeds."""
import dataclasses
from typing import Dict, List, Optional, Sequence

from .entries import ROW_ORDER, entry_of, in_regime, row_title
from .report import table
from .stats import by_model, paired_delta

RULE = ("the claimed metric's Δ to the claimed comparison, paired by seed, mean ± std: **reproduced** when it has the "
        "paper's sign and |mean| > 2 × std, **in direction, not resolved** when it has the paper's sign within "
        "2 × std, **not in direction** when it has the other sign within 2 × std, **contradicted** when it has the "
        "other sign and |mean| > 2 × std; one paired seed: no judgement")
WORDS = ("reproduced", "in direction, not resolved", "not in direction", "contradicted")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim: ``task``'s ``metric`` of the method is above (``sign`` +1) or below (-1) that of
    ``against`` (default: the method's baseline). ``text``: the claim in words, with the paper's figure; ``label``:
    the method and metric in a few words (the summary sentences)."""
    label: str
    text: str
    task: str = "bbox"
    metric: str = "AP"
    against: Optional[str] = None
    sign: int = 1


#: The claims of each paper (section and figures: the PAPER column of the verdict table and each method's README).
CLAIMS: Dict[str, List[Claim]] = {
    "iounet": [Claim("IoU-Net box AP", "box AP above Faster R-CNN (+1.7)"),
               Claim("IoU-Net box AP90", "box AP90 above Faster R-CNN (+5.7): the gain is at high IoU",
                     metric="AP90")],
    "fpt_lite": [Claim("FPT lite box AP", "box AP above Mask R-CNN (up to +8.5)"),
                 Claim("FPT lite mask AP", "mask AP above Mask R-CNN (up to +6.0)", "segm")],
    "fpt_paper": [Claim("FPT paper box AP", "box AP above Mask R-CNN (up to +8.5)"),
                  Claim("FPT paper mask AP", "mask AP above Mask R-CNN (up to +6.0)", "segm")],
    "ifr": [Claim("IFR mask AP", "mask AP above Mask R-CNN (about +1)", "segm")],
    "ifr_ws": [Claim("IFR implicit over weight sharing", "mask AP below implicit IFR (−0.4)", "segm",
                     against="ifr", sign=-1)],
    "internet_l2": [Claim("InterNet l2 box AP", "box AP above Mask R-CNN (+4.3)")],
    "internet_ot": [Claim("InterNet ot box AP", "box AP above Mask R-CNN (+4.3, with the l2 loss)")],
    "rdsnet_mbrm": [Claim("MBRM box AP", "box AP above RDSNet with the same weights (+1.0)", against="rdsnet")],
}


def judge(delta: Optional[dict], sign: int) -> Optional[str]:
    """One of WORDS for a paired Δ (stats.mean_std of the differences) and the claimed sign; None below 2 seeds."""
    if not delta or delta["n"] < 2:
        return None
    m = sign * delta["mean"]
    resolved = abs(m) > 2 * delta["std"]
    if m > 0:
        return WORDS[0] if resolved else WORDS[1]
    return WORDS[3] if resolved else WORDS[2]


def assess(runs: Dict[str, Dict[int, dict]], name: str, claim: Claim) -> Optional[dict]:
    """The paired Δ of the claim's metric (``delta``, None when no seed has it in both) and its judgement
    (``word``, None below 2 seeds) in these runs ({model: {seed: record}}, stats.by_model); None when the method
    or its comparison has no record."""
    against = claim.against or entry_of(name).baseline
    if name not in runs or against not in runs:
        return None
    d = paired_delta(runs[name], runs[against], claim.task, claim.metric)
    return dict(delta=d, word=judge(d, claim.sign))


def _cell(result: Optional[dict], in_regime: bool) -> str:
    if result is None:
        return "not run" if in_regime else "not in this regime"
    d = result["delta"]
    if d is None:
        return "no paired value"
    if d["n"] < 2:
        return f"one seed: {d['mean']:+.1f}"
    return f"{result['word']}: {d['mean']:+.1f} ± {d['std']:.1f} ({d['n']} seeds)"


def markdown(scratch: Sequence[dict], finetune: Sequence[dict]) -> str:
    """The claims table (claim | from scratch | pretrained trunk) and, per regime, one sentence naming the methods
    in each judgement; from the two regimes' records."""
    regimes = {"scratch": by_model(scratch), "finetune": by_model(finetune)}
    body, named = [], {k: {w: [] for w in (*WORDS, "one seed")} for k in regimes}
    for name in ROW_ORDER:
        for claim in CLAIMS.get(name, []):
            cells = []
            for regime, runs in regimes.items():
                result = assess(runs, name, claim)
                cells.append(_cell(result, in_regime(name, regime)))
                if result is not None and result["delta"] is not None:
                    named[regime][result["word"] or "one seed"].append(claim.label)
            body.append([f"{row_title(name)}: {claim.text}", *cells])
    lines = ["The papers' claims, each as a metric against a comparison, in both regimes: " + RULE + ".", ""]
    lines += table(["paper's claim", "from scratch", "pretrained trunk"], body)
    for regime, title in (("scratch", "From scratch"), ("finetune", "From the pretrained trunk")):
        said = [f"{w}: {', '.join(named[regime][w])}" for w in (*WORDS, "one seed") if named[regime][w]]
        lines += ["", f"**{title}** — " + ("; ".join(said) if said else "nothing recorded yet") + "."]
    return "\n".join(lines) + "\n"

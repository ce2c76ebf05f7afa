"""Readers of what detectron2 writes into a run folder: ``metrics.json`` (one JSON object a line) and the
"Overall training speed" line of ``log.txt``."""
import json
import math
import os
import re
from typing import Dict, List, Optional


def finite(x):
    """``x``, or None where it is None or a float that is not finite (NaN, inf)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def read_metrics(path: str) -> List[dict]:
    """The records of detectron2's ``metrics.json`` in order ([] where the file is missing); a line that is not
    JSON (a run killed mid-write) is skipped."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def coco_results(record: dict) -> Dict[str, Dict[str, float]]:
    """The COCO metrics of one ``metrics.json`` record, by task ("bbox", "segm"): ``{"bbox": {"AP": ...}}``."""
    out: Dict[str, Dict[str, float]] = {}
    for key, value in record.items():
        task, _, metric = key.partition("/")
        if task in ("bbox", "segm") and metric:
            out.setdefault(task, {})[metric] = value
    return out


def final_results(metrics_json: str, min_iteration: Optional[int] = None) -> Optional[Dict[str, Dict[str, float]]]:
    """The COCO results of the last evaluation in detectron2's ``metrics.json`` (None if there is none, or if it
    was logged before ``min_iteration``: detectron2 logs the one after training at MAX_ITER). NaN becomes None."""
    evaluations = [r for r in read_metrics(metrics_json) if "bbox/AP" in r]
    if not evaluations:
        return None
    last = evaluations[-1]
    if min_iteration is not None and last.get("iteration", -1) < min_iteration:
        return None
    return {task: {m: finite(float(v)) for m, v in ms.items()} for task, ms in coco_results(last).items()}


def _training_lines(log_txt: str):
    if not os.path.isfile(log_txt):
        return []
    with open(log_txt) as f:
        return re.findall(r"Overall training speed: \d+ iterations in (\S+) \(([\d.]+) s / it\)", f.read())


def train_speed(log_txt: str) -> Optional[float]:
    """Seconds per iteration of the last training logged in ``log.txt`` (detectron2's 'Overall training speed')."""
    found = _training_lines(log_txt)
    return float(found[-1][1]) if found else None


def train_time(log_txt: str) -> Optional[float]:
    """Seconds of the last training logged in ``log.txt`` (the 'H:MM:SS' of 'Overall training speed')."""
    found = _training_lines(log_txt)
    if not found:
        return None
    h, m, s = found[-1][0].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)

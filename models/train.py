"""Train a registered anomaly model on MVTec-layout data, calibrate its threshold, save model.pt.

    python -m models.train --data DIR [--classes a,b] --model dvad --epochs N --out model.pt
        [--batch-size 8] [--lr LR] [--workers 0] [--seed 0] [--resume] [--preset paper]
        [--config '{"d_state": 16}' | --config d_state=16 --config scan=hilbert8 | --config cfg.json]
        [--val-fraction 0.1] [--far 0.01] [--val-data DIR] [--device cpu] [--threads N]
        [--cache-gb 2] [--summary summary.json] [--no-progress] [--no-validate]

Library: `train(data, ...) -> (model, summary)`.

What it does
  * seeds: python, numpy and torch seeded with --seed; the shuffle order of epoch e comes from its own
    generator seeded (seed, e), so a resumed run visits the same batches as an uninterrupted one.
  * data: `models.data.make_datasets` with the model's preprocessing; the held-out val split
    (--val-fraction of train/good per class) is never trained on.
  * frozen-encoder models (`model.frozen_encoder`, with `encode` / `loss_from_features`): there is no
    augmentation, so encoder features are computed once and kept in memory when they fit in
    --cache-gb (default 2 GiB); each epoch then only runs the trainable part (much faster: the encoder
    is most of the forward). Otherwise images are read and encoded every step.
  * recipe: a model's config may carry its training recipe - `epochs` (the default of --epochs),
    `schedule` ("step": lr x0.1 from 80 % of the steps on; "cosine": warm cosine down to 0.1x) and
    `warmup_epochs` (linear warm-up); without them: 10 epochs, "step", no warm-up.
  * optimiser: AdamW, lr = config.lr * batch / 16 (unless --lr), weight decay config.weight_decay
    (1e-4), the schedule's multiplier set every step (`lr_factor`), gradient norm clipped at 5.
  * resumable: after every epoch `<out>.state` holds weights, optimiser state, epoch, loss history
    (plain tensors / numbers, loaded with weights_only=True); --resume continues from it. Resuming a
    finished run re-scores it: the scoring fields (`models.recipe.SCORING_FIELDS`: blur_sigma,
    score_topk, map_strides, memory_weight, memory_ratio) may then differ from the saved config, e.g.
    `--resume --config score_topk=0.01`; the same weights are recalibrated, re-validated and saved to --out.
  * calibration (models.base.ScoreStats) on images not used for training: threshold = the
    (1 - far) quantile of the held-out normal scores; when --val-data names an MVTec-layout folder
    whose test/ split has labelled defects, the F1-optimal threshold over those plus the held-out
    normals instead. low = median normal score; map_low = median normal map value; map_threshold =
    threshold (a pixel above it is exactly what makes the image score - its max - exceed it).
  * validation (unless --no-validate): the test metrics on the held-out normal images plus synthetic
    defects pasted onto copies of them (`models.validation`), in the summary's "validation" block -
    what recipes are compared on; the test split is never touched here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .base import ScoreStats
from .checkpoint import save_checkpoint
from .recipe import SCHEDULES, SCORING_FIELDS
from .registry import create_model, get_model_class, list_models, saved_config
from .tiles import StripTiles, median_width, whole_image_geometry

STATE_FORMAT = "edge-ad-train-state"


class TrainError(ValueError):
    """A training request that cannot run as given (message says which option and why)."""


# ---------------------------------------------------------------------------------------------
# config handling
# ---------------------------------------------------------------------------------------------
def parse_config_overrides(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """Merge --config items: a JSON object, a path to a .json file, or key=value (value as JSON
    when it parses, else a string; "a,b" lists become tuples via the config class)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        item = item.strip()
        if not item:
            continue
        if item.startswith("{"):
            try:
                d = json.loads(item)
            except json.JSONDecodeError as e:
                raise TrainError(f"--config {item!r}: not valid JSON ({e.msg})") from None
        elif item.endswith(".json") or os.path.isfile(item):
            try:
                d = json.loads(pathlib.Path(item).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TrainError(f"--config {item}: cannot read a JSON object from it ({e})") from None
        elif "=" in item:
            k, v = item.split("=", 1)
            try:
                val = json.loads(v)
            except json.JSONDecodeError:
                val = [json.loads(p) if _is_json(p) else p for p in v.split(",")] if "," in v else v
            d = {k.strip(): val}
        else:
            raise TrainError(f"--config {item!r}: expected JSON, a .json file or key=value")
        if not isinstance(d, dict):
            raise TrainError(f"--config {item!r}: expected a JSON object")
        out.update(d)
    return out


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
        return True
    except json.JSONDecodeError:
        return False


def build_config_dict(model_name: str, overrides: Dict[str, Any], preset: Optional[str] = None,
                      num_classes: int = 1) -> Dict[str, Any]:
    cls = get_model_class(model_name)
    ccls = cls.config_class
    if preset:
        if not hasattr(ccls, preset):
            raise TrainError(f"--preset {preset!r}: model {model_name!r} has no such preset")
        base = getattr(ccls, preset)().to_dict()
    else:
        base = {}
    base.update(overrides)
    fields = set(getattr(ccls, "__dataclass_fields__", {}))
    if "num_classes" in fields and not base.get("num_classes"):
        # 0 / unset = "the number of classes trained on" (set it to 1 to switch the class loss off)
        base["num_classes"] = int(num_classes)
    try:
        return ccls.from_dict(base).to_dict()
    except (ValueError, TypeError) as e:
        raise TrainError(f"--config for model {model_name!r}: {e}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# inference helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, loader, device="cpu", keep_maps: bool = False, progress: bool = False, desc="scoring"):
    """Run the model over a loader -> dict(scores (N,), labels (N,), class_ids (N,), indices (N,),
    maps (N, S, S) float32 or None, masks (N, S, S) uint8 or None, map_median float)."""
    model.eval()
    scores, labels, cids, idx, maps, masks, med = [], [], [], [], [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        amap, score = model(batch["image"].to(device))
        scores.append(score.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
        cids.append(torch.as_tensor(batch["class_id"]))
        idx.append(torch.as_tensor(batch["index"]))
        a = amap[:, 0].float().cpu()
        med.append(a.flatten(1)[:, ::7].reshape(-1))
        if keep_maps:
            maps.append(a.numpy())
            masks.append((batch["mask"][:, 0] > 0.5).numpy().astype(np.uint8))
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return dict(scores=cat(scores).astype(np.float64), labels=cat(labels).astype(np.int64),
                class_ids=cat(cids).astype(np.int64), indices=cat(idx).astype(np.int64),
                maps=np.concatenate(maps) if keep_maps and maps else None,
                masks=np.concatenate(masks) if keep_maps and masks else None,
                map_median=float(torch.cat(med).median()) if med else 0.0)


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold t (verdict score >= t) maximising F1 over the labelled scores."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    # only cut between distinct scores: the last index of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    p = tp[last] / np.maximum(tp[last] + fp[last], 1)
    r = tp[last] / max(int(y.sum()), 1)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return float(s[last[int(np.argmax(f1))]])


def score_stats_from_scores(normal_scores, far: float = 0.01, labelled_scores=None,
                            labelled_labels=None, map_low: float = 0.0) -> ScoreStats:
    """ScoreStats from held-out normal scores (and optional labelled ones): see the module doc."""
    normal = np.asarray(normal_scores, np.float64)
    if normal.size == 0:
        raise TrainError("no held-out normal images to calibrate the threshold on "
                         "(use --val-fraction > 0 with enough train/good images)")
    if not 0.0 < far < 1.0:
        raise TrainError(f"--far must be in (0, 1), got {far}")
    low = float(np.median(normal))
    if labelled_scores is not None and len(labelled_scores) and np.any(np.asarray(labelled_labels) == 1):
        s = np.r_[normal, np.asarray(labelled_scores, np.float64)]
        y = np.r_[np.zeros(normal.size, np.int64), np.asarray(labelled_labels, np.int64)]
        thr, method, rate = f1_optimal_threshold(s, y), "f1-optimal", None
        n = s.size
    else:
        thr = float(np.quantile(normal, 1.0 - far, method="higher"))
        method, rate, n = f"quantile(1-far) of {normal.size} held-out normal scores", float(far), normal.size
    if thr <= low:
        thr = low + max(1e-6, abs(low) * 1e-6)
    return ScoreStats(low=low, threshold=thr, map_low=float(map_low), map_threshold=thr,
                      method=method, false_alarm_rate=rate, n_images=int(n))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, schedule: str = "step", warmup_steps: float = 0.0,
              final: float = 0.1) -> float:
    """Learning-rate multiplier at optimiser step `step` of `total_steps` (0-based).

    "step":   1, then 0.1 from 80 % of the steps on (MambaAD / ADer);
    "cosine": half a cosine from 1 down to `final` (Dinomaly: 2e-3 -> 2e-4);
    both after a linear warm-up from ~0 over `warmup_steps` steps when that is > 0.
    """
    if schedule not in SCHEDULES:
        raise TrainError(f"schedule {schedule!r} unknown; expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "step":
        return 0.1 if step >= math.ceil(0.8 * total_steps) else 1.0
    span = max(total_steps - warmup_steps, 1.0)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def _state_path(out) -> Optional[pathlib.Path]:
    return pathlib.Path(str(out) + ".state") if out else None


def _save_state(path: pathlib.Path, blob: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _load_state(path: pathlib.Path, model_name: str, config: dict, epochs: int) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainError(f"{path}: cannot resume from this state file ({first}); delete it to start over") from None
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        raise TrainError(f"{path}: not a training state file of this toolkit; delete it to start over")
    saved = json.loads(blob.get("config_json", "{}"))
    if blob.get("model") == model_name:   # fields added since the state was written: what it ran with
        saved = saved_config(model_name, saved)
    if int(blob.get("epoch", 0)) >= epochs:   # a finished run: its scoring fields may change, nothing else
        saved = dict(saved, **{k: config[k] for k in SCORING_FIELDS if k in config})
    if blob.get("model") != model_name:
        raise TrainError(f"{path}: was written for model {blob.get('model')!r}; this run asks for "
                         f"{model_name!r}. Use the same --model, or delete the file")
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if changed:
        diff = ", ".join(f"{k} (saved {saved.get(k, '-')!r}, asked {config.get(k, '-')!r})" for k in changed)
        done = int(blob.get("epoch", 0))
        hint = ""
        if done < epochs and all(k in SCORING_FIELDS for k in changed):
            hint = (f"; scoring fields change only on a finished run, and it stopped after epoch {done} "
                    f"of the {epochs} this run asks for: pass --epochs {done} to re-score its weights")
        raise TrainError(f"{path}: its config differs from this run's in {diff}{hint}. Use the same "
                         f"--config, or delete the file")
    return blob


def _feature_cache(model, dataset, batch_size, workers, budget_bytes, device, progress, log):
    """Encoder features of every training image, per scale (N, C, h, w) on `device`, or None."""
    if not (getattr(model, "frozen_encoder", False) and hasattr(model, "encode")
            and hasattr(model, "loss_from_features")) or len(dataset) == 0:
        return None
    x0 = dataset[0]["image"][None].to(device)
    per_image = sum(f[0].numel() * 4 for f in model.encode(x0))
    need = per_image * len(dataset)
    if need > budget_bytes:
        log(f"not caching encoder features: {need / 2 ** 30:.2f} GiB > --cache-gb "
            f"{budget_bytes / 2 ** 30:.2f}; the encoder runs every step")
        return None
    log(f"caching encoder features of {len(dataset)} images ({need / 2 ** 20:.0f} MiB)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats: List[List[torch.Tensor]] = []
    cids = []
    model.eval()
    for batch in tqdm(loader, desc="caching encoder features", disable=not progress, leave=False):
        feats.append(model.encode(batch["image"].to(device)))
        cids.append(torch.as_tensor(batch["class_id"]))
    per_scale = [torch.cat([f[i] for f in feats]) for i in range(len(feats[0]))]
    return per_scale, torch.cat(cids).to(device)


def _tile_datasets(train_ds, val_ds, pp, tile, stride, line_width, tiles_per_image, seed, log):
    """models.tiles datasets over the same train / held-out split as the whole-image ones."""
    if tile < 8 or (stride is not None and not 1 <= stride <= tile) or tiles_per_image < 1:
        raise TrainError(f"--tile {tile} must be >= 8, --tile-stride in [1, tile] (got {stride}), "
                         f"--tiles-per-image >= 1 (got {tiles_per_image})")
    stride = int(stride or max(1, tile - tile // 4))        # runtime.stream's default overlap
    if line_width is None:
        line_width = median_width(train_ds.samples, pp.channels)
        log(f"--line-width not given: strips at the training images' median width, {line_width} px")
    kw = dict(tile=int(tile), line_width=int(line_width), input_size=pp.input_size, channels=pp.channels,
              mean=pp.mean, std=pp.std, seed=seed, class_names=train_ds.class_names)
    tr = StripTiles(train_ds.samples, n_random=tiles_per_image * len(train_ds), **kw)
    return tr, StripTiles(val_ds.samples, stride=stride, **kw)


def train(data, classes=None, model: str = "dvad", epochs: Optional[int] = None, out=None, batch_size: int = 8,
          lr: Optional[float] = None, workers: int = 0, seed: int = 0, resume: bool = False,
          config: Optional[Dict[str, Any]] = None, preset: Optional[str] = None,
          val_fraction: float = 0.1, far: float = 0.01, val_data=None, device: str = "cpu",
          cache_gb: float = 2.0, progress: bool = True, log=None, tile: Optional[int] = None,
          tile_stride: Optional[int] = None, line_width: Optional[int] = None, tiles_per_image: int = 4,
          validate: bool = True):
    """Train, calibrate and (if `out`) save. Returns (model, summary dict). `tile`: train on tiles of
    the strip a camera of `line_width` pixels delivers (models.tiles) instead of whole images. `validate`:
    the summary's "validation" block (models.validation; whole images only)."""
    from .data import AnomalyDataset, make_datasets, scan_mvtec

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if model not in list_models():
        raise TrainError(f"--model {model!r}: unknown; registered: {', '.join(list_models())}")
    if (epochs is not None and epochs < 0) or batch_size < 1:
        raise TrainError(f"--epochs must be >= 0 and --batch-size >= 1 (got {epochs}, {batch_size})")
    seed_everything(seed)
    _, names = scan_mvtec(data, classes, "train")
    config = dict(config or {})
    if tile is not None:
        if val_data is not None:
            raise TrainError("--val-data calibrates whole images; with --tile calibrate the event threshold on "
                             "the stream's tiles instead (python -m runtime.calibrate)")
        config.setdefault("input_size", int(tile))      # native scale unless asked otherwise
    cfg = build_config_dict(model, config, preset, num_classes=len(names))
    net = create_model(model, **cfg).to(device)
    if epochs is None:      # the model's recipe says how long it trains (10 for a model without one)
        epochs = int(getattr(net.config, "epochs", 10))
    net.class_names = list(names)
    pp = net.preprocess
    train_ds, val_ds, _, names = make_datasets(data, classes, pp, val_fraction, seed, require_test=False)
    if tile is not None:
        train_ds, val_ds = _tile_datasets(train_ds, val_ds, pp, tile, tile_stride, line_width, tiles_per_image,
                                          seed, log)
        net.training_geometry = train_ds.geometry(val_ds.stride)
    else:
        net.training_geometry = whole_image_geometry(train_ds.samples, pp.input_size, pp.channels)
    log(f"{model}: {len(train_ds)} training / {len(val_ds)} held-out normal {'tiles' if tile else 'images'}, "
        f"classes {names}")

    summary: Dict[str, Any] = dict(model=model, config=cfg, classes=list(names), epochs=epochs,
                                   train_images=len(train_ds), val_images=len(val_ds), val_fraction=val_fraction,
                                   batch_size=batch_size, seed=seed, device=device)
    params = net.trainable_parameters()
    state_path = _state_path(out)
    start_epoch, history, images_seen, train_time = 0, [], 0, 0.0
    t_cache = 0.0
    prep_loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, num_workers=workers)

    def prep(desc):   # one pass over the training images for a prepare / finalize hook, with a bar
        return tqdm(prep_loader, desc=desc, disable=not progress, leave=False)

    if not net.needs_gradient_training:
        t0 = time.perf_counter()
        net.prepare(prep("fitting"), progress=progress)   # statistics / memory banks: the whole "training"
        train_time = time.perf_counter() - t0
        images_seen = len(train_ds)
    if net.needs_gradient_training and epochs > 0:
        base_lr = lr if lr is not None else getattr(net.config, "lr", 0.005) * batch_size / 16
        wd = getattr(net.config, "weight_decay", 1e-4)
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=wd)
        if resume and state_path is not None and state_path.is_file():
            blob = _load_state(state_path, model, cfg, epochs)
            net.load_state_dict(blob["model_state"])
            if net.preprocess != pp:   # e.g. a zoo state saved before the encoder-normalisation fix
                raise TrainError(f"{state_path}: saved with another input normalisation (mean "
                                 f"{net.preprocess.mean}, std {net.preprocess.std}; this run uses mean "
                                 f"{pp.mean}, std {pp.std}); delete it to start over")
            opt.load_state_dict(blob["optim_state"])
            start_epoch = int(blob["epoch"])
            history = [float(v) for v in blob["loss_history"]]
            images_seen, train_time = int(blob["images_seen"]), float(blob["train_time"])
            log(f"resuming from {state_path} after epoch {start_epoch}" + (
                " (finished: re-scoring its weights with this run's scoring fields)" if start_epoch >= epochs else ""))
        net.prepare(prep("preparing"), progress=progress)
        cache = None
        if start_epoch < epochs:
            t0 = time.perf_counter()
            cache = _feature_cache(net, train_ds, batch_size, workers, cache_gb * 2 ** 30, device, progress, log)
            t_cache = time.perf_counter() - t0
        summary["feature_cache"] = cache is not None
        n = len(train_ds)
        steps_per_epoch = max(1, math.ceil(n / batch_size))
        schedule = getattr(net.config, "schedule", "step")
        warmup = float(getattr(net.config, "warmup_epochs", 0.0))
        summary["schedule"] = dict(kind=schedule, warmup_epochs=warmup, base_lr=base_lr)
        for epoch in range(start_epoch, epochs):
            gen = torch.Generator().manual_seed(seed * 100003 + epoch)
            net.train()
            t0 = time.perf_counter()
            if cache is not None:
                perm = torch.randperm(n, generator=gen)
                batches = [perm[i: i + batch_size] for i in range(0, n, batch_size)]
                loader = None
            else:
                loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True,
                                                     generator=gen, num_workers=workers)
                batches = loader
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
            tot, cnt, seen = 0.0, 0, 0
            for i, b in enumerate(bar):
                lr_mult = lr_factor(epoch * steps_per_epoch + i, epochs * steps_per_epoch, schedule,
                              warmup * steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = base_lr * lr_mult
                if cache is not None:
                    feats, cid = [f[b.to(f.device)] for f in cache[0]], cache[1][b.to(cache[1].device)]
                    loss = net.loss_from_features(feats, cid)
                    nb = len(b)
                else:
                    x = b["image"].to(device)
                    loss = net.training_loss(x, torch.as_tensor(b["class_id"]).to(device))
                    nb = x.shape[0]
                if not torch.isfinite(loss):
                    raise TrainError(f"epoch {epoch + 1}: loss became {loss.item()} (try a lower --lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                tot += loss.item() * nb
                cnt += nb
                seen += nb
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{tot / cnt:.4f}", img_s=f"{seen / max(dt, 1e-9):.1f}")
            bar.close()
            train_time += time.perf_counter() - t0
            images_seen += seen
            history.append(tot / max(cnt, 1))
            log(f"epoch {epoch + 1}/{epochs}: loss {history[-1]:.5f}, "
                f"{seen / max(time.perf_counter() - t0, 1e-9):.1f} images/s")
            if state_path is not None:
                _save_state(state_path, dict(format=STATE_FORMAT, model=model, config_json=json.dumps(cfg),
                                             epoch=epoch + 1, model_state=net.state_dict(),
                                             optim_state=opt.state_dict(), loss_history=history,
                                             images_seen=images_seen, train_time=train_time))
        del cache
    net.eval()
    t0 = time.perf_counter()
    net.finalize(prep("finalizing"), progress=progress)   # post-training statistics / memory (most: none)
    t_final = time.perf_counter() - t0
    if t_final > 1.0:
        log(f"finalize (statistics / memory after training): {t_final:.0f} s")

    # ---- calibration on held-out images ------------------------------------------------------
    vl = torch.utils.data.DataLoader(val_ds, batch_size=batch_size, num_workers=workers)
    pv = predict(net, vl, device, progress=progress, desc="calibrating")
    lab_scores = lab_labels = None
    if val_data is not None:
        vs, _ = scan_mvtec(val_data, names, "test")
        vds = AnomalyDataset(vs, pp.input_size, pp.channels, pp.mean, pp.std, class_names=names)
        pl = predict(net, torch.utils.data.DataLoader(vds, batch_size=batch_size, num_workers=workers),
                     device, progress=progress, desc="calibrating (labelled)")
        lab_scores, lab_labels = pl["scores"], pl["labels"]
    net.score_stats = score_stats_from_scores(pv["scores"], far, lab_scores, lab_labels, pv["map_median"])
    if validate and tile is None and len(val_ds):
        from .validation import validate as _validate

        t0 = time.perf_counter()
        summary["validation"] = _validate(net, val_ds, batch_size, workers, device, progress, seed=seed)
        v = summary["validation"]
        log(f"validation ({v['n_images']} images, held-out normal + synthetic defects, "
            f"{time.perf_counter() - t0:.0f} s): I-AUROC {100 * v['image_auroc']:.1f}, "
            f"P-AUROC {100 * v['pixel_auroc']:.1f}, AUPRO {100 * v['pixel_aupro']:.1f}")
    summary.update(
        final_loss=history[-1] if history else None, loss_history=history,
        train_time_s=train_time, cache_time_s=t_cache, finalize_time_s=t_final, images_seen=images_seen,
        images_per_s=images_seen / train_time if train_time > 0 else None,
        score_stats=net.score_stats.to_dict(), training=net.training_geometry,
        trainable_parameters=sum(p.numel() for p in params),
        total_parameters=sum(p.numel() for p in net.parameters()))
    if out:
        save_checkpoint(net, out, extra={"train": {k: summary[k] for k in (
            "epochs", "train_images", "val_images", "val_fraction", "batch_size", "seed", "final_loss",
            "train_time_s", "images_per_s")}})
        summary["checkpoint"] = str(out)
    return net, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="MVTec-layout folder (one class or a folder of classes)")
    ap.add_argument("--classes", default=None, help="comma-separated class folders (default: all)")
    ap.add_argument("--model", default="dvad", help="registered model name")
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's recipe (config.epochs; 10 without one)")
    ap.add_argument("--out", default="model.pt", help="checkpoint path (state in <out>.state)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: config lr * batch / 16")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from <out>.state if present")
    ap.add_argument("--preset", default=None, help="config preset of the model class, e.g. 'paper'")
    ap.add_argument("--config", action="append", default=[],
                    help="JSON object, .json file or key=value (repeatable)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--far", type=float, default=0.01, help="false-alarm rate for the threshold")
    ap.add_argument("--val-data", default=None, help="labelled MVTec-layout folder for an F1-optimal threshold")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-gb", type=float, default=2.0, help="memory budget for cached encoder features")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tile", type=int, default=None,
                    help="train on TILE x TILE crops of the strip the stream will see (models.tiles); the model "
                         "input defaults to TILE (native scale) and exports take TILE x TILE frames")
    ap.add_argument("--tile-stride", type=int, default=None, help="held-out tiles' stride (default 3/4 tile)")
    ap.add_argument("--line-width", type=int, default=None,
                    help="camera width the images are laid out at (default: their median width)")
    ap.add_argument("--tiles-per-image", type=int, default=4, help="random training crops per training image")
    ap.add_argument("--summary", default=None, help="write the summary JSON here")
    ap.add_argument("--no-validate", action="store_true",
                    help="skip the validation metrics (held-out normal + synthetic defects) in the summary")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        _, summary = train(a.data, a.classes, a.model, a.epochs, a.out, a.batch_size, a.lr, a.workers,
                           a.seed, a.resume, parse_config_overrides(a.config), a.preset, a.val_fraction,
                           a.far, a.val_data, a.device, a.cache_gb, progress=not a.no_progress, tile=a.tile,
                           tile_stride=a.tile_stride, line_width=a.line_width, tiles_per_image=a.tiles_per_image,
                           validate=not a.no_validate)
    except (TrainError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    short = {k: v for k, v in summary.items() if k not in ("loss_history", "config")}
    print(json.dumps(short, indent=2))
    if a.summary:
        pathlib.Path(a.summary).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SPINEPS 2.1.3 side of the labelling-phase (VERIDAH) interop tests.

A standalone script run with SPINEPS's own interpreter (see tests/spineps_env.py), never imported by our
package or by pytest:

    <spineps python> tests/spineps_labelling_side.py make-model OUT_DIR --seed 0 --scale 20
    <spineps python> tests/spineps_labelling_side.py run MODEL_DIR IMAGE VERT SUBREG OUT_JSON [--cutouts OUT_NPZ]
    <spineps python> tests/spineps_labelling_side.py path PRED_JSON OUT_JSON

Everything labelling-specific is SPINEPS's own code (PLClassifier, ARGS_MODEL, get_actual_model /
VertLabelingClassifier.load, perform_labeling_step, find_vert_path_from_predictions); this script only
builds a model folder, wires the inputs in, and records what SPINEPS computed along the way.

make-model
    Writes a model folder laid out like the released `T2w_labeling`: `inference_config.json`
    ("modeltype": "classifier") and one Lightning checkpoint at
    `checkpoints/epoch=0-val_f1=0.0000_valf1-weights.ckpt` (matches `**/*val_f1=*valf1-weights.ckpt`).
    The network is SPINEPS's PLClassifier with random weights (torch.manual_seed(seed) right before it
    is built, not_pretrained=True); the last Linear layer of every head (weight and bias) is multiplied by
    --scale so that the softmax posteriors are peaked instead of flat. `opt` is SPINEPS's ARGS_MODEL with
    `final_size` (and `ds_name`) set as extra attributes, as the released checkpoint carries them. The
    folder is loaded back with SPINEPS's loader and its state dict compared with the one written.

run
    Loads the folder with SPINEPS's loader and calls phase_labeling.perform_labeling_step on the given
    NIfTI files the way phase_post.phase_postprocess_combined (called by seg_run.segment_image) does:
    img, seg-vert instance mask, subreg_nii=the semantic mask, proc_lab_force_no_tl_anomaly, disable_c1
    (True unless --enable-c1, which is what seg_run passes for a semantic model without C1). The module
    function run_model_for_vert_labeling and a few methods of the loaded classifier are wrapped (not
    replaced) to record their arguments and results, so every recorded value is the one the step used.

path
    Calls find_vert_path_from_predictions on given posteriors with the arguments
    run_model_for_vert_labeling passes (everything else at SPINEPS's defaults).

JSON written by `run` (instance labels are JSON object keys, as decimal strings; every per-instance
object and list is in SPINEPS's order, i.e. the order of `instance_order`):
    spineps_version, model_dir, inputs {image, vert, subreg}, args {proc_lab_force_no_tl_anomaly,
    disable_c1, device}, patch_rotation, final_size,
    force_c1, force_c2                 instance labels perform_labeling_step forced from the dens (or null),
    force_c1_index, force_c2_index     their positions in instance_order (or null),
    model_space {shape, zoom, orientation, affine}   the cropped, resampled volume the cutouts came from,
    instance_order [labels]            = predictions' key order = NII.unique() of the corpus-masked,
                                         cropped, resampled VERT mask (ascending label value),
    predictions {label: {head: [softmax floats]}}    every head, float32 values written exactly,
    centers {label: {center: [i, j, k], angle}}      cutout centre (voxel, model space) and rotation,
    fcost, fpath, fpath_post, cost_matrix            as returned by find_vert_path_from_predictions,
    labelmap_model {label: id}         the labelmap run_model_for_vert_labeling returned,
    labelmap {label: id}               the final map perform_labeling_step applied (C1 added, 0 for
                                       input labels the path did not cover),
    output_labels [ids]                labels present in the relabelled mask,
    cutouts_npz                        path of the npz (or null), timing_s {load, labelling}.
With --cutouts the npz holds, keyed by the instance label as a string, the float32 array that entered
the network for that instance: z-scored, centre-cropped to final_size, shape final_size (the batch and
channel axes of the (1, 1, *final_size) tensor dropped).

JSON read by `path`: either {label: {head: [floats]}} or a `run` output (its "predictions" is used);
instances are taken in the file's order. Written: instance_order, args, fcost, fpath, fpath_post,
cost_matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

HEADS_DEFAULT = "REGION,VERT,VERTEX,VERTREL,VERTGRP,VERTT13,FULLYVISIBLE"
FINAL_SIZE_DEFAULT = (152, 168, 32)
CKPT_RELPATH = "checkpoints/epoch=0-val_f1=0.0000_valf1-weights.ckpt"
CKPT_GLOB = "**/*val_f1=*valf1-weights.ckpt"  # lab_model.VertLabelingClassifier.load
# Plausible values for a T2w sagittal labelling model; a [min, max] pair clamps each axis (seg_model).
RESOLUTION_RANGE_DEFAULT = [[0.75, 0.75, 1.65], [1.0, 1.0, 4.0]]


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _head_sizes() -> dict[str, int]:
    """Head name -> class count, from SPINEPS's own label enums (read_labels.Target)."""
    from spineps.architectures.read_labels import VertExact, VertExactClass, VertGroup, VertRegion, VertRel, VertT13

    return {
        "REGION": len(VertRegion),  # 3
        "VERT": len(VertExact),  # 24
        "VERTEX": len(VertExactClass),  # 26
        "VERTREL": len(VertRel),  # 6
        "VERTGRP": len(VertGroup),  # 12
        "VERTT13": len(VertT13),  # 2: the name the labelling phase reads
        "VT13": len(VertT13),  # 2: the training enum's name (ignored by the phase)
        "FULLYVISIBLE": 2,  # BinaryLabelTypeDummy.number_of_channel
    }


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {str(int(k)) if isinstance(k, (int, np.integer)) else str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    return x


def _write_json(path: str | Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")


def _spineps_version() -> str:
    from importlib.metadata import version

    return version("spineps")


def _load_classifier(model_dir: str | Path, use_cpu: bool = True):
    """SPINEPS's loader: get_models.get_actual_model -> VertLabelingClassifier, then .load()."""
    from spineps.get_models import get_actual_model
    from spineps.lab_model import VertLabelingClassifier

    model = get_actual_model(Path(model_dir), use_cpu=use_cpu)
    assert isinstance(model, VertLabelingClassifier), type(model)
    model.load()
    return model


# ---------------------------------------------------------------------------------------------- make-model
def cmd_make_model(a: argparse.Namespace) -> int:
    import pytorch_lightning as pl
    import torch
    from spineps.architectures.pl_densenet import ARGS_MODEL, MODEL, PLClassifier

    _set_threads(a.threads)
    sizes = _head_sizes()
    heads = [h.strip() for h in a.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in sizes]
    if unknown:
        sys.exit(f"unknown heads {unknown}; known: {list(sizes)}")
    if len(set(heads)) != len(heads):
        sys.exit(f"duplicate heads in {heads}")
    if a.backbone not in MODEL.__members__:
        sys.exit(f"unknown backbone {a.backbone}")
    group_2_n_channel = {h: sizes[h] for h in heads}

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(CKPT_GLOB)) or (out / "inference_config.json").exists():
        if not a.force:
            sys.exit(f"{out} already holds a model (use --force to overwrite)")
        for p in out.glob(CKPT_GLOB):
            p.unlink()

    opt = ARGS_MODEL(
        backbone=a.backbone,
        in_channel=1,
        not_pretrained=True,
        num_classes=sum(group_2_n_channel.values()),
        n_channel_p_group=list(group_2_n_channel.values()),
    )
    # Not ARGS_MODEL fields: the training arguments the released checkpoint pickles carry them.
    opt.final_size = tuple(int(s) for s in a.final_size)
    if a.ds_name:
        opt.ds_name = a.ds_name

    torch.manual_seed(a.seed)
    model = PLClassifier(opt, group_2_n_channel)
    with torch.no_grad():
        for head in model.classification_heads.values():
            last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(a.scale)
            if last.bias is not None:
                last.bias.mul_(a.scale)
    model.eval()

    ckpt = out / CKPT_RELPATH
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    how = "trainer.save_checkpoint"
    try:
        import logging
        import warnings

        from lightning_fabric.plugins.environments import LightningEnvironment

        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                max_epochs=0,
                plugins=[LightningEnvironment()],  # not SLURM's, even inside a SLURM job
            )
            trainer.strategy.connect(model)
            trainer.save_checkpoint(ckpt, weights_only=False)
    except Exception as e:  # pragma: no cover - depends on the Lightning version
        how = f"manual dict ({type(e).__name__}: {e})"
        torch.save(
            {
                "epoch": 0,
                "global_step": 0,
                "pytorch-lightning_version": pl.__version__,
                "state_dict": model.state_dict(),
                "loops": {},
                "callbacks": {},
                "optimizer_states": [],
                "lr_schedulers": [],
                "hparams_name": getattr(model, "_hparams_name", "kwargs"),
                "hyper_parameters": dict(model.hparams),
            },
            ckpt,
        )

    config = {
        "log_name": a.log_name,
        "modality": "T2w",
        "acquisition": "sag",
        "modeltype": "classifier",
        "model_expected_orientation": ["P", "I", "R"],
        "available_folds": 1,
        "inference_augmentation": False,
        "resolution_range": json.loads(a.resolution_range),
        "default_step_size": 0.5,
        "labels": {},
        "expected_inputs": ["img"],
    }
    _write_json(out / "inference_config.json", config)

    # verify with SPINEPS's own loader
    loaded = _load_classifier(out, use_cpu=True)
    pred = loaded.predictor
    sd_new, sd_old = pred.state_dict(), model.state_dict()
    assert list(sd_new) == list(sd_old), "state dict keys differ after loading"
    diff = max(float((sd_new[k].float() - sd_old[k].float()).abs().max()) if sd_new[k].numel() else 0.0 for k in sd_new)
    assert diff == 0.0, f"weights differ after loading: {diff}"
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    print(f"checkpoint: {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB, {how})")
    print(f"checkpoint keys: {sorted(raw)}")
    print(f"hyper_parameters: {sorted(raw['hyper_parameters'])}, pytorch-lightning_version {raw.get('pytorch-lightning_version')}")
    print(f"loaded with get_actual_model -> {type(loaded).__name__}; modelid {loaded.modelid()!r}")
    print(f"heads: {', '.join(f'{k}={v}' for k, v in pred.group_2_n_channel.items())}")
    print(f"head names (forward order): {pred.classification_keys}")
    print(f"backbone {pred.opt.backbone}, final_size {tuple(loaded.final_size)}, cutout_size {tuple(loaded.cutout_size)}, "
          f"patch_rotation {loaded.patch_rotation}, seed {a.seed}, scale {a.scale}, weights identical after load")
    return 0


# ------------------------------------------------------------------------------------------------------ run
def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from spineps import phase_labeling
    from TPTBox import NII

    _set_threads(a.threads)
    t0 = time.perf_counter()
    model = _load_classifier(a.model_dir, use_cpu=not a.gpu)
    t_load = time.perf_counter() - t0

    img = NII.load(a.image, seg=False)
    vert = NII.load(a.vert, seg=True)
    subreg = NII.load(a.subreg, seg=True)
    # phase_post.phase_postprocess_combined crops all three to the semantic mask plus its margin before it labels
    from spineps.phase_post import POSTPROCESS_CROP_MARGIN_MM

    crop = subreg.compute_crop(dist=POSTPROCESS_CROP_MARGIN_MM / min(subreg.zoom))
    img, vert, subreg = img.apply_crop(crop), vert.apply_crop(crop), subreg.apply_crop(crop)

    rec: dict = {"centers": {}, "cutouts": {}, "model_space": None, "call": None, "result": None}
    current: dict = {"label": None}

    # -- wrappers: record, then hand over to SPINEPS's own code unchanged --
    orig_rmfvl = phase_labeling.run_model_for_vert_labeling

    def rmfvl(*args, **kwargs):
        rec["call"] = dict(kwargs)
        result = orig_rmfvl(*args, **kwargs)
        rec["result"] = result
        rec["labelmap_model"] = dict(result[0])  # perform_labeling_step mutates result[0] afterwards
        return result

    phase_labeling.run_model_for_vert_labeling = rmfvl

    orig_all = model.run_all_seg_instances

    def run_all_seg_instances(img_m, seg_m):
        m = img_m.reorient()
        rec["model_space"] = {
            "shape": list(m.shape),
            "zoom": [float(z) for z in m.zoom],
            "orientation": list(m.orientation),
            "affine": np.asarray(m.affine).tolist(),
        }
        return orig_all(img_m, seg_m)

    model.run_all_seg_instances = run_all_seg_instances

    orig_seg_pos = model.run_given_seg_pos

    def run_given_seg_pos(img_m, seg_m, vert_label=None, angle=None):
        current["label"] = vert_label
        try:
            return orig_seg_pos(img_m, seg_m, vert_label=vert_label, angle=angle)
        finally:
            current["label"] = None

    model.run_given_seg_pos = run_given_seg_pos

    orig_center_pos = model.run_given_center_pos

    def run_given_center_pos(img_m, seg_m, center_pos, angle=None):
        rec["centers"][int(current["label"])] = {"center": [int(c) for c in center_pos], "angle": angle}
        return orig_center_pos(img_m, seg_m, center_pos, angle=angle)

    model.run_given_center_pos = run_given_center_pos

    if a.cutouts:
        orig_forward = model.predictor.forward

        def forward(x):
            assert x.ndim == 5 and x.shape[:2] == (1, 1), tuple(x.shape)
            rec["cutouts"][int(current["label"])] = x[0, 0].detach().to("cpu", torch.float32).numpy().copy()
            return orig_forward(x)

        model.predictor.forward = forward  # _run_array calls self.predictor.forward(model_input) directly

    t1, c1 = time.perf_counter(), time.process_time()
    try:
        out_nii = phase_labeling.perform_labeling_step(
            model=model,
            img_nii=img,
            vert_nii=vert,
            subreg_nii=subreg,
            proc_lab_force_no_tl_anomaly=a.enforce_12_thoracic,
            disable_c1=not a.enable_c1,
        )
    finally:
        phase_labeling.run_model_for_vert_labeling = orig_rmfvl
    t_lab, c_lab = time.perf_counter() - t1, time.process_time() - c1

    if rec["result"] is None:  # empty instance mask: perform_labeling_step returned early
        sys.exit("perform_labeling_step did not run the model (empty VERT mask?)")
    labelmap_final, fcost, fpath, fpath_post, costlist, _min_costs_path, predictions = rec["result"]
    order = [int(k) for k in predictions]
    call = rec["call"]

    def _index(label):
        return order.index(label) if label is not None and label in order else None

    out = {
        "spineps_version": _spineps_version(),
        "model_dir": str(Path(a.model_dir).resolve()),
        "inputs": {"image": str(a.image), "vert": str(a.vert), "subreg": str(a.subreg)},
        "args": {
            "proc_lab_force_no_tl_anomaly": bool(a.enforce_12_thoracic),
            "disable_c1": not a.enable_c1,
            "device": str(model.device),
        },
        "patch_rotation": bool(model.patch_rotation),
        "final_size": list(model.final_size),
        "force_c1": call.get("force_c1"),
        "force_c2": call.get("force_c2"),
        "force_c1_index": _index(call.get("force_c1")),
        "force_c2_index": _index(call.get("force_c2")),
        "model_space": rec["model_space"],
        "instance_order": order,
        "predictions": {k: {h: [float(x) for x in np.asarray(v).ravel()] for h, v in p["soft"].items()} for k, p in predictions.items()},
        "centers": {k: rec["centers"].get(int(k)) for k in predictions},
        "fcost": fcost,
        "fpath": [int(x) for x in fpath],
        "fpath_post": [int(x) for x in fpath_post],
        "cost_matrix": costlist,
        "labelmap_model": rec["labelmap_model"],
        "labelmap": {int(k): int(v) for k, v in labelmap_final.items()},
        "output_labels": [int(x) for x in out_nii.unique()],
        "cutouts_npz": str(a.cutouts) if a.cutouts else None,
        "timing_s": {"load": round(t_load, 3), "labelling": round(t_lab, 3), "labelling_cpu": round(c_lab, 3)},
    }
    _write_json(a.out_json, out)
    if a.cutouts:
        Path(a.cutouts).parent.mkdir(parents=True, exist_ok=True)
        missing = [k for k in order if k not in rec["cutouts"]]
        assert not missing, f"no cutout captured for {missing}"
        np.savez_compressed(a.cutouts, **{str(k): rec["cutouts"][k] for k in order})
    if a.out_nii:
        out_nii.save(a.out_nii)
    print(f"instances {order} -> fpath {out['fpath']} fpath_post {out['fpath_post']} fcost {fcost:.6g}")
    print(f"labelmap {out['labelmap']}; load {t_load:.1f} s, labelling {t_lab:.1f} s ({out['args']['device']})")
    return 0


# ----------------------------------------------------------------------------------------------------- path
def cmd_path(a: argparse.Namespace) -> int:
    import numpy as np
    from spineps.phase_labeling import find_vert_path_from_predictions

    with open(a.pred_json, encoding="utf-8") as f:
        data = json.load(f)
    sets = data if isinstance(data, list) else [data]  # a list: one result per prediction set, one start-up for all
    dtype = np.float32 if a.dtype == "float32" else np.float64
    kwargs = {
        "proc_lab_force_no_tl_anomaly": bool(a.enforce_12_thoracic),
        "verbose": False,
        "disable_c1": not a.enable_c1,
        "force_c1_instance": a.force_c1_index,
        "force_c2_instance": a.force_c2_index,
    }
    results = []
    for one in sets:
        preds_in = one["predictions"] if isinstance(one, dict) and "predictions" in one else one
        if not preds_in:
            sys.exit("no predictions")
        predictions = {}
        for k, heads in preds_in.items():
            try:
                key = int(k)
            except ValueError:
                key = k
            predictions[key] = {"soft": {h: np.asarray(v, dtype=dtype) for h, v in heads.items()}}
        t0 = time.perf_counter()
        fcost, fpath, fpath_post, cost_matrix, _min_costs_path, args = find_vert_path_from_predictions(predictions=predictions, **kwargs)
        dt = time.perf_counter() - t0
        results.append({
            "spineps_version": _spineps_version(),
            "instance_order": list(predictions),
            "args": {**{k: v for k, v in kwargs.items() if k != "verbose"}, "dtype": a.dtype, "exact_classes": bool(args["exact_classes"])},
            "fcost": fcost,
            "fpath": [int(x) for x in fpath],
            "fpath_post": [int(x) for x in fpath_post],
            "cost_matrix": cost_matrix,
            "timing_s": round(dt, 4),
        })
    out = results if isinstance(data, list) else results[0]
    fcost, dt = results[-1]["fcost"], results[-1]["timing_s"]
    _write_json(a.out_json, out)
    print(f"{len(results)} path(s); last: fpath {results[-1]['fpath']} fcost {fcost:.6g} ({dt * 1000:.1f} ms)")
    return 0


# ------------------------------------------------------------------------------------------------------ cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1), help="torch CPU threads")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-model", help="write a random-weight SPINEPS labelling model folder")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, required=True)
    m.add_argument("--scale", type=float, required=True, help="factor for the last Linear layer of every head")
    m.add_argument("--backbone", default="DENSENET169", help="an ARGS_MODEL backbone: DENSENET169 (default) or DENSENET121, ...")
    m.add_argument("--final-size", type=int, nargs=3, default=list(FINAL_SIZE_DEFAULT), metavar=("P", "I", "R"))
    m.add_argument("--heads", default=HEADS_DEFAULT, help=f"comma-separated, in order (default {HEADS_DEFAULT})")
    m.add_argument("--ds-name", default="sagittal_v3corpus_npz",
                   help="opt.ds_name; SPINEPS rotates cutouts only if it contains 'v4corpus' ('' leaves it unset)")
    m.add_argument("--resolution-range", default=json.dumps(RESOLUTION_RANGE_DEFAULT),
                   help="JSON: a zoom triple (fixed) or a [min, max] pair of triples")
    m.add_argument("--log-name", default="T2w_Labeling_random")
    m.add_argument("--force", action="store_true", help="overwrite an existing model in OUT_DIR")
    m.set_defaults(func=cmd_make_model)

    r = sub.add_parser("run", help="run SPINEPS's labelling step and record what it computed")
    r.add_argument("model_dir")
    r.add_argument("image")
    r.add_argument("vert", help="seg-vert instance mask")
    r.add_argument("subreg", help="seg-spine semantic mask")
    r.add_argument("out_json")
    r.add_argument("--enforce-12-thoracic", action="store_true", help="proc_lab_force_no_tl_anomaly=True")
    r.add_argument("--enable-c1", action="store_true", help="disable_c1=False (seg_run: a semantic model with C1)")
    r.add_argument("--cutouts", metavar="OUT_NPZ", help="save the network input per instance")
    r.add_argument("--out-nii", help="also save the relabelled VERT mask")
    r.add_argument("--gpu", action="store_true", help="let SPINEPS use cuda:0 when available (default: CPU)")
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("path", help="SPINEPS's path search on given posteriors")
    q.add_argument("pred_json")
    q.add_argument("out_json")
    q.add_argument("--enforce-12-thoracic", action="store_true", help="proc_lab_force_no_tl_anomaly=True")
    q.add_argument("--enable-c1", action="store_true", help="disable_c1=False")
    q.add_argument("--force-c1-index", type=int, default=None, help="force_c1_instance (position, not label)")
    q.add_argument("--force-c2-index", type=int, default=None, help="force_c2_instance (position, not label)")
    q.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="array type of the posteriors (SPINEPS's own are float32)")
    q.set_defaults(func=cmd_path)

    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())

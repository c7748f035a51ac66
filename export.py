"""`inference.py --export FILE`: a checkpoint (or an ensemble of them) as one self-contained ONNX or TorchScript
file that takes the evaluation crop as uint8 pixels and returns class probabilities.

    python inference.py --checkpoint checkpoints/<run>/best.pt --export model.onnx    # ONNX (needs the onnx package)
    python inference.py --checkpoint checkpoints/<run>/best.pt --export model.pt      # TorchScript

The exported graph, input `images` -> output `probs`:
    images   uint8 RGB, (N, 3, S, S), channels first: the image resized (bilinear, antialiased) so that its short
             side is R pixels, its centre R x R square, and that square's centre S x S crop (inference.py's centre
             view, cut in these two steps). S is the checkpoint's eval size and R = round(S / eval crop ratio);
             both are in the metadata (eval_size, resize). Other sizes run too (the network pools globally) but
             are not what the model was validated at.
    probs    float32, (N, number of classes): softmax probabilities in the order of the metadata's `classes`;
             averaged over the horizontal flip with --tta flip (inference.py's default) and over the models of an
             ensemble, exactly as inference.py averages them.
Converting to float, dividing by 255 and normalising with each model's own mean and std (its checkpoint's: the
architecture's, or the run's --mean and --std) happen inside the graph, so no caller can get the normalisation wrong.
The weights are float32, whichever --amp the run trained with.

Metadata (ONNX: the model's metadata_props; TorchScript: the extra file metadata.json, read with
torch.jit.load(path, _extra_files={"metadata.json": ""})), every value a string:
    classes (JSON list), input, output, eval_size, resize, eval_crop_ratio, normalisation (JSON: mean, std, scale,
    applied inside the graph), tta, weights (raw or ema, one per model, comma-separated), arch, head, checkpoints
    (JSON list of the files), exported_by.

The ONNX file is written by PyTorch's TorchScript-based exporter (torch.onnx.export(..., dynamo=False)), which works
offline and needs only the onnx package; the newer torch.export-based one also needs onnxscript. After writing,
the file is run on a few random images (ONNX Runtime when it is installed, torch.jit.load for TorchScript) and
compared with PyTorch.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch

from augment import eval_crop, eval_sizes
from batches import norm_factors, normalisation, scale_channels_
from errors import UserError
from predict import crop_views, mean_over_views

FORMATS = {".onnx": "ONNX", ".pt": "TorchScript"}
ONNX_OPSET = 17  # run by every ONNX Runtime since 1.11 and by TensorRT 8.6+
EXPORTABLE_TTA = ("none", "flip")  # flip-crops needs the whole resized square, not the crop the graph takes
CHECK_TOLERANCE = 1e-4


class Exported(torch.nn.Module):
    """uint8 centre crops (N, 3, S, S) -> softmax probabilities (N, C), the mean over the models and, with flip,
    over each crop and its mirror: predict.predict_probs for one batch, normalisation included."""

    def __init__(self, models: Sequence[torch.nn.Module], norms: Sequence[tuple], tta: str):
        super().__init__()
        self.models, self.tta = torch.nn.ModuleList(models), tta
        # each model's own input normalisation (a timm model may have its own mean and std), as buffers so that
        # they follow the module to a device; (models, 1, 3, 1, 1) each
        scales, shifts = zip(*(norm_factors(norm) for norm in norms))
        self.register_buffer("scales", torch.stack(scales))
        self.register_buffer("shifts", torch.stack(shifts))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # batches.to_float_batch's scale and shift, and predict.py's views and average: inference.py's rounding
        total = None
        for i, model in enumerate(self.models):
            views = crop_views(scale_channels_(images.float(), self.scales[i], self.shifts[i]), self.tta)
            probs = mean_over_views(model(torch.cat(views)), len(views))
            total = probs if total is None else total + probs
        return total / len(self.models)


def export_members(members: Sequence[Any], classes: Sequence[str], path: str, tta: str) -> int:
    """Write inference.py's loaded members (inference.Member: model, cfg, source, path, num_classes) to `path` as
    ONNX (.onnx) or TorchScript (.pt) with their metadata, check the file against PyTorch and say what it holds."""
    fmt = export_format(path, [m.path for m in members], tta)
    onnx = require("onnx", "ONNX export needs the onnx package: pip install onnx onnxruntime") \
        if fmt == "ONNX" else None
    sizes = {(eval_crop(m.cfg), m.cfg.eval_crop_ratio, m.cfg.interpolation) for m in members}
    if len(sizes) > 1:
        raise UserError(f"the checkpoints are evaluated at different sizes ({sorted(sizes)}): an exported ensemble "
                        "takes one input size; pass --eval-size and --eval-crop-ratio to set one for all")
    crop, ratio, _ = sizes.pop()
    wrapper = Exported([m.model.float().cpu().eval() for m in members], [normalisation(m.cfg) for m in members],
                       tta).eval()
    meta = metadata(members, classes, crop, ratio, tta)
    example = torch.randint(0, 256, (2, 3, crop, crop), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "ONNX":
        write_onnx(wrapper, example, path, meta, onnx)
    else:
        write_torchscript(wrapper, example, path, meta)
    sources = ", ".join(m.source for m in members)
    print(f"wrote {path}: {fmt}, {len(members)} model(s) ({sources} weights), {len(classes)} classes; input "
          f"uint8 RGB (N, 3, {crop}, {crop}) = resize the short side to {eval_sizes(crop, ratio)[0]}, centre crop "
          f"{crop}; normalisation inside; output softmax probabilities{' (flip averaged)' if tta == 'flip' else ''}")
    check_export(wrapper, path, fmt, crop)
    return 0


def export_format(path: str, checkpoints: Sequence[str], tta: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"--export {path}: the name must end in .onnx (ONNX) or .pt (TorchScript)")
    if any(os.path.abspath(path) == os.path.abspath(c) for c in checkpoints):
        raise UserError(f"--export {path} would overwrite the checkpoint it exports: choose another file name")
    if tta not in EXPORTABLE_TTA:
        raise UserError(f"--tta {tta} cannot be exported (its corner views need the whole resized image, the "
                        "exported model takes the centre crop): export with --tta flip or --tta none")
    return FORMATS[ext]


def require(module: str, message: str) -> ModuleType:
    """An optional dependency, or the one-line error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(message) from None


def normalisation_metadata(members: Sequence[Any]) -> dict[str, Any]:
    """The mean and std the graph applies: one pair when the models share it, else one per model, in their order."""
    norms = [tuple(map(list, normalisation(m.cfg))) for m in members]
    shared = all(n == norms[0] for n in norms)
    means, stds = ([norms[0][0]], [norms[0][1]]) if shared else ([n[0] for n in norms], [n[1] for n in norms])
    return {"mean": means[0] if shared else means, "std": stds[0] if shared else stds, "scale": "1/255",
            "applied": "inside the graph: (images / 255 - mean) / std" + ("" if shared else ", per model")}


def metadata(members: Sequence[Any], classes: Sequence[str], crop: int, ratio: float, tta: str) -> dict[str, str]:
    """What a user of the file needs to feed it and read it, as strings (ONNX metadata_props holds strings)."""
    resize = eval_sizes(crop, ratio)[0]
    first = members[0].cfg
    return {
        "classes": json.dumps(list(classes)),
        "input": f"images: uint8 RGB, shape (N, 3, {crop}, {crop}), channels first: resize the short side to "
                 f"{resize} px ({first.interpolation or 'bilinear'}, antialiased), take the centre {resize}x{resize} square, then its centre "
                 f"{crop}x{crop} crop; do not normalise",
        "output": "probs: float32, shape (N, number of classes), softmax probabilities in the order of classes"
                  + (", averaged over the image and its horizontal mirror" if tta == "flip" else "")
                  + (f", averaged over {len(members)} models" if len(members) > 1 else ""),
        "eval_size": str(crop),
        "resize": str(resize),
        "eval_crop_ratio": f"{ratio:g}",
        "normalisation": json.dumps(normalisation_metadata(members)),
        "tta": tta,
        "weights": ",".join(m.source for m in members),
        "arch": ",".join(dict.fromkeys(m.cfg.arch for m in members)),
        "head": first.head,
        "checkpoints": json.dumps([m.path for m in members]),
        "exported_by": f"inference.py --export, torch {torch.__version__}",
    }


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    # torch 2.9+ announces the deprecation of the TorchScript-based ONNX exporter and of torch.jit on every call;
    # both still work in the torch versions requirements.txt allows, and the user can do nothing about the notice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def write_onnx(wrapper: Exported, example: torch.Tensor, path: str, meta: dict[str, str], onnx: ModuleType) -> None:
    # the TorchScript-based exporter works offline with onnx alone; dynamo=False asks for it where torch's
    # default became the torch.export-based one (2.9+), which also needs onnxscript
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        with quiet_exporters(), torch.no_grad():
            torch.onnx.export(wrapper, (example,), path, input_names=["images"], output_names=["probs"],
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "probs": {0: "batch"}},
                              opset_version=ONNX_OPSET, **legacy)
    except Exception as e:  # an op this exporter cannot translate: say which, in one line
        raise UserError(f"ONNX export failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); "
                        "try a TorchScript .pt file") from None
    model = onnx.load(path)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"{meta['input']} -> {meta['output']}"
    onnx.save(model, path)


def write_torchscript(wrapper: Exported, example: torch.Tensor, path: str, meta: dict[str, str]) -> None:
    with quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,))
        torch.jit.save(traced, path, _extra_files={"metadata.json": json.dumps(meta, indent=2)})


def check_export(wrapper: Exported, path: str, fmt: str, crop: int) -> None:
    """Run the written file on random images and compare it with PyTorch's float32 model (the weights the file
    holds, whatever --amp the run trained or predicts with): a silent mismatch is the classic failure of an
    export."""
    images = torch.randint(0, 256, (3, 3, crop, crop), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = wrapper(images).numpy()
    if fmt == "ONNX":
        try:
            import onnxruntime
        except ImportError:
            print("not checked: install onnxruntime to compare the file's outputs with PyTorch's")
            return
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(["probs"], {"images": images.numpy()})[0]
    else:
        with quiet_exporters(), torch.no_grad():
            got = torch.jit.load(path, map_location="cpu")(images).numpy()
    diff = float(np.abs(got - expected).max())
    runner = "ONNX Runtime" if fmt == "ONNX" else "torch.jit.load"
    if not diff <= CHECK_TOLERANCE:
        raise UserError(f"{path} does not reproduce PyTorch's outputs under {runner} (largest difference {diff:.2g} "
                        f"on random images): please report it with the arch")
    # against the float32 model the file holds: the run's --amp (bf16 on a CPU with AMX) is not in the export
    print(f"checked: {runner} gives PyTorch's float32 probabilities to {diff:.1g} on 3 random images")


def loaded_metadata(path: str) -> dict[str, str]:
    """The metadata of an exported file, ONNX or TorchScript (what a user would read; the tests use it)."""
    if path.lower().endswith(".onnx"):
        onnx = require("onnx", "reading an ONNX file needs the onnx package: pip install onnx")
        return {p.key: p.value for p in onnx.load(path).metadata_props}
    extra = {"metadata.json": ""}
    with quiet_exporters():
        torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return json.loads(extra["metadata.json"])


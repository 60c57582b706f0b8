"""Export to ONNX / OpenVINO (glip_train.export, ``glip export``): the runtimes' detections equal the eager model's.

The shipped model is exported once, through ``glip export`` (the ONNX trace is the slow part, about a minute on 2
cores); the OpenVINO model is converted from that export without tracing again. ``glip detect / ground / eval`` run
the exported folders through the command line's one model loader. Detections are compared one to one with
:func:`glip_train.testing.match_detections` (same label, IoU > 0.99, |score difference| < 1e-3: the float32 graph
differs from eager PyTorch by rounding, ~1e-6 relative, so a detection that moves more is a wrong graph). The images
and prompts differ in size and length from the ones traced, so the dynamic axes are exercised.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from glip_train import GLIP  # noqa: E402
from glip_train.cli import main as glip_main  # noqa: E402
from glip_train.export import ExportedGLIP, ExportError, export_model, is_exported, resolve_export  # noqa: E402
from glip_train.export.graph import INPUT_NAMES, example_inputs, output_names  # noqa: E402
from glip_train.testing import match_detections  # noqa: E402

#: two prompts of the shipped model's world, of different token lengths
PROMPTS = (["red circle", "blue square"],
           ["yellow triangle", "green star", "hexagon", "purple diamond", "cross", "orange ring", "circle"])


def _picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A gray picture with a few filled shapes in the shipped model's colours (``size = (w, h)``)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    colours = [(220, 30, 30), (30, 60, 220), (240, 220, 30), (30, 180, 60)]
    for i, colour in enumerate(colours):
        w, h = size
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        s = int(rng.integers(20, 40))
        (draw.ellipse if i % 2 == 0 else draw.rectangle)([x, y, x + s, y + s], fill=colour)
    return image


@pytest.fixture(scope="module")
def images():
    """Two pictures whose resized sizes (160x224, 240x160) differ from each other and from the traced 288x480."""
    return [_picture((280, 200), 0), _picture((150, 225), 1)]


@pytest.fixture(scope="module")
def shipped():
    return GLIP.from_pretrained().eval()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "onnx"
    # --no-optimize: the exporter's graph optimizer takes as long as the trace and changes no output
    assert glip_main(["export", "--weights", "default", "--format", "onnx", "-o", str(folder), "--no-optimize",
                      "--quiet"]) == 0
    return folder


def _assert_same_detections(ours: list[dict], reference: list[dict], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, reference)):
        m = match_detections(a["boxes"], a["scores"], a["labels"], b["boxes"], b["scores"], b["labels"])
        assert m.num_reference > 0, f"{what}: image {i} has no detection to compare"
        assert m.matched == m.num_reference and m.unmatched_ours == 0, f"{what} image {i}: {m}"


def _check_runtime_equals_eager(model, shipped, images):
    lengths = {int(shipped.processor.tokenize([". ".join(p)])[1].sum()) for p in PROMPTS}
    assert len(lengths) == 2 and 11 not in lengths  # two text lengths, neither the traced one
    for classes in PROMPTS:
        kwargs = dict(classes=classes, threshold=0.0, max_detections=None, batch_size=2)
        _assert_same_detections(model.detect(images, **kwargs), shipped.detect(images, **kwargs),
                                f"{model.format} {classes}")
    # one image at a time: batch 1 and the image's own padded size
    caption, phrases = "a red circle left of a blue square", ["red circle", "blue square"]
    _assert_same_detections(model.ground(images[1], caption, phrases, threshold=0.0),
                            shipped.ground(images[1], caption, phrases, threshold=0.0), f"{model.format} ground")


def test_onnxruntime_detections_equal_eager(onnx_dir, shipped, images):
    model = ExportedGLIP.from_pretrained(onnx_dir / "model.onnx")
    assert model.format == "onnx" and model.config == shipped.config
    _check_runtime_equals_eager(model, shipped, images)


@pytest.fixture(scope="module")
def openvino_dir(onnx_dir):
    pytest.importorskip("openvino")
    folder = onnx_dir.parent / "openvino"
    # converted from the ONNX export (the one model loader reads it as an ExportedGLIP): no new trace
    assert glip_main(["export", "--weights", str(onnx_dir / "model.onnx"), "--format", "openvino", "-o",
                      str(folder), "--quiet"]) == 0
    return folder


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_export_quantizes_the_matrix_products(fmt, onnx_dir, shipped, images, tmp_path):
    """An int8 model converted from a float32 export written without the exporter's optimizer (as onnx_dir is):
    every matrix product by a constant weight is int8 (traced linear layers feed their weights through a Transpose,
    which the quantizer does not look through unless the constants are folded first), the weights shrink, and the
    model runs through detect."""
    if fmt == "openvino":
        pytest.importorskip("nncf")
    folder = tmp_path / f"{fmt}-int8"
    export_model(ExportedGLIP.from_pretrained(onnx_dir), folder, fmt, quantize="int8")
    model = ExportedGLIP.from_pretrained(folder)
    assert model.format == fmt and model.info["precision"] == "int8"
    fp32_bytes = (onnx_dir / "model.onnx.data").stat().st_size
    if fmt == "onnx":
        import onnx

        from glip_train.export.quantize import _constant_weight_products

        graph = onnx.load(str(folder / "model.onnx"))
        quantized = sum(1 for node in graph.graph.node if node.op_type == "MatMulInteger")
        assert _constant_weight_products(graph) == 0  # no float32 product by a constant is left
        assert quantized == model.info["quantization"]["matrix_products_with_constant_weights"] > 0
        size = (folder / "model.onnx").stat().st_size
    else:
        size = (folder / "model.bin").stat().st_size
    assert size < 0.75 * fp32_bytes  # float32 -> int8 weights of the matrix products (convolutions may stay)
    (out,) = model.detect([images[0]], classes=["circle", "square"], threshold=0.0)
    assert len(out["scores"]) > 0 and torch.isfinite(out["boxes"]).all() and torch.isfinite(out["scores"]).all()


def test_openvino_ports_are_named_as_the_graph():
    """OpenVINO folds no-op nodes into the tensors around them, so a port can carry several names (GLIP-T's pixels
    are also ``pad``, the patch embedding's zero padding): the session names each port by the graph's own name,
    whichever name OpenVINO would return first."""
    from glip_train.export.runtime import OUTPUT_GROUPS, _port_name

    class Port:
        def __init__(self, *names):
            self.names = set(names)

        def get_names(self):
            return self.names

        def get_any_name(self):
            return sorted(self.names)[-1]

    assert _port_name(Port("pad", "pixel_values"), INPUT_NAMES) == "pixel_values"
    assert _port_name(Port("attention_mask", "view_3"), INPUT_NAMES) == "attention_mask"
    assert _port_name(Port("add_17", "token_logits_3"), OUTPUT_GROUPS) == "token_logits_3"
    assert _port_name(Port("centerness_0"), OUTPUT_GROUPS) == "centerness_0"


@pytest.mark.slow  # the default run checks OpenVINO through glip ground (test_cli_detect_and_ground_run_the_export)
def test_openvino_detections_equal_eager(openvino_dir, shipped, images, tmp_path):
    assert (openvino_dir / "model.bin").is_file() and not (openvino_dir / "model.onnx").exists()
    model = ExportedGLIP.from_pretrained(openvino_dir)
    assert model.format == "openvino"
    _check_runtime_equals_eager(model, shipped, images)


def test_export_folder_and_record(onnx_dir, shipped):
    from glip_train.shipped import default_model_dir

    names = sorted(p.name for p in onnx_dir.iterdir())
    assert names == ["config.json", "export.json", "model.onnx", "model.onnx.data", "tokenizer"]
    assert (onnx_dir.parent / ".onnx.glip.lock").is_file()  # the lock lies beside the folder, renamed into place
    info = json.loads((onnx_dir / "export.json").read_text())
    assert info["format"] == "onnx" and info["file"] == "model.onnx" and info["precision"] == "fp32"
    assert info["inputs"] == list(INPUT_NAMES) and info["outputs"] == output_names()
    # the shipped model's head width (32) is below its text limit (256): the projected X-MHA, reference attention
    assert info["attention"] == "reference" and info["deformable_convolution"] == "grid_sample"
    assert max(info["check_relative_error"].values()) < 1e-4
    assert info["source"] == str(default_model_dir().resolve())

    import onnx

    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops and "DeformConv" not in ops  # the portable deformable convolution
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert all(isinstance(d, str) for d in dims["pixel_values"][:1] + dims["pixel_values"][2:])  # symbolic axes
    assert isinstance(dims["input_ids"][1], str)

    for path in (onnx_dir, onnx_dir / "model.onnx"):
        assert is_exported(path)
        assert resolve_export(path)[1] == onnx_dir / "model.onnx"
    assert not is_exported(onnx_dir / "config.json")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(ExportedGLIP.from_pretrained(onnx_dir), onnx_dir, "onnx")


def _json_detections(folder, stem: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    found = json.loads((folder / f"{stem}.json").read_text())["detections"]
    return (torch.tensor([d["box"] for d in found]).reshape(-1, 4), torch.tensor([d["score"] for d in found]),
            torch.tensor([d["label"] for d in found]))


def _assert_same_files(ours, reference, stems, what: str) -> None:
    """detect / ground JSON files (boxes written to 0.01 px, scores to 1e-5: within the match's tolerances)."""
    for stem in stems:
        m = match_detections(*_json_detections(ours, stem), *_json_detections(reference, stem))
        assert m.num_reference > 0, f"{what} {stem}: no detection to compare"
        assert m.matched == m.num_reference and m.unmatched_ours == 0, f"{what} {stem}: {m}"


def test_cli_detect_and_ground_run_the_export(onnx_dir, openvino_dir, images, tmp_path):
    """glip detect (onnxruntime) and glip ground (OpenVINO) through --weights: the eager model's detections."""
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        image.save(paths[-1])
    detect = ["detect", *map(str, paths), "--classes", ",".join(PROMPTS[1]), "--threshold", "0.05", "--no-draw",
              "--quiet"]
    assert glip_main([*detect, "--weights", str(onnx_dir / "model.onnx"), "-o", str(tmp_path / "onnx")]) == 0
    assert glip_main([*detect, "--weights", "default", "-o", str(tmp_path / "eager")]) == 0
    _assert_same_files(tmp_path / "onnx", tmp_path / "eager", ["img0", "img1"], "glip detect onnx")
    ground = ["ground", *map(str, paths), "--caption", "a red circle left of a blue square", "--phrases",
              "red circle|blue square", "--threshold", "0.05", "--no-draw", "--quiet"]
    assert glip_main([*ground, "--weights", str(openvino_dir), "-o", str(tmp_path / "ov")]) == 0
    assert glip_main([*ground, "--weights", "default", "-o", str(tmp_path / "eager_ground")]) == 0
    _assert_same_files(tmp_path / "ov", tmp_path / "eager_ground", ["img0", "img1"], "glip ground openvino")


def _coco_columns(records: list[dict], image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """boxes (x0, y0, x1, y1), scores, category ids of one image's COCO result records."""
    found = [r for r in records if r["image_id"] == image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in found)]).reshape(-1, 4)
    return boxes, torch.tensor([r["score"] for r in found]), torch.tensor([r["category_id"] for r in found])


def test_cli_eval_runs_the_export(onnx_dir, tmp_path, detection_dataset_writer):
    """glip eval --weights DIR/model.onnx: the eager model's detections.json (matched) and the same AP."""
    sizes = [(120, 96), (100, 100)]
    dataset = detection_dataset_writer(tmp_path, sizes, [(1, "red circle"), (2, "blue square")],
                                       [(0, 1, [10, 10, 40, 40]), (1, 2, [20, 30, 50, 40])])
    for i, size in enumerate(sizes):  # pictures of the shipped model's world
        _picture(size, i).save(tmp_path / "images" / f"{i:03d}.png")
    common = ["eval", "--protocol", "custom", "--annotations", str(dataset), "--no-progress", "--quiet"]
    assert glip_main([*common, "--weights", str(onnx_dir / "model.onnx"), "--out", str(tmp_path / "onnx")]) == 0
    assert glip_main([*common, "--weights", "default", "--out", str(tmp_path / "eager")]) == 0
    ours, ref = (json.loads((tmp_path / d / "detections.json").read_text()) for d in ("onnx", "eager"))
    assert len(ref) > 0
    for image_id in {d["image_id"] for d in ref}:
        m = match_detections(*_coco_columns(ours, image_id), *_coco_columns(ref, image_id))
        assert m.matched == m.num_reference and m.unmatched_ours == 0, f"image {image_id}: {m}"
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text())["metrics"]["AP"] for d in ("onnx", "eager")]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-3)


def test_cli_export_write_discipline(onnx_dir, tmp_path, capsys):
    """The same export again is left as it is; another one, or a folder of other files, is refused in one line
    (exit code 2) before the model loads; a model option that an export cannot honour is named."""
    before = (onnx_dir / "export.json").stat().st_mtime_ns
    assert glip_main(["export", "--weights", "default", "--format", "onnx", "-o", str(onnx_dir)]) == 0
    assert "already holds this export" in capsys.readouterr().out
    assert (onnx_dir / "export.json").stat().st_mtime_ns == before
    cases = [
        (["--weights", "default", "--format", "onnx", "--int8", "-o", str(onnx_dir)],
         f"{onnx_dir} already holds an exported model; pass --overwrite to replace it"),
        (["--weights", "default", "--format", "onnx", "-o", str(tmp_path)],  # holds the other cases' files
         "is not empty and holds no exported model"),
        (["--weights", "default", "--format", "openvino", "--deform", "torchvision", "-o", str(tmp_path / "x")],
         "OpenVINO cannot read ONNX's DeformConv"),
        (["--weights", str(onnx_dir), "--format", "onnx", "--adapter", "a.pt", "-o", str(tmp_path / "x")],
         "pass --adapter to glip export instead"),
        (["--weights", str(tmp_path / "missing.onnx"), "--format", "onnx", "-o", str(tmp_path / "x")],
         "no such file or directory"),
    ]
    (tmp_path / "notes.txt").write_text("not an export")
    for argv, message in cases:
        assert glip_main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
    _picture((64, 64), 0).save(tmp_path / "p.png")
    assert glip_main(["detect", str(tmp_path / "p.png"), "--classes", "circle", "--weights", str(onnx_dir),
                      "--dtype", "bf16", "-o", str(tmp_path / "d")]) == 2
    assert "runs in the precision it was exported with" in capsys.readouterr().err


def test_loading_something_else_fails_with_one_line(onnx_dir, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match=r"not an exported GLIP model \(no export.json"):
        ExportedGLIP.from_pretrained(tmp_path / "model.onnx")
    (tmp_path / "export.json").write_text(json.dumps({"format": "onnx", "file": "model.onnx"}))
    with pytest.raises(ExportError, match="config not found"):
        ExportedGLIP.from_pretrained(tmp_path)
    shutil.copy(onnx_dir / "config.json", tmp_path / "config.json")
    shutil.copytree(onnx_dir / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(ExportError, match="onnxruntime cannot load it"):
        ExportedGLIP.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is an exported model"):
        GLIP.from_pretrained(onnx_dir / "model.onnx")
    with pytest.raises(ExportError, match="is model.onnx, not other.onnx"):
        resolve_export(tmp_path / "other.onnx")


def test_missing_runtime_names_the_extra(onnx_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ExportError, match=r"pip install 'glip-train\[onnx\]'"):
        ExportedGLIP.from_pretrained(onnx_dir)


def test_exported_model_checks_its_inputs(onnx_dir):
    model = ExportedGLIP.from_pretrained(onnx_dir)
    assert model.eval() is model and model.to("cpu") is model and model.device.type == "cpu"
    with pytest.raises(ExportError, match="runs on the CPU"):
        model.to("cuda")
    ids, mask = torch.ones(1, 5, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="not padded to a multiple of 32"):
        model(torch.zeros(1, 3, 100, 128), ids, mask)
    long = torch.ones(1, model.config.max_text_len + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(1, 3, 128, 128), long, long)


def test_runtime_output_structure_equals_eager(onnx_dir, shipped):
    """The call returns the eager GLIPOutput's head outputs and anchors (what post-processing reads)."""
    model = ExportedGLIP.from_pretrained(onnx_dir)
    pixels, ids, mask, sizes = example_inputs(shipped)
    sizes = [tuple(s) for s in sizes.tolist()]
    ours = model(pixels, ids, mask, sizes)
    with torch.no_grad():
        ref = shipped(pixels, ids, mask, sizes)
    assert ours.image_sizes == ref.image_sizes and torch.equal(ours.text_mask, ref.text_mask)
    for a, b in zip(ours.anchors, ref.anchors):
        assert torch.equal(a, b)
    for group in ("box_regression", "centerness", "token_logits"):
        for a, b in zip(getattr(ours.head, group), getattr(ref.head, group)):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4), group


@pytest.mark.slow
def test_adapter_and_batch_invariant_model_export(minilm_dir, tmp_path):
    """A prompt-tuning table and a batch-invariant model (whose image masks come from the image_sizes input) export
    with their weights: raw head outputs equal eager for batches of two other sizes and text lengths."""
    from glip_train import GLIPConfig

    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1, batch_invariant=True)).eval()
    model.enable_prompt_tuning(64)
    torch.nn.init.normal_(model.prompt_tuning.weight, std=0.5)
    export_model(model, tmp_path / "onnx", "onnx", optimize=False)
    runtime = ExportedGLIP.from_pretrained(tmp_path / "onnx")
    for (h, w), length, sizes in (((160, 256), 9, [(160, 256), (100, 130)]), ((320, 192), 23, [(160, 96), (320, 192)])):
        pixels = torch.randn(2, 3, h, w)
        ids = torch.randint(1000, 2000, (2, length))
        mask = torch.ones(2, length, dtype=torch.int64)
        mask[0, length // 2:] = 0
        ours = runtime(pixels, ids, mask, sizes)
        with torch.no_grad():
            ref = model(pixels, ids, mask, sizes)
        for a, b in zip(ours.head.token_logits + ours.head.box_regression, ref.head.token_logits + ref.head.box_regression):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        # the sizes input is honoured: other sizes give eager's outputs for those sizes, and the image whose size
        # changed (to a third of the batch's area or less) gets other outputs, beyond the export's float error
        full = [(h, w), (h, w)]
        other = runtime(pixels, ids, mask, full)
        with torch.no_grad():
            ref_other = model(pixels, ids, mask, full)
        for a, b in zip(other.head.token_logits, ref_other.head.token_logits):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        changed = next(i for i, size in enumerate(sizes) if tuple(size) != (h, w))
        assert not torch.allclose(other.head.token_logits[0][changed], ours.head.token_logits[0][changed],
                                  rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def glip_t(parity_dir):
    return GLIP.from_pretrained(parity_dir / "weights_recipe.json").eval()


@pytest.fixture(scope="module")
def glip_t_onnx(glip_t, tmp_path_factory):
    """GLIP-T traced once (about 10 min on 2 cores); OpenVINO is converted from this export, as users do."""
    folder = tmp_path_factory.mktemp("glip_t") / "onnx"
    export_model(glip_t, folder, "onnx", optimize=False, source="parity weights recipe")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_glip_t_parity_images(fmt, glip_t, glip_t_onnx, parity_dir, parity_index):
    """GLIP-T (the parity recipe's weights) exported: ground() on the parity images gives the eager model's
    detections (same labels, IoU > 0.99, |score difference| < 1e-3) through onnxruntime and OpenVINO, at sizes
    other than the traced one (each case's own)."""
    folder = glip_t_onnx
    if fmt == "openvino":
        pytest.importorskip("openvino")
        folder = glip_t_onnx.parent / "openvino"
        if not folder.exists():
            export_model(ExportedGLIP.from_pretrained(glip_t_onnx), folder, "openvino")
    runtime = ExportedGLIP.from_pretrained(folder)
    assert runtime.format == fmt
    assert runtime.info["attention"] == "factored"  # GLIP-T: texts of at most 256 tokens, heads of width 256
    for name, case in parity_index["cases"].items():
        images = [parity_dir / f for f in case["images"]]
        kwargs = dict(threshold=0.0, max_detections=100, min_size=320, max_size=480, batch_size=len(images))
        ours = runtime.ground(images, case["captions"], case["phrases"], **kwargs)
        ref = glip_t.ground(images, case["captions"], case["phrases"], **kwargs)
        _assert_same_detections(ours, ref, f"GLIP-T {fmt} {name}")


def test_swin_window_count_stays_symbolic(tmp_path):
    """Two Swin stages with shifted windows (the second after a patch merging), exported with dynamic height and
    width, run at sizes whose token maps are not multiples of the window (so they are padded, and ceil(n / w) !=
    floor(n / w)): the window counts in the graph follow the input. (GLIP-T's backbone; the shipped model's RegNet
    has no windows. A negative floor division in the padded size once exported as ONNX's truncating Div, one window
    short at nearly every image size; a padding of (w - n % w) % w made the trace take minutes per block.)"""
    from torch.export import Dim

    from glip_encoders.swin import SwinBackbone, SwinConfig

    torch.manual_seed(0)
    backbone = SwinBackbone(SwinConfig(16, (2, 2), (1, 2), window_size=7), out_indices=(0, 1)).eval()

    class Features(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return tuple(self.body(x))

    path = tmp_path / "swin.onnx"
    units = Dim("h", min=2, max=256), Dim("w", min=2, max=256)
    with torch.no_grad():  # traced at 288x480: at least 2 windows each way in both stages (example_inputs' rule)
        torch.onnx.export(Features(backbone), (torch.randn(1, 3, 288, 480),), str(path), dynamo=True,
                          dynamic_shapes={"x": {2: 32 * units[0], 3: 32 * units[1]}}, optimize=False,
                          verbose=False)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # token maps 24x40, 16x56, 32x24 (padded to 28x42, 21x56, 35x28), then 12x20, 8x28, 16x12 (14x21, 14x28, 21x14)
    for size in [(96, 160), (64, 224), (128, 96)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            reference = [r.numpy() for r in backbone(x)]
        ours = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for a, b in zip(ours, reference):
            assert a.shape == b.shape
            # float32 rounding of 2-block stages (LayerNorm, attention, MLP): ~1e-6 absolute on unit-scale features
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_cli_exports_the_network_with_its_adapter(shipped, images, tmp_path):
    """``glip export --weights default --adapter FILE``: the exported graph carries the prompt-tuning table: its
    detections equal the eager model with the adapter applied, and differ from the shipped model's without it."""
    from glip_train.adapters import load_adapter, save_adapter

    tuned = GLIP.from_pretrained().eval()
    tuned.enable_prompt_tuning(64)
    torch.manual_seed(0)
    torch.nn.init.normal_(tuned.prompt_tuning.weight, std=0.5)
    adapter = save_adapter(tuned, tmp_path / "prompt.safetensors", "prompt_tuning")
    folder = tmp_path / "onnx"
    assert glip_main(["export", "--weights", "default", "--adapter", str(adapter), "--format", "onnx", "-o",
                      str(folder), "--no-optimize", "--quiet"]) == 0
    exported = ExportedGLIP.from_pretrained(folder / "model.onnx")
    reference = GLIP.from_pretrained().eval()
    load_adapter(reference, adapter)  # the adapter as `glip detect --adapter` applies it, read back from the file
    kwargs = dict(classes=list(PROMPTS[0]), threshold=0.0, max_detections=None, batch_size=2)
    ours = exported.detect(images, **kwargs)
    _assert_same_detections(ours, reference.detect(images, **kwargs), "onnx with adapter")
    plain = shipped.detect(images, **kwargs)
    # the table moves the scores far beyond the export's float error (|score difference| < 1e-3)
    moved = max(float((a["scores"][:5] - b["scores"][:5]).abs().max()) for a, b in zip(ours, plain))
    assert moved > 1e-2

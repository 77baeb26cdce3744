"""The later layers of a kind are made from the first one's export and transform
(pipeline/stages/layer_template.py): exactly what the exporter and model_transform.py make for them, or
made by those, with the reason, when the first one's cannot serve."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.families import get_family
from pipeline.fsutil import read_json
from pipeline.graph.build_config import parse_build_config
from pipeline.graph.tasks import stages
from pipeline.stages import layer_template
from pipeline.stages.compile import transform
from pipeline.stages.export import export_piece
from pipeline.stages.layer_template import graph_digest, initializers

from .conftest import TINY_MODELS, run_doit


def _stage(build_dir, model, name):
    return stages(parse_build_config({"model": model, "build_dir": str(build_dir),
                                      "dist_dir": str(build_dir / "dist")}))[name]


def _log(export_or_transform, piece) -> str:
    return (export_or_transform.paths.logs / export_or_transform.stage / f"{piece.file}.log").read_text()


@pytest.mark.fast
@pytest.mark.parametrize("model", TINY_MODELS)
def test_later_layers_onnx_is_what_the_exporter_makes(tiny_builds, tmp_path, model):
    build_dir, results = tiny_builds
    assert results[model].code == 0, results[model].output
    export = _stage(build_dir, model, "export")
    assert export.followers, "every tiny model has two layers or more"
    paths = export.paths
    for piece, template in export.followers.items():
        plan = json.loads(export.plan(template).read_text())["plan"]
        made = "from" in _log(export, piece).splitlines()[0] and "graph, with its own weights" in _log(export, piece)
        assert made == isinstance(plan, dict), (piece, plan)  # made from the template exactly when it has a plan
        real = tmp_path / piece.file / f"{piece.file}.onnx"
        export_piece(piece, read_json(paths.export_config), Path(read_json(paths.source)["folder"]),
                     read_json(paths.tensor_map), real, tmp_path / piece.file / "log")
        theirs, ours = onnx.load(str(real)), onnx.load(str(export.target(piece)))
        assert graph_digest(theirs) == graph_digest(ours), piece
        a, b = initializers(theirs), initializers(ours)
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a), piece


@pytest.mark.fast
def test_a_template_without_a_plan_says_why_and_the_exporter_runs(tiny_builds):
    """Qwen3.5's linear-attention layers fold a weight into a new constant (-exp(A_log)) that no one
    tensor of the module is: their later layers are exported by torch, and the log says why."""
    build_dir, results = tiny_builds
    export = _stage(build_dir, "tiny-qwen3.5", "export")
    linear = [p for p, t in export.followers.items() if p.kind == "linear_block"]
    assert linear
    plan = json.loads(export.plan(export.followers[linear[0]]).read_text())["plan"]
    assert isinstance(plan, str) and "is none of the module's tensors" in plan
    done = next(line for line in results["tiny-qwen3.5"].output.splitlines()
                if f"] {linear[0].file} done in" in line and "[export" in line)
    assert f"torch.onnx.export ({export.followers[linear[0]].file}.onnx's graph does not serve it: {plan})" in done


@pytest.fixture(scope="module")
def transformed(sim_builds):
    build_dir = sim_builds
    result = run_doit(build_dir, ["transform"], model="tiny-qwen2")
    assert result.code == 0, result.output
    return build_dir, result


@pytest.mark.sim
def test_later_layers_mlir_is_what_model_transform_makes(transformed, tmp_path):
    build_dir, result = transformed
    stage = _stage(build_dir, "tiny-qwen2", "transform")
    family = get_family(stage.build.model.family)
    assert stage.export.followers
    for piece in stage.export.followers:
        assert "from block" in _log(stage, piece) and "(the same graph)" in _log(stage, piece), piece
        real = tmp_path / piece.file
        transform(piece, stage.export.target(piece), real, tmp_path / f"{piece.file}.log", tmp_path,
                  float32_ops=family.float32_ops(piece.kind))
        ours = stage.mlir(piece).parent
        assert (real / f"{piece.name}.mlir").read_text() == (ours / f"{piece.name}.mlir").read_text()
        a, b = np.load(real / f"{piece.name}_top_f32_all_weight.npz"), np.load(ours / f"{piece.name}_top_f32_all_weight.npz")
        assert sorted(a.files) == sorted(b.files)
        assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.sim
def test_a_transform_that_changed_a_weight_is_no_template(transformed, tmp_path):
    """If model_transform.py folded, cast or reordered a weight, the MLIR may depend on the values:
    the record says so, and a later layer is transformed by model_transform.py."""
    build_dir, _ = transformed
    stage = _stage(build_dir, "tiny-qwen2", "transform")
    template = next(iter(stage.export.templates))
    copy = tmp_path / template.file
    shutil.copytree(stage.mlir(template).parent, copy)
    weights = copy / f"{template.name}_top_f32_all_weight.npz"
    stored = dict(np.load(weights))
    key = next(k for k in stored if k.startswith("onnx::MatMul"))
    stored[key] = stored[key] * 2
    np.savez(weights, **stored)
    model = onnx.load(str(stage.export.target(template)))
    layer_template.record_template(template.name, model, copy / f"{template.name}.mlir", weights)
    assert layer_template.usable(copy, model) == f"the transform changed or made weight {key}"
    assert layer_template.usable(stage.mlir(template).parent, model) is None
    # another graph is not served either
    follower = next(p for p, t in stage.export.followers.items() if t != template)
    assert "its graph differs" in layer_template.usable(stage.mlir(template).parent,
                                                        onnx.load(str(stage.export.target(follower))))

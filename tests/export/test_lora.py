"""The LoRA adapter library (`sd-triton lora add/list/remove`, export/lora.py, sd_triton/lora.py): files in
diffusers/PEFT and kohya keys are read as diffusers reads them and checked against the base; an adapter
set's weight deltas, added to the base's weights, give the images diffusers gives with
`load_lora_weights` + `set_adapters` on the same base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from sd_triton.cli import main
from sd_triton.export import lora
from sd_triton.export.pipeline import ExportOptions, run_export
from sd_triton.lora import Adapter, library_dir, set_deltas
from tests.conftest import WORK_DIR

PROMPT = "a red circle on a blue background"
SUFFIXES = ("to_q", "to_v", "q_proj", "v_proj")  # the test adapters' targets


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "model_repository"
    run_export(ExportOptions(model="tiny", repo=path, work_dir=WORK_DIR))
    return path


def _pipe(repo: Path) -> StableDiffusionPipeline:
    folder = json.loads((repo / "manifest.json").read_text())["source"]["path"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_adapter(
    path: Path,
    pipe: StableDiffusionPipeline,
    seed: int,
    rank: int = 4,
    kohya: bool = False,
    alpha: float = 2.0,
) -> Path:
    """A LoRA on the UNet's attention projections and the text encoder's q/v projections, with non-zero
    up-projections (a fresh LoRA's are zero: a no-op). kohya: its key names and an alpha per target, on the
    UNet only (diffusers cannot load kohya text-encoder keys into this transformers release's CLIP)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = [("unet", pipe.unet)] + ([] if kohya else [("text_encoder", pipe.text_encoder)])
    for prefix, module in modules:
        for name, layer in module.named_modules():
            if not isinstance(layer, torch.nn.Linear) or not name.endswith(
                ("to_q", "to_v", "q_proj", "v_proj")
            ):
                continue
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.3
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.3
            if kohya:
                key = ("lora_unet_" if prefix == "unet" else "lora_te_") + name.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
            else:
                tensors |= {f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


def _images(pipe: StableDiffusionPipeline) -> np.ndarray:
    out = pipe(PROMPT, height=64, width=64, num_inference_steps=6, output_type="np",
               generator=torch.Generator().manual_seed(3)).images  # fmt: skip
    return (out * 255).round().astype(np.uint8)


def test_add_list_remove_and_what_is_refused(repo: Path, tmp_path: Path) -> None:
    pipe = _pipe(repo)
    file = write_adapter(tmp_path / "style.safetensors", pipe, seed=1)
    record = lora.add(repo, file, "style")
    assert record.format == "diffusers" and record.rank == 4
    targeted = {
        prefix: sum(
            isinstance(m, torch.nn.Linear) and n.endswith(SUFFIXES) for n, m in module.named_modules()
        )
        for prefix, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
    }
    assert record.components == targeted and min(targeted.values()) > 0, record.components
    assert set(record.scales.values()) == {1.0}  # no alpha: alpha = rank
    assert (library_dir(repo) / "style" / "adapter.safetensors").is_file()
    kohya = lora.add(repo, write_adapter(tmp_path / "k.safetensors", pipe, seed=2, kohya=True), "sketch")
    assert kohya.format == "kohya" and set(kohya.scales.values()) == {0.5}  # alpha 2 / rank 4
    assert set(kohya.scales) == {t for t in record.scales if t.startswith("unet.")}  # by the base's names
    assert [r.name for r in lora.listed(repo)] == ["sketch", "style"]
    with pytest.raises(lora.LoraError, match="already in the library"):
        lora.add(repo, file, "style")
    with pytest.raises(ValueError, match="name 'Bad Name'"):
        lora.add(repo, file, "Bad Name")
    with pytest.raises(lora.LoraError, match="not a LoRA file"):
        (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
        lora.add(repo, tmp_path / "junk.safetensors", "junk")
    # an adapter for another base: the UNet's projections twice as wide
    from safetensors.torch import save_file

    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{target}.lora_A.weight": torch.ones(4, 64), f"{target}.lora_B.weight": torch.ones(64, 4)},
              str(tmp_path / "wide.safetensors"))  # fmt: skip
    with pytest.raises(lora.LoraError, match=r"to_q.weight: up \[64, 4\] x down \[4, 64\] .*another base"):
        lora.add(repo, tmp_path / "wide.safetensors", "wide")
    save_file({"unet.no_such.layer.lora_A.weight": torch.ones(4, 8), "unet.no_such.layer.lora_B.weight":
               torch.ones(8, 4)}, str(tmp_path / "other.safetensors"))  # fmt: skip
    with pytest.raises(lora.LoraError, match="no_such.layer.weight: the checkpoint has no such weight"):
        lora.add(repo, tmp_path / "other.safetensors", "other")
    assert [r.name for r in lora.listed(repo)] == ["sketch", "style"]  # nothing half-added
    lora.remove(repo, "sketch")
    with pytest.raises(lora.LoraError, match="not in the library .adapters: style"):
        lora.remove(repo, "sketch")
    lora.remove(repo, "style")


def test_the_cli(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = write_adapter(tmp_path / "a.safetensors", _pipe(repo), seed=4)
    assert main(["lora", "add", str(file), "--name", "cli-a", "--repo", str(repo)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli-a"
    assert main(["lora", "list", "--repo", str(repo), "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["cli-a"]
    assert main(["lora", "list", "--repo", str(repo)]) == 0
    assert "| cli-a | diffusers | 4 | text_encoder 4, unet 16 |" in capsys.readouterr().out
    assert main(["lora", "add", str(file), "--name", "x", "--repo", str(repo), "--pipeline", "nope"]) == 1
    assert main(["lora", "remove", "cli-a", "--repo", str(repo)]) == 0
    assert main(["lora", "remove", "cli-a", "--repo", str(repo)]) == 1


def test_set_deltas_on_the_base_are_diffusers_load_lora_weights(repo: Path, tmp_path: Path) -> None:
    """One adapter, and two at different scales (one in kohya keys with an alpha): the base's weights plus
    our deltas give diffusers' images with load_lora_weights + set_adapters (max abs <= 1/255), and each
    adapter changes the image by a clear margin."""
    pipe = _pipe(repo)
    base = _images(pipe)
    files = {
        "a": write_adapter(tmp_path / "a.safetensors", pipe, seed=5),
        "b": write_adapter(tmp_path / "b.safetensors", pipe, seed=6, kohya=True, alpha=8.0),
    }
    for name, file in files.items():
        lora.add(repo, file, f"parity-{name}", replace=True)
    adapters = {name: Adapter.load(library_dir(repo) / f"parity-{name}") for name in files}
    for sets in ([("a", 1.0)], [("a", 0.7), ("b", 1.3)]):
        theirs = _pipe(repo)
        for name, file in files.items():
            theirs.load_lora_weights(str(file), adapter_name=name)
        theirs.set_adapters([n for n, _ in sets], [s for _, s in sets])
        expected = _images(theirs)
        ours = _pipe(repo)
        modules = {"unet": ours.unet, "text_encoder": ours.text_encoder}
        params = {f"{c}.{n}": p for c, m in modules.items() for n, p in m.named_parameters()}
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        deltas = set_deltas([(adapters[n], s) for n, s in sets], shapes)
        assert {t.split(".", 1)[0] for t in deltas} == {"unet", "text_encoder"}
        with torch.no_grad():
            for target, delta in deltas.items():
                params[target] += torch.from_numpy(delta)
        got = _images(ours)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, sets
        assert np.abs(got.astype(int) - base.astype(int)).max() > 20, f"{sets} hardly changes the image"


def test_the_adapted_onnx_session_in_memory_and_with_weights_beside_it(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-ort's adapted session: the same outputs built in memory or, past protobuf's 2 GB (forced
    here), from a file with its weights beside it; unlike the base session's; the base session unchanged."""
    from sd_triton.engine_record import EngineRecord
    from sd_triton.lora import INDEX, LoraLibrary
    from sd_triton.runtime import ort_runner
    from sd_triton.runtime.lora_weights import GraphWeights

    lora.add(repo, write_adapter(tmp_path / "big.safetensors", _pipe(repo), seed=8), "big", replace=True)
    folder = repo / "unet" / "1"
    record = EngineRecord.load(folder)
    assert record is not None
    adapters = LoraLibrary(library_dir(repo)).resolve('[{"name": "big", "scale": 1.5}]')
    assert adapters is not None
    width = _pipe(repo).unet.config.cross_attention_dim
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.normal(size=(2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([[500.0], [500.0]], np.float32),
        "encoder_hidden_states": rng.normal(size=(2, 77, width)).astype(np.float32),
    }
    outputs = []
    for limit in (ort_runner.PROTOBUF_LIMIT, 0):
        monkeypatch.setattr(ort_runner, "PROTOBUF_LIMIT", limit)
        runner = ort_runner.OrtRunner(folder / record.artifact)
        runner.lora = GraphWeights(
            folder / record.artifact, library_dir(repo) / INDEX, record.sha256, ("unet",)
        )
        base = runner.run(feeds)["noise_pred"]
        outputs.append(runner.run_adapted(feeds, adapters)["noise_pred"])
        assert (runner._adapted_dir is not None) == (limit == 0)
        assert np.array_equal(runner.run(feeds)["noise_pred"], base)  # the base session is the base's
    assert np.allclose(outputs[0], outputs[1], atol=1e-6)
    assert np.abs(outputs[0] - base).max() > 1e-3
    lora.remove(repo, "big")


def test_refits_move_a_plan_between_sets_and_back_to_the_base_bit_exactly(repo: Path, tmp_path: Path) -> None:
    """The TensorRT path (runtime/lora_weights.Refits, as trt_runner refits a plan) run on a CPU: a stand-in
    for the plan's weights (the graph's initializers, by the names TensorRT's parser gives them) takes each
    refit's weights. Through base -> a -> a+b -> b -> base -> b, the weights it holds give, run by ONNX
    Runtime, python-ort's outputs for that set (no blend of the set before); back at the base they are the
    graph's own bytes. After a refit that failed part way, the next one restores every weight it touched."""
    from onnx import load, numpy_helper

    from sd_triton.engine_record import EngineRecord
    from sd_triton.lora import INDEX, LoraLibrary
    from sd_triton.runtime.lora_weights import BASE, GraphWeights, Refits
    from sd_triton.runtime.ort_runner import OrtRunner

    pipe = _pipe(repo)
    lora.add(repo, write_adapter(tmp_path / "p.safetensors", pipe, seed=8), "refit-p", replace=True)
    lora.add(repo, write_adapter(tmp_path / "q.safetensors", pipe, seed=9, rank=2), "refit-q", replace=True)
    folder = repo / "unet" / "1"
    record = EngineRecord.load(folder)
    assert record is not None
    library = LoraLibrary(library_dir(repo))
    sets = {
        name: library.resolve(json.dumps(items))
        for name, items in {
            "a": [{"name": "refit-p"}],
            "a+b": [{"name": "refit-p", "scale": 0.7}, {"name": "refit-q", "scale": 1.3}],
            "b": [{"name": "refit-q", "scale": 1.3}],
        }.items()
    }
    weights = GraphWeights(folder / record.artifact, library_dir(repo) / INDEX, record.sha256, ("unet",))
    runner = OrtRunner(folder / record.artifact)
    runner.lora = weights
    width = pipe.unet.config.cross_attention_dim
    rng = np.random.default_rng(1)
    feeds = {
        "sample": rng.normal(size=(1, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([[300.0]], np.float32),
        "encoder_hidden_states": rng.normal(size=(1, 77, width)).astype(np.float32),
    }
    assert all(weights.patched(s) for s in sets.values() if s)  # reads the index: both adapters
    graph = {i.name: numpy_helper.to_array(i) for i in load(str(folder / record.artifact)).graph.initializer}
    plan_weights = {name: graph[name].copy() for name in weights.indexed()}
    session = runner._adapted()  # takes every indexed initializer as an input: the stand-in's weights
    refits, outputs = Refits(), {}
    for name in ["base", "a", "a+b", "b", "base", "b"]:
        adapters = sets.get(name)
        key, patched = (BASE, {}) if adapters is None else (adapters.key, weights.patched(adapters) or {})
        plan = refits.plan(key, patched, weights.initializer)
        if plan is not None:
            assert set(plan) <= set(plan_weights)
            plan_weights.update(plan)
            refits.held(key, patched)
        assert refits.plan(key, patched, weights.initializer) is None  # held: nothing to set
        got = session.run(["noise_pred"], {**feeds, **plan_weights})[0]
        expected = runner.run(feeds) if adapters is None else runner.run_adapted(feeds, adapters)
        assert np.array_equal(got, expected["noise_pred"]), name
        outputs[name] = got
        if name == "base":
            assert all(np.array_equal(plan_weights[n], graph[n]) for n in plan_weights)  # bit-exact
    assert min(np.abs(outputs[n] - outputs["base"]).max() for n in sets) > 1e-3  # each set changes it
    # a refit failing half way: the weights it set are unknown, the next refit to the base restores them all
    plan = refits.plan(sets["a"].key, weights.patched(sets["a"]) or {}, weights.initializer)  # type: ignore[union-attr]
    assert plan is not None
    half = dict(list(plan.items())[: len(plan) // 2])
    plan_weights.update(half)
    refits.failed(half)
    restore = refits.plan(BASE, {}, weights.initializer)
    assert restore is not None and set(half) <= set(restore)
    plan_weights.update(restore)
    assert all(np.array_equal(plan_weights[n], graph[n]) for n in plan_weights)
    lora.remove(repo, "refit-p")
    lora.remove(repo, "refit-q")


def test_a_target_whose_layer_the_graph_does_not_run_is_indexed_as_absent(tmp_path: Path) -> None:
    """A graph running layer 0 of an encoder (its weight stored transposed, by another name) and not layer 1
    (pruned: its output unused): layer 0's target is found by value, layer 1's is absent (no change);
    a target of a layer the graph runs with no initializer equal to its weight is refused."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weights = {f"encoder.layers.{i}.self_attn.{p}.weight": rng.normal(size=(4, 4)).astype(np.float32)
               for i in (0, 1) for p in ("q_proj", "k_proj")}  # fmt: skip
    (tmp_path / "text_encoder").mkdir()
    save_file(weights, str(tmp_path / "text_encoder" / "model.safetensors"))
    q0 = numpy_helper.from_array(
        weights["encoder.layers.0.self_attn.q_proj.weight"].T.copy(), "onnx::MatMul_7"
    )
    k0 = numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "k0_quantized")  # not its weight
    scope = "/encoder/encoder/layers.0/self_attn"
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["q"], name=f"{scope}/q_proj/MatMul"),
        helper.make_node("MatMul", ["x", "k0_quantized"], ["k"], name=f"{scope}/k_proj/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("q", "k")],
        [q0, k0],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    targets = [f"text_encoder.encoder.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    found = lora._find_in_graph(path, targets, tmp_path, {}, "text_encoder is python-ort fp32", tmp_path)
    assert found == {targets[0]: ["onnx::MatMul_7", True], targets[1]: None}
    with pytest.raises(lora.LoraError, match="layers.0.self_attn.k_proj.weight: no weight of model.onnx"):
        lora._find_in_graph(path, ["text_encoder.encoder.layers.0.self_attn.k_proj.weight"], tmp_path, found,
                            "text_encoder is python-ort int8", tmp_path)  # fmt: skip

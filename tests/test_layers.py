"""The dependency direction of ../shared/STYLE.md, enforced: a module imports only from lower layers.

Every module of src/lowbit has a rank here; a new module must be given one (that is the point: where it sits
is a decision). Kernels know nothing of models; the GPTQ algorithm knows nothing of checkpoints; the engine
knows nothing of chat or HTTP; only the CLI sits on top.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

RANK = {
    "errors": 0, "config": 1,
    # kernels: tensors in, tensors out (a launcher may import the kernel file it launches)
    "kernels.sync": 1.5, "kernels.partials": 1.5, "kernels.layout": 1.5, "kernels.swiglu_load": 1.5,
    "kernels.splitk": 1.6, "kernels.slots": 1.6,
    "kernels.gemv": 1.8, "kernels.dot": 1.8, "kernels.dequant": 1.8, "kernels.mma": 1.8, "kernels.mma_dot": 1.8,
    "kernels.norm_rope": 1.9, "kernels.argmax": 1.9,
    "kernels.qmatmul": 2, "kernels.gptq_block_kernel": 2, "kernels.embedding": 2,
    "kernels.attention": 2.1, "kernels.dense": 2.1, "kernels.reference": 2.1, "kernels.gptq_block": 2.1,
    "kernels.ops": 2.2,
    "quant.pack": 3, "quant.quantizer": 3, "engine.sampling": 3, "engine.scheduler": 3,
    "quant.gptq": 4, "engine.request": 4,
    "model.linear": 5, "model.source": 5, "model.checkpoint": 5, "model.tokenizer": 5, "chat.template": 5,
    "eval.perplexity": 5, "server.protocol": 5, "server.middleware": 5,
    "model.llama": 6, "model.gguf": 6, "model.lora": 6, "model.delta": 6,
    "model.weights": 7, "model.builtin": 7, "data": 7, "engine.kv_cache": 7, "model.host_embedding": 7,
    "engine.prefill": 7,
    "model.info": 8, "engine.cuda_graphs": 8, "quant.calibrate": 8, "quant.card": 8, "quant.export": 8,
    "quant.job": 9, "engine.engine": 9, "eval.random_model": 9,
    "quant.variants": 10, "chat.session": 10, "eval.bench": 10, "server.runner": 10,
    "server.app": 11, "api": 11,
    "demo": 12,
    "cli.common": 13, "cli.run": 14, "cli.quantize": 14, "cli.serve": 14, "cli.bench": 14,
    "cli": 15, "cli.__main__": 16,
}
PACKAGES = {"", "chat", "engine", "eval", "kernels", "model", "quant", "server"}  # empty __init__ files


def module_names() -> list[str]:
    names = []
    for f in sorted((SRC / "lowbit").rglob("*.py")):
        name = ".".join(f.relative_to(SRC / "lowbit").with_suffix("").parts)
        names.append(name.removesuffix(".__init__").removesuffix("__init__"))
    return names


def imports(name: str) -> set[str]:
    """The lowbit modules `name` imports (`from lowbit.x import y` counts as lowbit.x.y when y is a module)."""
    path = SRC / "lowbit" / (name.replace(".", "/") or "__init__")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowbit":
            base = node.module.removeprefix("lowbit").removeprefix(".")
            targets = [f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in RANK else base
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("lowbit").removeprefix(".") for a in node.names
                       if a.name.split(".")[0] == "lowbit"]
        found |= {t for t in targets if t not in PACKAGES or t == "cli"}
    return found


def test_every_module_has_a_layer():
    assert sorted(set(module_names()) - PACKAGES - set(RANK)) == []


@pytest.mark.parametrize("name", sorted(RANK))
def test_imports_point_down(name):
    upward = {dep: RANK.get(dep) for dep in imports(name) if RANK.get(dep, 99) >= RANK[name]}
    assert upward == {}, f"lowbit.{name} (layer {RANK[name]}) imports from its own layer or above"
